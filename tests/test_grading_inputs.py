"""What the grader reads is hostile: submissions on disk, and every byte that comes out of the sandbox.

Fast tests of the pieces (no sandbox run): names, links, FIFOs, odd notebooks, the frame reader, the
array decoder, the rules that watch how an answer is computed, hidden-case messages.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autograders.engine import core, grade, protocol
from autograders.engine.core import Blob, Case, Check, Forbid, Require, Tolerance, decode_array, encode_array, randn

NB = "self_attention.ipynb"
TOL = Tolerance(1e-6, 1e-6, "test")


def _nb(cells=None) -> str:
    return json.dumps({"cells": cells or [{"cell_type": "code", "id": "a1", "metadata": {}, "source": "x = 1",
                                           "outputs": [], "execution_count": None}],
                       "metadata": {}, "nbformat": 4, "nbformat_minor": 5})


# --- student names ------------------------------------------------------------------------------

def test_plain_names_are_their_own_ids():
    assert grade.student_id("alice_01") == ("alice_01", False)
    assert grade.student_id("bob.smith@uni") == ("bob.smith@uni", False)


@pytest.mark.parametrize("a,b", [("ann smith", "ann_smith"), ("jos\u00e9", "jos\u0438"), ("Zo\u00eb", "Zoe_"),
                                 ("..", "_"), ("a/b", "a_b")])
def test_names_that_clean_to_the_same_text_stay_apart(a, b):
    ids = {grade.student_id(a)[0], grade.student_id(b)[0]}
    assert len(ids) == 2
    for sid in ids:
        assert sid not in (".", "..") and "/" not in sid and set(sid) <= grade._ID_CHARS


def test_a_class_with_colliding_names_keeps_every_submission(tmp_path):
    for name in ("ann smith", "ann_smith", "jos\u00e9", "jos\u0438", "..x"):
        (tmp_path / f"{name}.ipynb").write_text(_nb())
    subs = grade.find_submissions(tmp_path, "01_self_attention", [NB])
    assert len(subs) == 5 and len({s.student for s in subs}) == 5
    renamed = [s for s in subs if s.original]
    assert {s.original for s in renamed} == {"ann smith", "jos\u00e9", "jos\u0438", "..x"}
    assert all(s.notes for s in renamed)


# --- links, FIFOs, odd files ----------------------------------------------------------------------

def test_links_and_fifos_are_never_followed_or_opened(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    subs_dir = tmp_path / "subs"
    (subs_dir / "real" / "01_self_attention").mkdir(parents=True)
    (subs_dir / "real" / "01_self_attention" / NB).write_text(_nb())
    (subs_dir / "linkfile" / "01_self_attention").mkdir(parents=True)
    os.symlink(secret, subs_dir / "linkfile" / "01_self_attention" / NB)
    os.symlink(subs_dir / "real", subs_dir / "linkdir")
    (subs_dir / "fifo" / "01_self_attention").mkdir(parents=True)
    os.mkfifo(subs_dir / "fifo" / "01_self_attention" / NB)
    os.symlink(secret, subs_dir / "flat.ipynb")
    os.mkfifo(subs_dir / "flatfifo.ipynb")
    done = []

    def find():
        done.append(grade.find_submissions(subs_dir, "01_self_attention", [NB]))

    t = threading.Thread(target=find, daemon=True)
    t.start()
    t.join(20)
    assert done, "reading the submissions hung (a FIFO was opened)"
    subs = {s.student: s for s in done[0]}
    assert subs["real"].problem is None
    for name in ("linkfile", "linkdir", "fifo", "flat", "flatfifo"):
        assert subs[name].problem and not subs[name].files, name
        assert "TOP SECRET" not in subs[name].problem
    assert "symbolic link" in subs["linkdir"].problem and "FIFO" in subs["fifo"].problem


def test_read_notebook_refuses_links_fifos_and_garbage(tmp_path):
    good = tmp_path / "good.ipynb"
    good.write_text(_nb())
    os.symlink(good, tmp_path / "link.ipynb")
    os.mkfifo(tmp_path / "fifo.ipynb")
    (tmp_path / "empty.ipynb").write_bytes(b"")
    (tmp_path / "junk.ipynb").write_bytes(b"\x00\xff{{{")
    (tmp_path / "list.ipynb").write_text("[1, 2]")
    assert grade.read_notebook(good)[1] is None
    for name in ("link", "fifo", "empty", "junk", "list"):
        nb, why = grade.read_notebook(tmp_path / f"{name}.ipynb")
        assert nb is None and why, name


def test_odd_cell_ids_and_markers_are_normalised(tmp_path):
    cells = [{"cell_type": "code", "id": "bad id with spaces!", "metadata": {}, "source": "# ### BEGIN SOLUTION\nx=1"},
             {"cell_type": "code", "id": "a" * 200, "metadata": {"nbgrader": "not a dict"}, "source": ["y", "=2"]},
             {"cell_type": "markdown", "metadata": {}, "source": "### BEGIN HIDDEN TESTS"}]
    p = tmp_path / "odd.ipynb"
    p.write_text(_nb(cells))
    nb, why = grade.read_notebook(p)
    assert why is None
    import nbformat

    nbformat.validate(nb)
    assert nb.cells[1].source == "y=2"


def test_defines_is_linear_on_a_huge_cell():
    import time

    src = "x" * 200_000 + "\n" + "def stable_softmax(s, dim=-1):\n    return s\n"
    start = time.monotonic()
    assert core.defines(src, ["stable_softmax"])
    assert not core.defines("a = 'stable_softmax = 1'\n" * 10_000, ["stable_softmax"])
    assert time.monotonic() - start < 5


def test_shorten_cuts_at_a_word():
    text = "alpha beta gamma delta " * 20
    out = grade.shorten(text, 50)
    assert out.endswith(" …") and len(out) <= 52 and out[:-2].split()[-1] in ("alpha", "beta", "gamma", "delta")


# --- the channel out of the sandbox ---------------------------------------------------------------

def _reader_of(data: bytes, **kw):
    r, w = os.pipe()
    threading.Thread(target=lambda: (os.write(w, data), os.close(w)), daemon=True).start()
    return protocol.FrameReader(r, **kw)


def test_frames_round_trip():
    r, w = os.pipe()
    protocol.write_frame(w, {"t": "step", "step": "cell 1"}, [b"abc", b""])
    os.close(w)
    header, blobs = protocol.FrameReader(r).read()
    assert header["step"] == "cell 1" and blobs == [b"abc", b""]


@pytest.mark.parametrize("data", [
    struct.pack(">I", 2**31) + b"x" * 10,  # a frame claiming 2 GiB
    struct.pack(">I", 8) + struct.pack(">I", 100) + b"abcd",  # header larger than the frame
    struct.pack(">I", 9) + struct.pack(">I", 5) + b"notjs",  # not JSON
    struct.pack(">I", 14) + struct.pack(">I", 10) + b'{"sizes":9}',
])
def test_malformed_frames_are_refused_without_allocating(data):
    with pytest.raises((protocol.ProtocolError, EOFError)):
        _reader_of(data, max_frame=1 << 20).read()


def test_array_decoder_checks_the_header_before_the_data():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    blob = Blob(encode_array(a))
    np.testing.assert_array_equal(decode_array(blob, a), a)
    wrong = decode_array(Blob(encode_array(np.zeros((2**20,), np.float32))), a)  # shape only, no data kept
    assert wrong.shape == (2**20,) and isinstance(wrong, core._ShapeOnly)
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="plain number"):
        decode_array(Blob(buf.getvalue()))
    huge_header = encode_array(np.zeros((4,), np.float32))
    forged = huge_header.replace(b"(4,)", b"(10000000000,)".ljust(4)[:4]) if False else huge_header[:-8]
    with pytest.raises(ValueError, match="does not match"):
        decode_array(Blob(forged))
    with pytest.raises(ValueError):
        decode_array(Blob(b"\x93NUMPY garbage"))


def test_scalars_and_odd_layouts_cross_the_boundary_unchanged():
    for a in (np.array(3.5), np.array(7, dtype=np.int64), np.arange(6.0).reshape(2, 3).T, np.zeros((0, 4))):
        b = decode_array(Blob(encode_array(a)), a)
        assert b.shape == a.shape and b.dtype == a.dtype and np.array_equal(a, b)


def test_judge_reads_blobs_and_rejects_bad_ones():
    check = Check("double", (Case("c", lambda g: {"x": randn(g, 4)}),), lambda i: i["x"] * 2, TOL)
    inputs = core.make_inputs(check.cases[0], 5)
    good = {"c": core.Produced((Blob(encode_array((inputs["x"] * 2).numpy())),))}
    assert core.judge(check, good, 5, None).passed
    bad = {"c": core.Produced((Blob(b"not an array"),))}
    report = core.judge(check, bad, 5, None)
    assert not report.passed and "could not be read" in report.summary()
    huge = {"c": core.Produced((Blob(encode_array(np.zeros((1000, 1000), np.float32))),))}
    assert "shape (1000, 1000)" in core.judge(check, huge, 5, None).summary()


# --- rules about how an answer is computed ------------------------------------------------------

SOFTMAX_RULE = Forbid("write the softmax yourself (torch.softmax and its aliases are not allowed)",
                      functions=("softmax", "log_softmax"), ops=("aten._softmax", "aten._log_softmax"))
SOFTMAX = Check("sm", (Case("c", lambda g: {"s": randn(g, 3, 5)}),), lambda i: torch.softmax(i["s"], -1), TOL,
                rules=(SOFTMAX_RULE,))


def _own_softmax(s):
    e = (s - s.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("cheat", [
    lambda s: torch.softmax(s, -1), lambda s: s.softmax(-1), lambda s: F.softmax(s, dim=-1),
    lambda s: torch.nn.Softmax(-1)(s), lambda s: torch.special.softmax(s, -1), lambda s: F.log_softmax(s, -1).exp(),
    lambda s: torch.ops.aten._softmax(s, -1, False), lambda s: getattr(torch, "soft" + "max")(s, -1),
])
def test_a_forbidden_operator_is_caught_by_every_route(cheat):
    report = core.evaluate(SOFTMAX, cheat, seed=0)
    assert not report.passed and "broke a rule of the exercise" in report.summary()
    assert "write the softmax yourself" in report.summary()


def test_the_rules_let_an_honest_answer_through():
    assert core.evaluate(SOFTMAX, _own_softmax, seed=0).passed


def test_require_counts_operators():
    loop = Require("compute one query at a time", lambda trace, inputs: trace.count("aten.mv", "aten.mm") >= 3)
    check = Check("mm", (Case("c", lambda g: {"q": randn(g, 3, 4), "k": randn(g, 5, 4)}),),
                  lambda i: i["q"] @ i["k"].T, TOL, rules=(loop,))
    assert core.evaluate(check, lambda q, k: torch.stack([k @ q[i] for i in range(3)]), seed=0).passed
    assert "one query at a time" in core.evaluate(check, lambda q, k: q @ k.T, seed=0).summary()


def test_given_versions_replace_earlier_exercises_while_a_later_one_runs():
    ns = {}
    exec("def helper(x):\n    return x * 100  # wrong\n"
         "def later(x):\n    return helper(x) + 1\n", ns)
    check = Check("later", (Case("c", lambda g: {"x": randn(g, 3)}),), lambda i: i["x"] * 2 + 1, TOL,
                  uses=("helper",), given={"helper": lambda x: x * 2})
    assert core.evaluate(check, ns["later"], seed=0).passed
    assert ns["helper"](torch.ones(1)).item() == 100  # restored afterwards


def test_hidden_cases_do_not_say_what_they_are():
    check = Check("double", (Case("visible", lambda g: {"x": randn(g, 4)}),
                             Case("secret shape 7x9 with -inf", lambda g: {"x": randn(g, 7, 9)}, hidden=True)),
                  lambda i: i["x"] * 2, TOL)
    report = core.evaluate(check, lambda x: x * 3, seed=1, hidden=True)
    public = report.summary(public=True)
    assert "hidden case 1 of 1" in public
    assert "secret" not in public and "7, 9" not in public and "expected" not in public
    def leak(x):
        raise ValueError(f"the inputs were {x.tolist()}")
    public = core.evaluate(check, leak, seed=1, hidden=True).summary(public=True)
    assert "ValueError" in public and "inputs were" not in public
