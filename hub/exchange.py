"""nbgrader's filesystem exchange, as the course hub configures it (hub/config/*/nbgrader_config.py).

The default exchange behaves exactly as nbgrader documents it, with four changes:

* The exchange root is never world-writable. nbgrader's own classes demand (and ``release_assignment``
  sets) mode 0777 on it; here the hub creates it 0755, owned by the instructor, and every operation
  only needs to traverse it. A student's submission folder in ``inbound/`` gets 0755 instead of
  nbgrader's 0777 (its files are 0644, as nbgrader makes them). ``inbound/`` stays 0733: students must
  be able to create their submissions in it, and cannot list it.
* ``collect`` takes a submission only when its folder belongs to the uid the hub gave the student it
  names (``.hub/uids.json``): a student cannot hand in under a classmate's name by setting
  ``CourseDirectory.student_id`` in their own config. (nbgrader only warns, and cannot check at all
  without /etc/passwd entries.) It never follows a symbolic link in a submission (nbgrader's copy
  does, with the instructor's permissions: a link to solutions/ would be collected as the answer) and
  leaves out FIFOs and other special files.
* ``release_feedback`` works with the course's sandboxed grader, which writes
  ``feedback/<student>/<chapter>/<notebook>.html`` itself: nbgrader needs ``timestamp.txt`` and
  ``submission_secret.txt`` next to the pages (``nbgrader generate_feedback`` copies them there from
  ``autograded/``); when they are missing they are taken from the collected submission
  (``submitted/<student>/<chapter>/``). The page is released as ``md5(secret + notebook name).html``,
  the name ``fetch_feedback`` looks for, and readable by the student (0644). When a student handed in
  the only notebook of a chapter under another name, the page is released under that name too.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import stat
from pathlib import Path

from nbgrader.exchange.default import (ExchangeCollect, ExchangeFetchAssignment, ExchangeFetchFeedback,
                                       ExchangeList, ExchangeReleaseAssignment, ExchangeReleaseFeedback,
                                       ExchangeSubmit)
from nbgrader.exchange.default.exchange import Exchange as DefaultExchange
from nbgrader.utils import ignore_patterns, notebook_hash, parse_utc

MAX_SMALL_FILE = 4096
SECRET_RE = re.compile(r"^[0-9a-fA-F]{16,512}$")


class _Root:
    """The exchange root must exist and be traversable; nobody needs to write to it."""

    def ensure_root(self):
        root = self.root
        if not os.path.isdir(root):
            self.fail(f"The exchange folder {root} does not exist; the course hub creates it when it starts.")
        if not os.access(root, os.X_OK):
            self.fail(f"You cannot open the exchange folder {root}; please contact your instructor.")


class Exchange(_Root, DefaultExchange):
    pass


class FetchAssignment(_Root, ExchangeFetchAssignment):
    pass


class FetchFeedback(_Root, ExchangeFetchFeedback):
    pass


class List(_Root, ExchangeList):
    pass


class ReleaseAssignment(_Root, ExchangeReleaseAssignment):
    pass


class Submit(_Root, ExchangeSubmit):
    def copy_files(self):
        super().copy_files()
        dest = os.path.join(self.inbound_path, self.assignment_filename)
        if os.path.isdir(dest) and not os.path.islink(dest):
            os.chmod(dest, 0o755)  # nbgrader: 0777 "so the instructor can delete later"


def _uid_registry() -> dict[str, int] | None:
    path = os.environ.get("COURSE_HUB_UIDS")
    if not path:
        return None
    try:
        return {str(k): int(v) for k, v in json.loads(Path(path).read_text()).items()}
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot read the hub's uid registry {path}: {exc}") from exc


class Collect(_Root, ExchangeCollect):
    def do_copy(self, src, dest, log=None):
        """nbgrader's copy, without following links: a student who replaced a file of their submission
        by a link to solutions/ (which the instructor can read) must not get it collected, nor stop the
        collection of everyone else with a FIFO."""
        if self.get_size(src) > 1000 * self.coursedir.max_dir_size:
            raise RuntimeError(f"Directory size is too big: {src}")
        special = _regular_only(self.log)
        usual = ignore_patterns(exclude=self.coursedir.ignore, include=self.coursedir.include,
                                max_file_size=self.coursedir.max_file_size, log=self.log)

        def ignore(directory, names):
            skipped = special(directory, names)
            return skipped | set(usual(directory, [n for n in names if n not in skipped]))

        shutil.copytree(src, dest, symlinks=True, ignore=ignore)

    def init_src(self):
        registry = _uid_registry()
        if registry is None:  # not under an isolating hub: nbgrader's own behaviour
            if os.environ.get("COURSE_HUB_ISOLATED") == "0":
                self.check_owner = False  # one shared user owns every submission: nothing to compare
            return super().init_src()
        self.check_owner = False  # replaced by the check below (no /etc/passwd entries to compare)
        if self.coursedir.course_id == '':
            self.fail("No course id specified. Re-run with --course flag.")
        self.course_path = os.path.join(self.root, self.coursedir.course_id)
        self.inbound_path = os.path.join(self.course_path, 'inbound')
        if not os.path.isdir(self.inbound_path):
            self.fail("Course not found: {}".format(self.inbound_path))
        if not os.access(self.inbound_path, os.R_OK | os.X_OK):
            self.fail("You don't have read permissions for the directory: {}".format(self.inbound_path))
        student_id = self.coursedir.student_id if self.coursedir.student_id else '*'
        pattern = os.path.join(self.inbound_path, '{}+{}+*'.format(student_id, self.coursedir.assignment_id))
        records = []
        for path in glob.glob(pattern):
            record = self._path_to_record(path)
            st = os.lstat(path)
            expected = registry.get(record['username'])
            if not stat.S_ISDIR(st.st_mode):
                self.log.error("Skipping %s: not a folder", path)
            elif expected is None:
                self.log.error("Skipping %s: %r is not on the class roster", path, record['username'])
            elif st.st_uid != expected:
                self.log.error("Skipping %s: it claims to be %r's submission but belongs to uid %d, not %r's "
                               "uid %d", path, record['username'], st.st_uid, record['username'], expected)
            else:
                records.append(record)
        groups: dict[str, list] = {}
        for r in records:
            groups.setdefault(r['username'], []).append(r)
        duedate = None
        from nbgrader.api import Gradebook, MissingEntry

        with Gradebook(self.coursedir.db_url, self.coursedir.course_id) as gb:
            try:
                duedate = gb.find_assignment(self.coursedir.assignment_id).duedate
            except MissingEntry:
                duedate = None
        self.duedate = duedate
        self.src_records = []
        for v in groups.values():
            ordered = self._sort_by_timestamp(v)
            if duedate is not None and self.before_duedate:
                before = [r for r in ordered if r['timestamp'] <= duedate]
                ordered = before or ordered
            self.src_records.append(ordered[0])


def _regular_only(log):
    """A copytree ``ignore`` that leaves out symbolic links, FIFOs, sockets and devices (and says so)."""

    def ignore(directory, names):
        skipped = set()
        for name in names:
            path = os.path.join(directory, name)
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                skipped.add(name)
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
                log.error("Not collected: %s is %s", path, kind)
                skipped.add(name)
        return skipped

    return ignore


def _small_file(path: str) -> str | None:
    """The text of a regular file of at most 4 KiB, never following a link; None otherwise."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SMALL_FILE:
        return None
    with open(path, errors="replace") as f:
        return f.read(MAX_SMALL_FILE)


