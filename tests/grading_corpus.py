"""An adversarial corpus of chapter-01 submissions, generated in code from the release and the solution.

Each kind is a notebook (or raw bytes for broken files) and the points it must get per exercise.
Nothing here is an .ipynb file in tests/ (pytest --nbval-lax would execute it).
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "01_self_attention"
NOTEBOOK = "self_attention.ipynb"
POINTS = {"test_stable_softmax": 2, "test_scaled_scores": 1, "test_attention_loop": 2,
          "test_attention_matrix": 2, "test_SelfAttention": 3}
FULL = dict(POINTS)
ZERO = {k: 0 for k in POINTS}
# Chapter 01 cells that are slow and not needed for grading (demos, training): the instructor source
# should tag them `skip-in-grading`; the tests tag them in a temporary copy.
SKIP_IN_GRADING = ("c010", "c021", "c026", "c028", "c030")
SECRET = "grader-secret-4f7a9c"  # set in the grader's environment by the test; must never leak


def but(**zeroed) -> dict:
    out = dict(FULL)
    for k in zeroed:
        out[f"test_{k}"] = 0
    return out


@dataclass
class Kind:
    name: str
    expected: dict
    notebook: nbformat.NotebookNode | None = None
    raw: bytes | None = None
    needs_isolation: bool = False  # only safe to run inside namespaces (fork bomb)
    description: str = ""


def release() -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "chapters" / CHAPTER / NOTEBOOK, as_version=4)


def source() -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "solutions" / CHAPTER / NOTEBOOK, as_version=4)


def solved() -> nbformat.NotebookNode:
    answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in source().cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    nb = release()
    for c in nb.cells:
        if c.metadata.get("nbgrader", {}).get("solution"):
            c.source = answers[c.metadata["nbgrader"]["grade_id"]]
    return nb


def _index(nb, grade_id: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def set_answer(nb, grade_id: str, code: str):
    nb.cells[_index(nb, grade_id)].source = code
    return nb


def append_to_answer(nb, grade_id: str, code: str):
    nb.cells[_index(nb, grade_id)].source += "\n" + code
    return nb


def insert_after(nb, grade_id: str, code: str):
    nb.cells.insert(_index(nb, grade_id) + 1, nbformat.v4.new_code_cell(code))
    return nb


def insert_after_setup(nb, code: str):
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(first_code + 1, nbformat.v4.new_code_cell(code))
    return nb


WRONG_MODULE = '''class SelfAttention(nn.Module):
    """Wrong on purpose: no 1/sqrt(d) scale."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, mask=None):
        scores = self.W_q(x) @ self.W_k(x).transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return weights @ self.W_v(x), weights
'''

LYING_MODULE = '''class Liar(torch.Tensor):
    """A tensor that says it equals anything."""
    def __eq__(self, other): return True
    def allclose(self, *a, **k): return True
    def numpy(self, *a, **k):
        import numpy
        return numpy.zeros(self.shape, dtype="float32")
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("allclose", "equal", "eq"):
            return True
        return super().__torch_function__(func, types, args, kwargs or {})


class SelfAttention(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, mask=None):
        B, T, _ = x.shape
        return torch.zeros(B, T, x.shape[-1]).as_subclass(Liar), torch.zeros(B, T, T).as_subclass(Liar)
'''

ALWAYS_EQUAL = '''class AlwaysEqual:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    shape = property(lambda self: None)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, mask=None):
        return AlwaysEqual(), AlwaysEqual()
