"""Merge the gradebooks and reports of a class graded in shards (``grade --shard i/n``) into one.

    python -m autograders.engine.merge --into sqlite:///gradebook.db shard0/gradebook.db shard1/gradebook.db ...
                                       [--out graded/01_self_attention] [--reports shard0/out ...]

A large class is graded by n jobs at once (a Kubernetes Indexed Job, a Slurm array), each running
``python -m autograders.engine.grade --shard i/n --gradebook sqlite:///shard<i>/gradebook.db
--out shard<i>/out``: a stable hash of the student id picks each student's shard, so the shards never
overlap and need not talk to each other. This puts their results together:

* **Gradebooks.** Each SHARD is a gradebook (a file or an ``sqlite:///`` URL) or a shard's folder
  (``gradebook.db`` in it; its reports in it or in ``out/``). The assignment (notebooks and cells) is
  created in the ``--into`` gradebook when it is not there, and must match when it is (same
  notebooks, same graded cells and points: the shards graded the same version). Every graded
  submission is copied with its timestamp, scores and comments; a manual score or comment already in
  the target is kept, as the grader itself keeps one. A student graded in two shards is an error
  (the shards overlap), never a silent choice.
* **Reports.** With ``--out``, each shard's ``grades.csv``, ``results.json`` and ``summary.md`` become
  one of each: the rows of every shard in student order, as one run over the whole class writes them
  (the same CSV, byte for byte), and a summary table rebuilt from the merged results.

``feedback/<student>/`` and ``autograded/<student>/`` need no merging: each student's folders are
written by exactly one shard (on a shared volume, or copied together with ``rsync``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPORTS = ("grades.csv", "results.json", "summary.md")


class MergeError(ValueError):
    """The shards cannot be merged as given (the message says why)."""


@dataclass
class Shard:
    label: str
    db_url: str | None
    reports: Path | None


def _url(path: str | Path) -> str:
    text = str(path)
    return text if text.startswith("sqlite:") else f"sqlite:///{Path(text).resolve()}"


def resolve_shard(arg: str) -> Shard:
    """A gradebook (file or URL) or a shard folder (gradebook.db, reports in it or in out/)."""
    if arg.startswith("sqlite:"):
        return Shard(arg, arg, None)
    path = Path(arg)
    if path.is_dir():
        db = path / "gradebook.db"
        reports = next((d for d in (path, path / "out") if (d / "grades.csv").is_file()), None)
        if not db.is_file() and reports is None:
            raise MergeError(f"{path}: neither a gradebook.db nor reports (grades.csv) in this folder")
        return Shard(str(path), _url(db) if db.is_file() else None, reports)
    if path.is_file():
        return Shard(str(path), _url(path), None)
    raise MergeError(f"{arg}: no such gradebook or shard folder")


# ---------------------------------------------------------------------------------------------
# Gradebooks: read each shard into plain data, check, then write into the target


@dataclass
class NotebookShape:
    grade_cells: dict[str, tuple[float, str]] = field(default_factory=dict)  # name -> (max_score, cell_type)
    task_cells: dict[str, tuple[float, str]] = field(default_factory=dict)
    solution_cells: list[str] = field(default_factory=list)
    source_cells: dict[str, dict] = field(default_factory=dict)


@dataclass
class AssignmentShape:
    duedate: object
    notebooks: dict[str, NotebookShape]

    def graded_cells(self) -> dict[tuple[str, str], float]:
        return {(nb, c): max_score for nb, shape in self.notebooks.items()
                for cells in (shape.grade_cells, shape.task_cells) for c, (max_score, _) in cells.items()}


@dataclass
class SubmissionRecord:
    assignment: str
    student: dict
    timestamp: object
    grades: dict[tuple[str, str], dict]  # (notebook, cell) -> auto/manual score, extra credit, needs_manual_grade
    comments: dict[tuple[str, str], dict]  # (notebook, cell) -> auto_comment, manual_comment
    flagged: dict[str, bool]
    shard: str

    @property
    def graded(self) -> bool:
        return any(g["auto_score"] is not None or g["manual_score"] is not None for g in self.grades.values())


def _shape(assignment) -> AssignmentShape:
    notebooks = {}
    for nb in assignment.notebooks:
        shape = NotebookShape()
        for c in nb.grade_cells:
            shape.grade_cells[c.name] = (float(c.max_score), c.cell_type)
        for c in nb.task_cells:
            shape.task_cells[c.name] = (float(c.max_score), c.cell_type)
        shape.solution_cells = sorted(c.name for c in nb.solution_cells)
        for c in nb.source_cells:
            shape.source_cells[c.name] = {"cell_type": c.cell_type, "locked": c.locked, "source": c.source,
                                          "checksum": c.checksum}
        notebooks[nb.name] = shape
    return AssignmentShape(assignment.duedate, notebooks)


def read_gradebook(url: str, label: str) -> tuple[dict[str, AssignmentShape], list[SubmissionRecord]]:
    from nbgrader.api import Gradebook

    assignments, submissions = {}, []
    with Gradebook(url) as gb:
        for a in gb.assignments:
            assignments[a.name] = _shape(a)
            for sub in a.submissions:
                st = sub.student
                student = {"id": st.id, "first_name": st.first_name, "last_name": st.last_name,
                           "email": st.email, "lms_user_id": st.lms_user_id}
                grades, comments, flagged = {}, {}, {}
                for snb in sub.notebooks:
                    flagged[snb.name] = bool(snb.flagged)
                    for g in snb.grades:
                        grades[(snb.name, g.name)] = {"auto_score": g.auto_score, "manual_score": g.manual_score,
                                                      "extra_credit": g.extra_credit,
                                                      "needs_manual_grade": g.needs_manual_grade}
                    for c in snb.comments:
                        comments[(snb.name, c.name)] = {"auto_comment": c.auto_comment,
                                                        "manual_comment": c.manual_comment}
                submissions.append(SubmissionRecord(a.name, student, sub.timestamp, grades, comments, flagged, label))
    return assignments, submissions


def _same_shape(a: AssignmentShape, b: AssignmentShape) -> bool:
    return set(a.notebooks) == set(b.notebooks) and a.graded_cells() == b.graded_cells()


def check_shards(read: list[tuple[Shard, dict[str, AssignmentShape], list[SubmissionRecord]]]):
    """One shape per assignment across shards; each (assignment, student) graded in one shard only."""
    shapes: dict[str, tuple[AssignmentShape, str]] = {}
    owners: dict[tuple[str, str], str] = {}
    for shard, assignments, subs in read:
        for name, shape in assignments.items():
            if name in shapes and not _same_shape(shapes[name][0], shape):
                raise MergeError(f"assignment {name!r} differs between {shapes[name][1]} and {shard.label} "
                                 "(other notebooks, graded cells or points): were they graded from the same source?")
            shapes.setdefault(name, (shape, shard.label))
        for sub in subs:
            if not sub.graded:
                continue
            key = (sub.assignment, sub.student["id"])
            if key in owners:
                raise MergeError(f"{sub.student['id']!r} was graded on {sub.assignment!r} in both {owners[key]} and "
                                 f"{shard.label}: the shards overlap (run each with its own --shard i/n of one n)")
            owners[key] = shard.label
    return {name: shape for name, (shape, _) in shapes.items()}


def _ensure_assignment(gb, name: str, shape: AssignmentShape) -> None:
    from nbgrader.api import MissingEntry

    try:
        existing = gb.find_assignment(name)
    except MissingEntry:
        existing = None
    if existing is not None and existing.notebooks:
        if not _same_shape(_shape(existing), shape):
            raise MergeError(f"assignment {name!r} in the target gradebook differs from the shards' (other "
                             "notebooks, graded cells or points): merge into a gradebook of the same version")
        return
    gb.update_or_create_assignment(name, duedate=shape.duedate)
    for nb_name, nb in shape.notebooks.items():
        gb.update_or_create_notebook(nb_name, name)
        for cell, (max_score, cell_type) in nb.grade_cells.items():
            gb.update_or_create_grade_cell(cell, nb_name, name, max_score=max_score, cell_type=cell_type)
        for cell, (max_score, cell_type) in nb.task_cells.items():
            gb.update_or_create_task_cell(cell, nb_name, name, max_score=max_score, cell_type=cell_type)
        for cell in nb.solution_cells:
            gb.update_or_create_solution_cell(cell, nb_name, name)
        for cell, attrs in nb.source_cells.items():
            gb.update_or_create_source_cell(cell, nb_name, name, **attrs)


def write_submission(gb, sub: SubmissionRecord) -> None:
    from nbgrader.api import MissingEntry

    student = dict(sub.student)
    sid = student.pop("id")
    try:
        existing = gb.find_student(sid)
        for k, v in student.items():
            if v is not None and getattr(existing, k) is None:
                setattr(existing, k, v)
    except MissingEntry:
        gb.add_student(sid, **{k: v for k, v in student.items() if v is not None})
    try:
        submission = gb.find_submission(sub.assignment, sid)
    except MissingEntry:
        submission = gb.add_submission(sub.assignment, sid)
    if sub.timestamp is not None:
        submission.timestamp = sub.timestamp
    for (nb, cell), g in sub.grades.items():
        grade = gb.find_grade(cell, nb, sub.assignment, sid)
        grade.auto_score = g["auto_score"]
        kept_manual = grade.manual_score is not None
        if not kept_manual:
            grade.manual_score = g["manual_score"]
        if grade.extra_credit is None:
            grade.extra_credit = g["extra_credit"]
        grade.needs_manual_grade = True if kept_manual else bool(g["needs_manual_grade"])
    for (nb, cell), c in sub.comments.items():
        comment = gb.find_comment(cell, nb, sub.assignment, sid)
        comment.auto_comment = c["auto_comment"]
        if comment.manual_comment is None:
            comment.manual_comment = c["manual_comment"]
    for nb, flagged in sub.flagged.items():
        if flagged:
            gb.find_submission_notebook(nb, sub.assignment, sid).flagged = True
    gb.db.commit()


def merge_gradebooks(into: str, shards: list[Shard]) -> list[SubmissionRecord]:
    """Copy every shard's assignments and graded submissions into ``into``; returns what was copied."""
    import os

    from nbgrader.api import Gradebook
    from sqlalchemy.exc import SAWarning

    target_path = into[len("sqlite:///"):] if into.startswith("sqlite:///") else None
    read = []
    for shard in shards:
        if shard.db_url is None:
            continue
        path = shard.db_url[len("sqlite:///"):] if shard.db_url.startswith("sqlite:///") else None
        if path and target_path and os.path.exists(target_path) and os.path.samefile(path, target_path):
            raise MergeError(f"{shard.label} is the target gradebook itself")
        read.append((shard, *read_gradebook(shard.db_url, shard.label)))
    shapes = check_shards(read)
    # nbgrader's Gradebook runs `alembic` from PATH: the environment's bin/ must be on it
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if target_path:
        Path(target_path).parent.mkdir(parents=True, exist_ok=True)
    copied = []
    with warnings.catch_warnings(), Gradebook(into) as gb:
        warnings.simplefilter("ignore", SAWarning)  # nbgrader's add_submission, as in `nbgrader autograde`
        for name, shape in shapes.items():
            _ensure_assignment(gb, name, shape)
        for _shard, _assignments, subs in read:
            for sub in subs:
                if sub.graded:
                    write_submission(gb, sub)
                    copied.append(sub)
    return copied


