"""Chapter 17: the solution passes every check; plausible wrong answers and the stubs are rejected."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from autograders import text_matching as ag
from autograders.engine.core import evaluate, make_inputs
from autograders.harness import text_matching as H
from checks_support import assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)
NAMES = ["pair_input", "bi_encoder_score", "retrieve", "rerank"]


def test_every_exercise_has_a_check_and_a_task():
    assert list(ag.CHECKS.checks) == NAMES and list(H.TASKS.tasks) == NAMES
    assert all(ag.CHECKS[n].task is H.TASKS[n] for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", NAMES)
def test_solution_passes_hidden_cases_without_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate(ag.CHECKS[name], getattr(sol, name), seed=99, hidden=True)
    assert report.passed, report.summary()


@pytest.mark.parametrize("name", NAMES)
def test_stub_fails(name):
    assert "not implemented yet" in assert_rejects(ag.CHECKS, name, not_implemented)


def test_grading_cells_train_nothing():
    """The sandbox runs the cells up to the last exercise, minus skipped ones: no model is trained there."""
    assert not hasattr(sol, "histories") and not hasattr(sol, "index") and not hasattr(sol, "tokenizer")


# --- references ----------------------------------------------------------------------------------

def test_word_ids_are_words_of_the_tokenizer():
    from coursekit import minilm

    tok = minilm.load_tokenizer()
    for i in H.WORD_IDS[::17]:
        word = tok.convert_ids_to_tokens(i)
        assert tok(word)["input_ids"] == [101, i, 102]


def test_pair_reference_is_the_tokenizers_pair_on_real_text():
    from coursekit import minilm

    tok = minilm.load_tokenizer()
    a, b = ["the cat sat", "hello"], ["on the mat today", "world"]
    ids_a = tok(a, add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
    ids_b = tok(b, add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
    got = sol.pair_input(ids_a, ids_b, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    expected = tok(a, b, padding="longest", return_tensors="pt")
    for g, name in zip(got, ("input_ids", "token_type_ids", "attention_mask")):
        assert torch.equal(g, expected[name]), name


def test_retrieve_reference_equals_one_full_matrix_product():
    inputs = make_inputs(H.RETRIEVE.cases[0], seed=4)
    scores, indices = ag.RETRIEVE.reference(inputs)
    full = inputs["query_embeddings"] @ inputs["index"].T
    values, expected = full.topk(inputs["k"], dim=1)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(scores, values)


# --- pair_input ----------------------------------------------------------------------------------

def pair_concat_padded(a_ids, b_ids, cls_id, sep_id, pad_id=0):
    B = a_ids.shape[0]
    ids = torch.cat([torch.full((B, 1), cls_id), a_ids, torch.full((B, 1), sep_id), b_ids,
                     torch.full((B, 1), sep_id)], 1)
    types = torch.cat([torch.zeros(B, a_ids.shape[1] + 2), torch.ones(B, b_ids.shape[1] + 1)], 1).long()
    return ids, types, (ids != pad_id).long()


def _pair_rows(a_ids, b_ids, cls_id, sep_id, pad_id, build):
    rows = [build(a[a != pad_id].tolist(), b[b != pad_id].tolist()) for a, b in zip(a_ids, b_ids)]
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    types = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, t) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        types[i, : len(t)] = torch.tensor(t)
    return ids, types, (ids != pad_id).long()


def pair_all_zero_types(a_ids, b_ids, cls_id, sep_id, pad_id=0):
    return _pair_rows(a_ids, b_ids, cls_id, sep_id, pad_id,
                      lambda a, b: ([cls_id, *a, sep_id, *b, sep_id], [0] * (len(a) + len(b) + 3)))


def pair_types_off_by_one(a_ids, b_ids, cls_id, sep_id, pad_id=0):
    return _pair_rows(a_ids, b_ids, cls_id, sep_id, pad_id,
                      lambda a, b: ([cls_id, *a, sep_id, *b, sep_id], [0] * (len(a) + 1) + [1] * (len(b) + 2)))


def pair_one_sep(a_ids, b_ids, cls_id, sep_id, pad_id=0):
    return _pair_rows(a_ids, b_ids, cls_id, sep_id, pad_id,
                      lambda a, b: ([cls_id, *a, sep_id, *b], [0] * (len(a) + 2) + [1] * len(b)))


def pair_sep_first(a_ids, b_ids, cls_id, sep_id, pad_id=0):
    return _pair_rows(a_ids, b_ids, cls_id, sep_id, pad_id,
                      lambda a, b: ([sep_id, *a, cls_id, *b, sep_id], [0] * (len(a) + 2) + [1] * (len(b) + 1)))


def pair_float_outputs(a_ids, b_ids, cls_id, sep_id, pad_id=0):
    return tuple(t.float() for t in sol.pair_input(a_ids, b_ids, cls_id, sep_id, pad_id))


@pytest.mark.parametrize("wrong, hint", [
    (pair_concat_padded, None),  # shape error, or the "padding left inside" hint where the widths agree
    (pair_all_zero_types, "all 0"),
    (pair_types_off_by_one, "belongs to segment 0"),
    (pair_one_sep, "without the final [SEP]"),
    (pair_sep_first, None),
    (pair_float_outputs, "integer tensor"),
])
def test_pair_input_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "pair_input", wrong, hint)


def test_padding_inside_gets_its_hint():
    assert_rejects(ag.CHECKS, "pair_input", pair_concat_padded, "padding inside the pair")


# --- bi_encoder_score ----------------------------------------------------------------------------

def bi_mean_all(tower, a_ids, a_mask, b_ids, b_mask):
    return F.cosine_similarity(tower(a_ids, a_mask).mean(1), tower(b_ids, b_mask).mean(1), dim=-1)


def bi_cls(tower, a_ids, a_mask, b_ids, b_mask):
    return F.cosine_similarity(tower(a_ids, a_mask)[:, 0], tower(b_ids, b_mask)[:, 0], dim=-1)


def bi_unnormalised(tower, a_ids, a_mask, b_ids, b_mask):
    def pool(ids, mask):
        h = tower(ids, mask)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return (pool(a_ids, a_mask) * pool(b_ids, b_mask)).sum(-1)


def bi_concatenated(tower, a_ids, a_mask, b_ids, b_mask):
    h = tower(torch.cat([a_ids, b_ids], 1), torch.cat([a_mask, b_mask], 1))
    u = (h[:, : a_ids.shape[1]] * a_mask[..., None]).sum(1) / a_mask.sum(1, keepdim=True)
    v = (h[:, a_ids.shape[1]:] * b_mask[..., None]).sum(1) / b_mask.sum(1, keepdim=True)
    return F.cosine_similarity(u, v, dim=-1)


def bi_matrix(tower, a_ids, a_mask, b_ids, b_mask):
    def pool(ids, mask):
        h = tower(ids, mask)
        return F.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    return pool(a_ids, a_mask) @ pool(b_ids, b_mask).T   # all pairs, not each pair


@pytest.mark.parametrize("wrong, hint", [
    (bi_mean_all, "padding positions too"),
    (bi_cls, "position 0"),
    (bi_unnormalised, "dot product"),
    (bi_concatenated, "as one sequence"),
    (bi_matrix, None),  # shape error
])
def test_bi_encoder_score_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "bi_encoder_score", wrong, hint)


# --- retrieve ------------------------------------------------------------------------------------

def retrieve_all_at_once(query_embeddings, index, k, chunk_size):
    return torch.topk(query_embeddings @ index.T, k, dim=1)


def retrieve_no_offset(query_embeddings, index, k, chunk_size):
    best_v = best_i = None
    for start in range(0, len(index), chunk_size):
        v, i = torch.topk(query_embeddings @ index[start:start + chunk_size].T, min(k, len(index[start:start + chunk_size])), 1)
        if best_v is not None:
            v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
        top = torch.topk(v, min(k, v.shape[1]), 1)
        best_v, best_i = top.values, i.gather(1, top.indices)
    return best_v, best_i


def retrieve_concat_chunks(query_embeddings, index, k, chunk_size):
    vs, is_ = [], []
    for start in range(0, len(index), chunk_size):
        v, i = torch.topk(query_embeddings @ index[start:start + chunk_size].T, min(k, len(index[start:start + chunk_size])), 1)
        vs.append(v)
        is_.append(i + start)
    return torch.cat(vs, 1), torch.cat(is_, 1)   # never merged into the best k


def retrieve_smallest(query_embeddings, index, k, chunk_size):
    scores = torch.cat([query_embeddings @ index[s:s + chunk_size].T for s in range(0, len(index), chunk_size)], 1)
    return torch.topk(scores, k, dim=1, largest=False)


@pytest.mark.parametrize("wrong, hint", [
    (retrieve_all_at_once, "one chunk at a time"),
    (retrieve_no_offset, "add the chunk's first index"),
    (retrieve_concat_chunks, None),  # shape error
    (retrieve_smallest, None),
])
def test_retrieve_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "retrieve", wrong, hint)


def test_retrieve_in_one_chunk_is_allowed_when_the_index_is_one_chunk():
    report = evaluate(ag.CHECKS["retrieve"], retrieve_all_at_once, seed=0, hidden=True)
    one_chunk = [r for r in report.results if "one chunk holds everything" in r.case]
    assert one_chunk and one_chunk[0].passed


# --- rerank --------------------------------------------------------------------------------------

def rerank_argsort(retrieved, cross_scores):
    order = cross_scores.argsort(dim=1, descending=True)
    return order, cross_scores.gather(1, order)


def rerank_ascending(retrieved, cross_scores):
    order = cross_scores.argsort(dim=1)
    return retrieved.gather(1, order), cross_scores.gather(1, order)


def rerank_unchanged(retrieved, cross_scores):
    return retrieved, cross_scores


def rerank_scores_sorted_only(retrieved, cross_scores):
    return retrieved, cross_scores.sort(dim=1, descending=True).values


@pytest.mark.parametrize("wrong, hint", [
    (rerank_argsort, "positions 0..k-1"),
    (rerank_ascending, "increasing"),
    (rerank_unchanged, None),
    (rerank_scores_sorted_only, "still in the bi-encoder's order"),
])
def test_rerank_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "rerank", wrong, hint)
