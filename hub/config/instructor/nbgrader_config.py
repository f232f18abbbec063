"""nbgrader configuration of the instructor's server in the course hub, loaded before the course's own
nbgrader_config.py (the server runs in the course directory). The exchange classes are hub/exchange.py."""

import os

c = get_config()  # noqa: F821 (provided by nbgrader)

c.Exchange.root = os.environ["COURSE_EXCHANGE"]

for _op, _cls in {"exchange": "Exchange", "fetch_assignment": "FetchAssignment", "fetch_feedback": "FetchFeedback",
                  "list": "List", "submit": "Submit", "collect": "Collect", "release_assignment": "ReleaseAssignment",
                  "release_feedback": "ReleaseFeedback"}.items():
    setattr(c.ExchangeFactory, _op, f"hub.exchange.{_cls}")
