"""nbgrader configuration of a student's server in the course hub (the hub copies this folder to
.hub/config/student/ and sets JUPYTER_CONFIG_DIR to it). The exchange classes are hub/exchange.py."""

import os

c = get_config()  # noqa: F821 (provided by nbgrader)

c.Exchange.root = os.environ["COURSE_EXCHANGE"]
c.CourseDirectory.course_id = os.environ["COURSE_ID"]
# nbgrader names a submission after the Unix user (pwd); hub accounts have no /etc/passwd entry, so
# the hub's user name is the student id. (Collect checks that the folder belongs to that user's uid.)
c.CourseDirectory.student_id = os.environ["JUPYTERHUB_USER"]

for _op, _cls in {"exchange": "Exchange", "fetch_assignment": "FetchAssignment", "fetch_feedback": "FetchFeedback",
                  "list": "List", "submit": "Submit", "collect": "Collect", "release_assignment": "ReleaseAssignment",
                  "release_feedback": "ReleaseFeedback"}.items():
    setattr(c.ExchangeFactory, _op, f"hub.exchange.{_cls}")