class ReleaseFeedback(_Root, ExchangeReleaseFeedback):
    def _submission_folder(self, student: str) -> str | None:
        """submitted/<name>/<chapter> of the student whose grader id is ``student``."""
        direct = self.coursedir.format_path(self.coursedir.submitted_directory, student, self.coursedir.assignment_id)
        if os.path.isdir(direct):
            return direct
        pattern = self.coursedir.format_path(self.coursedir.submitted_directory, "*", self.coursedir.assignment_id)
        for folder in glob.glob(pattern):
            name = Path(folder).parent.name
            try:
                from autograders.engine.grade import student_id  # the id the grader derived from the name
            except ImportError:
                return None
            if student_id(name)[0] == student:
                return folder
        return None

    def copy_files(self):
        exclude = set(self.coursedir.student_id_exclude.split(',')) if self.coursedir.student_id_exclude else set()
        released = 0
        for folder in sorted(glob.glob(self.src_path)):
            student = Path(folder).parent.name
            if student in exclude or not os.path.isdir(folder):
                continue
            submitted = self._submission_folder(student)
            timestamp = _small_file(os.path.join(folder, "timestamp.txt"))
            secret = _small_file(os.path.join(folder, "submission_secret.txt"))
            if submitted is not None:
                if timestamp is None:
                    timestamp = _small_file(os.path.join(submitted, "timestamp.txt"))
                if secret is None:
                    secret = _small_file(os.path.join(submitted, "submission_secret.txt"))
            if secret is None or not SECRET_RE.match(secret.strip()):
                self.log.error("No feedback released for %r on %s: no valid submission_secret.txt in %s or in "
                               "the collected submission (was it collected with `nbgrader collect`?)",
                               student, self.coursedir.assignment_id, folder)
                continue
            secret = secret.strip()
            try:
                parse_utc((timestamp or "").strip())
            except Exception:  # noqa: BLE001 - a missing or odd timestamp only shows in the log
                timestamp = "unknown time"
            submitted_names = sorted(Path(p).stem for p in glob.glob(os.path.join(submitted or "/nonexistent",
                                                                                  "*.ipynb")))
            pages = sorted(glob.glob(os.path.join(folder, "*.html")))
            for page in pages:
                if os.path.islink(page) or not os.path.isfile(page):
                    continue
                notebook_id = Path(page).stem
                names = [notebook_id]
                if notebook_id not in submitted_names and len(submitted_names) == 1 and len(pages) == 1:
                    names.append(submitted_names[0])  # the chapter's one notebook, handed in renamed
                for name in names:
                    checksum = notebook_hash(secret=secret, notebook_id=name)
                    tmp = os.path.join(self.dest_path, f"{checksum}-tmp.html")
                    shutil.copyfile(page, tmp)
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, os.path.join(self.dest_path, f"{checksum}.html"))
                    released += 1
                    self.log.info("Released feedback for student '%s' on '%s/%s/%s' (%s)", student,
                                  self.coursedir.course_id, self.coursedir.assignment_id, name, timestamp.strip())
        if not released:
            self.log.warning("No feedback to release in %s", self.src_path)