'''


def corpus(gradebook_path: str, repo_file: str) -> list[Kind]:
    """Every kind of submission. ``gradebook_path`` and ``repo_file`` are real paths the attacks aim at."""
    k: list[Kind] = []

    def add(name, expected, nb=None, raw=None, **kw):
        k.append(Kind(name, expected, nb, raw, **kw))

    add("correct", FULL, solved())
    add("untouched_stub", ZERO, release())
    add("wrong_answer", but(SelfAttention=0), set_answer(solved(), "SelfAttention", WRONG_MODULE))

    def wrong_plus(code, where="setup"):
        nb = set_answer(solved(), "SelfAttention", WRONG_MODULE)
        return insert_after_setup(nb, code) if where == "setup" else insert_after(nb, where, code)

    add("patch_torch_allclose", but(SelfAttention=0),
        wrong_plus("torch.allclose = lambda *a, **k: True\ntorch.Tensor.allclose = lambda *a, **k: True"))
    add("patch_np_allclose", but(SelfAttention=0),
        wrong_plus("import numpy as np\nnp.allclose = lambda *a, **k: True\nnp.array_equal = lambda *a, **k: True\n"
                   "np.all = lambda *a, **k: True"))
    add("patch_assert_close", but(SelfAttention=0),
        wrong_plus("import torch.testing\ntorch.testing.assert_close = lambda *a, **k: None"))
    add("patch_builtins", but(SelfAttention=0),
        wrong_plus("import builtins\nbuiltins.all = lambda *a: True\nbuiltins.any = lambda *a: False\n"
                   "builtins.AssertionError = type('Nope', (Exception,), {})"))
    add("patch_check_module", but(SelfAttention=0), wrong_plus(
        "import autograders.engine.core as core\nfrom autograders import self_attention as ag\n"
        "core._close = lambda *a, **k: True\ncore._compare = lambda *a, **k: None\n"
        "core.judge = lambda check, produced, seed, hidden: core.Report(check.name, seed, ())\n"
        "core.CheckSet.check = lambda *a, **k: None\nag.check = lambda *a, **k: None"))
    add("lying_tensor_subclass", but(SelfAttention=0), set_answer(solved(), "SelfAttention", LYING_MODULE))
    add("always_equal_object", but(SelfAttention=0), set_answer(solved(), "SelfAttention", ALWAYS_EQUAL))
    add("input_transformer", but(SelfAttention=0), wrong_plus(
        "ip = get_ipython()\nip.input_transformers_cleanup.append("
        "lambda lines: [] if any('ag.check' in l for l in lines) else lines)\n"
        "ip.input_transformers_post.append(lambda lines: lines)", where="test_attention_matrix"))

    nb = set_answer(solved(), "SelfAttention", WRONG_MODULE)
    for c in nb.cells:
        if c.metadata.get("nbgrader", {}).get("grade_id", "").startswith("test_"):
            c.source = "print('PASS: all cases correct')"
    add("edited_test_cells", but(SelfAttention=0), nb)

    nb = set_answer(solved(), "SelfAttention", WRONG_MODULE)
    nb.cells = [c for c in nb.cells if not c.metadata.get("nbgrader", {}).get("grade_id", "").startswith("test_")]
    add("deleted_test_cells", but(SelfAttention=0), nb)

    nb = solved()
    for c in nb.cells:
        c.metadata.pop("nbgrader", None)
        c.id = uuid.uuid4().hex[:8]
    add("stripped_metadata_correct", FULL, nb)

    nb = set_answer(solved(), "SelfAttention", WRONG_MODULE)
    for c in nb.cells:  # claims the test cells are ordinary cells and an answer is a test cell
        c.metadata.pop("nbgrader", None)
    nb.cells[_index(solved(), "stable_softmax")].metadata["nbgrader"] = {"grade": True, "solution": False}
    add("forged_metadata", but(SelfAttention=0), nb)

    steal = f'''import glob, os
found = []
for pattern in ["{ROOT}/solutions/**/*.ipynb", "/work/**/solutions/**/*.ipynb", "{gradebook_path}",
                "/root/**/*.ipynb", "/proc/1/environ", "/proc/*/cmdline"]:
    for path in glob.glob(pattern, recursive=True):
        try:
            found.append((path, open(path, "rb").read(200000)))
        except OSError:
            pass
import json
for path, data in found:
    if path.endswith(".ipynb") and b"BEGIN SOLUTION" in data:
        nb = json.loads(data)
        for cell in nb["cells"]:
            if cell.get("metadata", {{}}).get("nbgrader", {{}}).get("grade_id") == "SelfAttention":
                exec("".join(cell["source"]))
'''
    nb = set_answer(solved(), "SelfAttention", "class SelfAttention(nn.Module):\n    pass\n")
    add("read_solutions_from_disk", but(SelfAttention=0), insert_after(nb, "SelfAttention", steal))

    write_db = f'''import sqlite3
for path in ["{gradebook_path}", "gradebook.db", "../gradebook.db"]:
    try:
        con = sqlite3.connect(path)
        con.execute("UPDATE grade SET auto_score = 99, manual_score = 99")
        con.execute("UPDATE grade_cells SET max_score = 1")
        con.commit()
    except Exception as exc:
        print("no gradebook:", exc)