# ---------------------------------------------------------------------------------------------
# Reports


def merge_reports(folders: list[Path], out: Path) -> dict:
    """One grades.csv, results.json and summary.md from each shard's; returns the merged results."""
    from autograders.engine.grade import ExerciseResult, StudentResult, summary_table

    header: list[str] | None = None
    rows: dict[str, list[str]] = {}
    source_of: dict[str, str] = {}
    students: dict[str, dict] = {}
    meta: dict[str, list] = {"chapter": [], "sandbox": [], "warning": [], "caps": []}
    for folder in folders:
        missing = [n for n in REPORTS if not (folder / n).is_file()]
        if missing:
            raise MergeError(f"{folder}: missing {', '.join(missing)} (not a grader's --out folder?)")
        with open(folder / "grades.csv", newline="") as f:
            table = list(csv.reader(f))
        if not table:
            raise MergeError(f"{folder}/grades.csv is empty")
        if header is None:
            header = table[0]
        elif table[0] != header:
            raise MergeError(f"{folder}/grades.csv has other columns than {source_of.get('header', folders[0])}: "
                             f"{table[0]} vs {header}")
        source_of.setdefault("header", str(folder))
        for row in table[1:]:
            if row[0] in rows:
                raise MergeError(f"{row[0]!r} is in both {source_of[row[0]]} and {folder}: the shards overlap")
            rows[row[0]] = row
            source_of[row[0]] = str(folder)
        results = json.loads((folder / "results.json").read_text())
        for key in meta:
            if results.get(key) not in meta[key]:
                meta[key].append(results.get(key))
        for s in results.get("students", []):
            students[s["student"]] = s
    if header is None:
        raise MergeError("no reports to merge")
    if len(meta["chapter"]) != 1:
        raise MergeError(f"the shards graded different chapters: {meta['chapter']}")
    if set(students) != set(rows):
        raise MergeError("grades.csv and results.json of the shards name different students")
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)  # the grader's own dialect: the same bytes as one run over the class
    writer.writerow(header)
    for student in sorted(rows):
        writer.writerow(rows[student])
    (out / "grades.csv").write_bytes(buffer.getvalue().encode())

    def one(key):
        values = [v for v in meta[key] if v is not None]
        if not values:
            return None
        return values[0] if len(values) == 1 else ("; ".join(map(str, values)) if key != "caps" else values)

    merged = {"chapter": meta["chapter"][0], "sandbox": one("sandbox"), "warning": one("warning"), "caps": one("caps"),
              "students": [students[s] for s in sorted(students)], "merged_from": [str(f) for f in folders]}
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    names = header[2:-2]  # student_id, assignment, <exercises>, score, max_score
    maximum = max((float(row[-1]) for row in rows.values()), default=0.0)
    results = []
    for s in merged["students"]:
        ex = s.get("exercises", {})
        results.append(StudentResult(
            s["student"], [ExerciseResult(n, float(ex[n]["points"]), float(ex[n]["max_points"]), list(ex[n]["reasons"]),
                                          []) for n in names], list(s.get("notes", [])), float(s.get("seconds", 0.0)),
            {}, s.get("submitted_as")))
    (out / "summary.md").write_text(summary_table(results, names, maximum, merged["warning"]))
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autograders.engine.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", nargs="+", help="each shard's gradebook (file or sqlite:/// URL) or folder")
    p.add_argument("--into", required=True, help="the gradebook to merge into, e.g. sqlite:///gradebook.db "
                                                 "(created if missing; existing records are updated)")
    p.add_argument("--out", type=Path, help="write the merged grades.csv, results.json and summary.md here")
    p.add_argument("--reports", type=Path, action="append", default=[],
                   help="a shard's report folder (grades.csv, results.json, summary.md), if not in a shard folder")
    args = p.parse_args(argv)
    try:
        shards = [resolve_shard(a) for a in args.shards]
        into = _url(args.into)
        copied = merge_gradebooks(into, shards)
        folders = [s.reports for s in shards if s.reports is not None] + list(args.reports)
        line = f"merged {len(copied)} graded submission(s) from {len(shards)} shard(s) into {into}"
        if args.out is not None:
            if not folders:
                raise MergeError("--out given, but no shard has reports (grades.csv): add --reports DIR")
            merged = merge_reports(folders, args.out)
            line += f"; {len(merged['students'])} student(s) in {args.out}/grades.csv, results.json, summary.md"
        elif folders:
            line += f" (reports of {len(folders)} shard(s) not merged: no --out)"
    except MergeError as exc:
        print(f"merge: {exc}", file=sys.stderr)
        return 2
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