'''
    add("write_gradebook", but(SelfAttention=0), wrong_plus(write_db, where="test_scaled_scores"))

    write_out = f'''import os
for path in ["{repo_file}", "/usr/lib/evil", "/etc/evil", "{ROOT}/evil.txt", "/root/evil.txt"]:
    try:
        with open(path, "a") as f:
            f.write("\\nCHECKS = None  # pwned\\n")
        print("wrote", path)
    except OSError as exc:
        print("cannot write", path, exc)
'''
    add("write_outside_scratch", but(SelfAttention=0), wrong_plus(write_out, where="test_stable_softmax"))

    add("os_exit_between", FULL, insert_after(solved(), "test_attention_loop", "import os\nos._exit(0)"))
    add("os_exit_in_answer", but(attention_matrix=0),
        append_to_answer(solved(), "attention_matrix", "import os\nos._exit(3)"))
    add("sys_exit_in_answer", FULL, append_to_answer(solved(), "SelfAttention", "import sys\nsys.exit(1)"))
    add("segfault", FULL, insert_after(solved(), "test_scaled_scores", "import ctypes\nctypes.string_at(0)"))
    add("infinite_loop", FULL, insert_after(solved(), "test_stable_softmax", "while True:\n    pass"))
    add("ignores_sigint_in_answer", but(SelfAttention=0), append_to_answer(
        solved(), "SelfAttention",
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.01)"))
    add("memory_bomb", FULL, insert_after(
        solved(), "test_attention_loop",
        "hog = []\nwhile True:\n    hog.append(bytearray(200 * 2**20))"))
    add("fork_bomb", FULL, insert_after(
        solved(), "test_scaled_scores",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
        needs_isolation=True)
    add("output_flood", FULL, insert_after(
        solved(), "test_attention_matrix",
        "import os, sys\nfor _ in range(200_000):\n    print('x' * 1000)\n    print('y' * 1000, file=sys.stderr)\n"
        "for _ in range(2_000):\n    os.write(1, b'z' * 100_000)"))
    nb = solved()
    for gid in ("stable_softmax", "scaled_scores", "attention_loop", "attention_matrix", "SelfAttention"):
        append_to_answer(nb, gid, "import sys, warnings\nprint('noise on stderr', file=sys.stderr)\n"
                                  "warnings.warn('a warning around a correct answer')")
    add("stderr_noise_correct", FULL, nb)
    add("invalid_json", ZERO, raw=b'{"cells": [ {"cell_type": "code", "source": "x = 1"')
    add("empty_file", ZERO, raw=b"")
    add("not_a_notebook_json", ZERO, raw=json.dumps({"hello": "world"}).encode())
    add("reads_grader_environment", FULL, append_to_answer(
        solved(), "SelfAttention",
        "import os\nprint('ENVIRONMENT', dict(os.environ))\n"
        "if os.environ.get('GRADER_SECRET') or any('secret' in v for v in os.environ.values()):\n"
        "    del SelfAttention  # only a leaked environment costs points"))
    nb = copy.deepcopy(solved())
    insert_after_setup(nb, "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
                           "    print('network reachable')\nexcept OSError as exc:\n    print('no network', exc)")
    add("network_attempt", FULL, nb)
    k += wider_corpus()
    return k


# ---------------------------------------------------------------------------------------------
# The wider attack: whatever runs in the sandbox tries to make up its own results


FRAME = """
import json as _json, os as _os, struct as _struct
def _frame(header, blobs=()):
    head = _json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    body = _struct.pack(">I", len(head)) + head + b"".join(blobs)
    return _struct.pack(">I", len(body)) + body
def _pipes():
    out = []
    for fd in range(3, 64):
        try:
            if _os.path.basename(_os.readlink(f"/proc/self/fd/{fd}")).startswith("pipe:"):
                out.append(fd)
        except OSError:
            pass
    return out
"""

STEAL_REFERENCE = '''def stable_softmax(scores, dim=-1):
    import importlib
    for name in ("autograders.self_attention", "autograders.harness.self_attention"):
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        check = getattr(mod, "CHECKS", None) or getattr(mod, "TASKS", None)
        for obj in vars(mod).values():
            ref = getattr(obj, "reference", None)
            if callable(ref):
                return ref({"scores": scores, "dim": dim})
    raise RuntimeError("no reference in reach")
'''

PATCH_HARNESS = '''import torch
import autograders.engine.core as core
import autograders.harness.self_attention as H
# make every task trivial, and produce() claim zeros for every case
for task in H.TASKS.tasks.values():
    object.__setattr__(task, "call", lambda impl, inputs: torch.zeros(1))
_real = core.produce
def _fake(task, impl, seed, hidden, **kw):
    return {c.name: core.Produced((core.np.zeros(1, dtype="float32"),)) for c in task.cases}
core.produce = _fake
'''

FORGE_RECORDS = FRAME + '''import numpy as _np, io as _io
def _npy(a):
    buf = _io.BytesIO(); _np.save(buf, a, allow_pickle=False); return buf.getvalue()
for fd in _pipes():
    for ex, check in [("test_stable_softmax", "stable_softmax"), ("test_SelfAttention", "SelfAttention"),
                      ("test_scaled_scores", "scaled_scores")]:
        cases = {f"case {i}": {"error": None, "kind": "error", "arrays": [0]} for i in range(10)}
        try:
            _os.write(fd, _frame({"t": "record", "exercise": ex, "checks": {check: {"cases": cases}}},
                                 [_npy(_np.zeros((2, 3), _np.float32))]))
            _os.write(fd, _frame({"t": "step", "step": "end"}))
        except OSError:
            pass
'''

HUGE_FRAME = FRAME + '''for fd in _pipes():
    try:
        _os.write(fd, _struct.pack(">I", 2**31 - 1) + b"\\0" * 65536)
    except OSError:
        pass
'''

ORACLE_ABUSE = FRAME + '''def stable_softmax(scores, dim=-1):
    """Ask the grader's given-function channel for the answer to this very exercise."""
    import numpy as _np, io as _io
    buf = _io.BytesIO(); _np.save(buf, scores.numpy(), allow_pickle=False)
    pipes = _pipes()
    tree = {"seq": [{"seq": [{"tensor": 0, "dtype": "float32"}, {"v": dim}], "tuple": True},
                    {"seq": [], "tuple": True}], "tuple": True}
    _os.write(pipes[0], _frame({"t": "call", "name": "stable_softmax", "value": tree}, [buf.getvalue()]))
    size = _struct.unpack(">I", _os.read(pipes[1], 4))[0]
    body = _os.read(pipes[1], size)
    hsize = _struct.unpack(">I", body[:4])[0]
    head = _json.loads(body[4:4 + hsize])
    if "error" in head:
        raise RuntimeError(head["error"])
    return torch.from_numpy(_np.load(_io.BytesIO(body[4 + hsize:])))
'''

SLEEP_AND_FORGE_PROGRESS = FRAME + '''import time as _time
_end = _time.monotonic() + 150
while _time.monotonic() < _end:
    for fd in _pipes():
        try:
            _os.write(fd, _frame({"t": "step", "step": "cell 0"}))
            _os.write(fd, _frame({"t": "step", "step": "ready"}))
        except OSError:
            pass
    _time.sleep(0.5)
'''

SCRATCH_LINKS = '''import os
for name, target in [("progress", "/proc/self/environ"), ("student.log", "/etc/passwd"),
                     ("test_SelfAttention.npz", "/dev/zero"), ("job.json", "/proc/1/environ")]:
    for folder in ("/scratch", "/tmp", "."):
        try:
            os.symlink(target, os.path.join(folder, name))
        except OSError:
            pass
try:
    os.mkfifo("/scratch/test_stable_softmax.json")
except OSError:
    pass
'''

DISK_FILL = '''import os
chunk = b"x" * (4 << 20)
for folder in ("/scratch", "/tmp", "."):
    for i in range(2000):
        try:
            with open(os.path.join(folder, f"fill{i}"), "wb") as f:
                f.write(chunk)
        except OSError:
            break
'''

MANY_PROCESS_MEMORY = '''import os, time
kids = []
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        try:
            hog = bytearray(1500 * 2**20)
            for i in range(0, len(hog), 4096):
                hog[i] = 1
            time.sleep(5)
        finally:
            os._exit(0)
    kids.append(pid)
for pid in kids:
    try:
        os.waitpid(pid, 0)
    except OSError:
        pass
'''

FORGED_OUTPUT_TEXT = "[grader] PASS SelfAttention: all 5 case(s) correct -- Score: 10 / 10"


def wider_corpus() -> list[Kind]:
    k: list[Kind] = []

    def add(name, expected, nb=None, raw=None, **kw):
        k.append(Kind(name, expected, nb, raw, **kw))

    # a cell that takes seconds of CPU: on a loaded machine it exceeds the wall limit, never the CPU limit
    add("slow_untagged_cell", FULL, insert_after(solved(), "test_scaled_scores",
                                                 "import time\n_t = time.process_time()\n"
                                                 "while time.process_time() - _t < 3.0:\n    pass"))
    add("stub_steals_reference", but(stable_softmax=0), set_answer(solved(), "stable_softmax", STEAL_REFERENCE))
    add("stub_patches_harness", ZERO, insert_after_setup(release(), PATCH_HARNESS))
    # sabotaging the sandbox's own copy of the tasks costs the saboteur every exercise produced after it
    add("wrong_patches_harness", but(scaled_scores=0, attention_loop=0, attention_matrix=0, SelfAttention=0),
        insert_after(set_answer(solved(), "SelfAttention", WRONG_MODULE), "stable_softmax", PATCH_HARNESS))
    add("stub_forges_records", ZERO, insert_after_setup(release(), FORGE_RECORDS))
    add("correct_then_forged_records", FULL, insert_after(solved(), "test_attention_matrix", FORGE_RECORDS))
    add("huge_frame", FULL, insert_after(solved(), "test_attention_matrix", HUGE_FRAME))
    add("oracle_abuse", but(stable_softmax=0), set_answer(solved(), "stable_softmax", ORACLE_ABUSE))
    add("sleeps_and_forges_progress", FULL, insert_after(solved(), "test_stable_softmax", SLEEP_AND_FORGE_PROGRESS))
    add("links_and_fifos_in_scratch", FULL, insert_after(solved(), "test_scaled_scores", SCRATCH_LINKS))
    add("disk_fill", FULL, insert_after(solved(), "test_scaled_scores", DISK_FILL))
    add("many_process_memory", FULL, insert_after(solved(), "test_scaled_scores", MANY_PROCESS_MEMORY),
        needs_isolation=True)

    # stored outputs that look like the grader's verdict
    add("forged_outputs_on_a_stub", ZERO, _with_outputs(release()))

    nb = solved()
    at = _index(nb, "SelfAttention")
    nb.cells[at:at] = [nbformat.v4.new_code_cell(f"_filler_{i} = {i}") for i in range(8000)]
    add("eight_thousand_cells", FULL, nb)

    add("huge_cell", FULL, insert_after(solved(), "test_stable_softmax",
                                        "# " + "x" * 2_000_000 + "\n" + "z = 1\n" * 200_000))
    nb = append_to_answer(solved(), "scaled_scores", "# ### BEGIN SOLUTION\n# ### END SOLUTION\n"
                                                       "# ### BEGIN HIDDEN TESTS\n# ### END HIDDEN TESTS")
    add("nbgrader_markers_in_comments", FULL, nb)
    raw = json.loads(nbformat.writes(solved()))
    raw["cells"].insert(1, {"cell_type": "code", "id": "not a valid id!!", "metadata": {}, "source": "pass",
                            "outputs": [], "execution_count": None})
    add("invalid_cell_id", FULL, raw=json.dumps(raw).encode())
    add("wrong_softmax_costs_only_softmax", but(stable_softmax=0), set_answer(
        solved(), "stable_softmax", "def stable_softmax(scores, dim=-1):\n"
                                    "    e = torch.exp(scores - scores.max())\n    return e / e.sum()\n"))
    add("forbidden_torch_softmax", but(stable_softmax=0), set_answer(
        solved(), "stable_softmax", "def stable_softmax(scores, dim=-1):\n    return torch.softmax(scores, dim=dim)\n"))
    return k


def _with_outputs(nb):
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs = [nbformat.v4.new_output("stream", name="stdout", text=FORGED_OUTPUT_TEXT + "\n")]
    return nb


def write(kind: Kind, folder: Path) -> Path:
    """A flat-layout submission file <kind>.ipynb."""
    path = folder / f"{kind.name}.ipynb"
    if kind.raw is not None:
        path.write_bytes(kind.raw)
    else:
        nbformat.write(kind.notebook, path)
    return path
