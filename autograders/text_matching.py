"""Checks for chapter 17, one tower vs two towers: references, tolerances, classic mistakes.

References are the libraries' own code:

* ``pair_input``       -- all-MiniLM-L6-v2's tokenizer (``transformers``) called on the two texts as a
  pair with ``padding="longest"``: BERT's ``[CLS] a [SEP] b [SEP]``, token type ids and attention mask;
* ``bi_encoder_score`` -- sentence-transformers' ``Pooling(d, "mean")`` on each side's token outputs from
  the same tower, then ``sentence_transformers.util.pairwise_cos_sim``;
* ``retrieve``         -- ``sentence_transformers.util.semantic_search`` with ``corpus_chunk_size`` (it
  scores the corpus chunk by chunk and merges the partial top-k lists);
* ``rerank``           -- ``torch.sort(descending=True, stable=True)`` of the cross-encoder's scores, with
  the retrieved indices gathered in the same order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import text_matching as H

CHAPTER = H.CHAPTER

SCORE_TOL = Tolerance(1e-5, 1e-5, "float32 cosines in [-1, 1] from a 2-layer encoder; another correct order of "
                                  "the sums (e.g. pooling both sides in one batch) differs by ~1e-7")
SEARCH_TOL = Tolerance(1e-5, 1e-5, "cosine scores in float32; indices are integers and must be equal (random "
                                   "scores have no ties)")


@functools.cache
def _tokenizer():
    from coursekit import minilm

    return minilm.load_tokenizer()


@functools.cache
def _st():
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.util import pairwise_cos_sim, semantic_search

    return Pooling, pairwise_cos_sim, semantic_search


# ---------------------------------------------------------------------------------------------
# 1. the paired input

def _texts(ids: torch.Tensor, pad_id: int) -> list[str]:
    tok = _tokenizer()
    return [" ".join(tok.convert_ids_to_tokens(row[row != pad_id].tolist())) for row in ids]


def _pair_ref(inputs):
    tok = _tokenizer()
    assert (inputs["cls_id"], inputs["sep_id"], inputs["pad_id"]) == (tok.cls_token_id, tok.sep_token_id,
                                                                      tok.pad_token_id)
    enc = tok(_texts(inputs["a_ids"], inputs["pad_id"]), _texts(inputs["b_ids"], inputs["pad_id"]),
              padding="longest", return_tensors="pt")
    return enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]


def _rows(a_ids, pad_id):
    return [row[row != pad_id].tolist() for row in a_ids]


def _pack(rows_ids, rows_types, pad_id, width=None):
    width = width or max(len(r) for r in rows_ids)
    ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
    types = torch.zeros(len(rows_ids), width, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows_ids, rows_types)):
        ids[i, : len(r)] = torch.tensor(r)
        types[i, : len(t)] = torch.tensor(t)
    return ids, types, (ids != pad_id).long()


def _pair_generic(a_ids, b_ids, cls_id, sep_id, pad_id=0, *, types="right", final_sep=True, order="ab",
                  pad_type=0):
    A, B = _rows(a_ids, pad_id), _rows(b_ids, pad_id)
    ids_rows, type_rows = [], []
    for a, b in zip(A, B):
        first, second = (a, b) if order == "ab" else (b, a)
        row = [cls_id] + first + [sep_id] + second + ([sep_id] if final_sep else [])
        n0 = len(first) + 2
        if types == "right":
            t = [0] * n0 + [1] * (len(row) - n0)
        elif types == "zeros":
            t = [0] * len(row)
        elif types == "sep_in_b":
            t = [0] * (n0 - 1) + [1] * (len(row) - n0 + 1)
        elif types == "last_sep_in_a":
            t = [0] * n0 + [1] * len(second) + [0] * (len(row) - n0 - len(second))
        ids_rows.append(row)
        type_rows.append(t)
    ids, tt, mask = _pack(ids_rows, type_rows, pad_id)
    if pad_type:
        tt = torch.where(mask.bool(), tt, torch.full_like(tt, pad_type))
    return ids, tt, mask


def _pair_padding_inside(a_ids, b_ids, cls_id, sep_id, pad_id=0):
    """[CLS] a-with-its-padding [SEP] b-with-its-padding [SEP], then trimmed or padded to the right width."""
    B = a_ids.shape[0]
    cls = torch.full((B, 1), cls_id)
    sep = torch.full((B, 1), sep_id)
    ids = torch.cat([cls, a_ids, sep, b_ids, sep], dim=1)
    types = torch.cat([torch.zeros(B, a_ids.shape[1] + 2, dtype=torch.long),
                       torch.ones(B, b_ids.shape[1] + 1, dtype=torch.long)], dim=1)
    return ids, types, (ids != pad_id).long()


def _pair_mask_all_ones(a_ids, b_ids, cls_id, sep_id, pad_id=0):
    ids, tt, mask = _pair_generic(a_ids, b_ids, cls_id, sep_id, pad_id)
    return ids, tt, torch.ones_like(mask)


PAIR_INPUT = Check(
    H.PAIR_INPUT,
    reference=_pair_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("padding left inside", _pair_padding_inside,
                "your rows keep each text's padding inside the pair ([CLS] a PAD PAD [SEP] b ...): drop the "
                "padding of a and b first, pack [CLS] a [SEP] b [SEP], and pad only at the end of the row."),
        Mistake("no segment ids", functools.partial(_pair_generic, types="zeros"),
                "your token_type_ids are all 0: the tokens of b and the final [SEP] get segment 1."),
        Mistake("first [SEP] in segment 1", functools.partial(_pair_generic, types="sep_in_b"),
                "your segment 1 starts at the first [SEP]: that [SEP] closes text a and belongs to segment 0; "
                "segment 1 is b and the final [SEP]."),
        Mistake("final [SEP] in segment 0", functools.partial(_pair_generic, types="last_sep_in_a"),
                "your final [SEP] has segment 0: it closes text b and gets segment 1, like b's tokens."),
        Mistake("padding in segment 1", functools.partial(_pair_generic, pad_type=1),
                "your padding positions have token type 1: padding gets type 0 (the tokenizer's "
                "pad_token_type_id)."),
        Mistake("no final [SEP]", functools.partial(_pair_generic, final_sep=False),
                "your rows end without the final [SEP]: BERT's pair is [CLS] a [SEP] b [SEP]."),
        Mistake("b before a", functools.partial(_pair_generic, order="ba"),
                "your rows put b first: the pair is [CLS] a [SEP] b [SEP]."),
        Mistake("attention mask all ones", _pair_mask_all_ones,
                "your attention_mask is 1 at the padding too: it is 1 exactly at the la + lb + 3 real positions."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. the bi-encoder's cosine scorer

def _bi_ref(inputs):
    Pooling, pairwise_cos_sim, _ = _st()
    tower = inputs["tower"]
    pooling = Pooling(tower.config.d_model, pooling_mode="mean")
    u = pooling({"token_embeddings": tower(inputs["a_ids"], inputs["a_mask"]),
                 "attention_mask": inputs["a_mask"]})["sentence_embedding"]
    v = pooling({"token_embeddings": tower(inputs["b_ids"], inputs["b_mask"]),
                 "attention_mask": inputs["b_mask"]})["sentence_embedding"]
    return pairwise_cos_sim(u, v)


def _masked_mean(h, mask):
    m = mask[..., None].float()
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _bi_plain_mean(tower, a_ids, a_mask, b_ids, b_mask):
    return F.cosine_similarity(tower(a_ids, a_mask).mean(1), tower(b_ids, b_mask).mean(1), dim=-1)


def _bi_first_token(tower, a_ids, a_mask, b_ids, b_mask):
    return F.cosine_similarity(tower(a_ids, a_mask)[:, 0], tower(b_ids, b_mask)[:, 0], dim=-1)


def _bi_dot(tower, a_ids, a_mask, b_ids, b_mask):
    return (_masked_mean(tower(a_ids, a_mask), a_mask) * _masked_mean(tower(b_ids, b_mask), b_mask)).sum(-1)


def _bi_no_mask(tower, a_ids, a_mask, b_ids, b_mask):
    ones_a, ones_b = torch.ones_like(a_mask), torch.ones_like(b_mask)
    return F.cosine_similarity(_masked_mean(tower(a_ids, ones_a), a_mask),
                               _masked_mean(tower(b_ids, ones_b), b_mask), dim=-1)


def _bi_joint(tower, a_ids, a_mask, b_ids, b_mask):
    """Both texts through the tower as ONE sequence (that is a cross-encoder), then pooled per side."""
    h = tower(torch.cat([a_ids, b_ids], 1), torch.cat([a_mask, b_mask], 1))
    La = a_ids.shape[1]
    return F.cosine_similarity(_masked_mean(h[:, :La], a_mask), _masked_mean(h[:, La:], b_mask), dim=-1)


def _bi_embeddings_only(tower, a_ids, a_mask, b_ids, b_mask):
    return F.cosine_similarity(_masked_mean(tower.tokens(a_ids), a_mask), _masked_mean(tower.tokens(b_ids), b_mask),
                               dim=-1)


BI_SCORE = Check(
    H.BI_SCORE,
    reference=_bi_ref,
    tolerance=SCORE_TOL,
    mistakes=(
        Mistake("padding counted", _bi_plain_mean,
                "your sentence vectors average the padding positions too: pool with the attention mask "
                "(sum over real tokens / their number)."),
        Mistake("first token", _bi_first_token,
                "your sentence vectors are the outputs at position 0: the bi-encoder mean-pools the real tokens."),
        Mistake("dot product", _bi_dot,
                "your score is the dot product of the pooled vectors: normalise them (cosine similarity)."),
        Mistake("no padding mask in the tower", _bi_no_mask,
                "your tower call lets the real tokens attend to the padding: pass each side's attention_mask "
                "to the tower as well as to the pooling."),
        Mistake("one sequence", _bi_joint,
                "your texts went through the tower together, as one sequence: a bi-encoder encodes each text "
                "on its own (two separate tower calls), so that candidates can be encoded ahead of time."),
        Mistake("embeddings only", _bi_embeddings_only,
                "your vectors pool the token embedding table, not the tower's outputs: call the tower."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. top-k retrieval, chunk by chunk

def _retrieve_ref(inputs):
    semantic_search = _st()[2]
    hits = semantic_search(inputs["query_embeddings"], inputs["index"], top_k=inputs["k"],
                           corpus_chunk_size=inputs["chunk_size"])
    scores = torch.tensor([[h["score"] for h in row] for row in hits], dtype=torch.float32)
    indices = torch.tensor([[h["corpus_id"] for h in row] for row in hits], dtype=torch.int64)
    return scores, indices


def _chunks(index, chunk_size):
    return [(start, index[start:start + chunk_size]) for start in range(0, index.shape[0], chunk_size)]


def _retrieve_local_indices(query_embeddings, index, k, chunk_size):
    values, indices = [], []
    for start, chunk in _chunks(index, chunk_size):
        v, i = torch.topk(query_embeddings @ chunk.T, min(k, chunk.shape[0]), dim=1)
        values.append(v)
        indices.append(i)                                  # forgot + start
    v, pos = torch.topk(torch.cat(values, 1), k, dim=1)
    return v, torch.cat(indices, 1).gather(1, pos)


def _retrieve_positions(query_embeddings, index, k, chunk_size):
    values = []
    for start, chunk in _chunks(index, chunk_size):
        values.append(torch.topk(query_embeddings @ chunk.T, min(k, chunk.shape[0]), dim=1).values)
    return torch.topk(torch.cat(values, 1), k, dim=1)      # positions in the merged list, not documents


def _retrieve_last_chunk(query_embeddings, index, k, chunk_size):
    best = None
    for start, chunk in _chunks(index, chunk_size):
        v, i = torch.topk(query_embeddings @ chunk.T, min(k, chunk.shape[0]), dim=1)
        best = (v, i + start)
    return best


def _retrieve_chunk_k_too_small(query_embeddings, index, k, chunk_size):
    """Keeps at most k // n_chunks candidates of each chunk."""
    n = -(-index.shape[0] // chunk_size)
    values, indices = [], []
    for start, chunk in _chunks(index, chunk_size):
        v, i = torch.topk(query_embeddings @ chunk.T, max(1, min(k // n, chunk.shape[0])), dim=1)
        values.append(v)
        indices.append(i + start)
    v, i = torch.cat(values, 1), torch.cat(indices, 1)
    top = torch.topk(v, min(k, v.shape[1]), dim=1)
    return top.values, i.gather(1, top.indices)


RETRIEVE = Check(
    H.RETRIEVE,
    reference=_retrieve_ref,
    tolerance=SEARCH_TOL,
    mistakes=(
        Mistake("indices within the chunk", _retrieve_local_indices,
                "your indices are positions inside their chunk: add the chunk's first index (start) to them."),
        Mistake("positions in the merged list", _retrieve_positions,
                "your indices are positions in the concatenated per-chunk candidates: gather the document "
                "indices with them (torch.gather)."),
        Mistake("last chunk only", _retrieve_last_chunk,
                "your result holds the last chunk's best documents: keep a running top-k and merge every "
                "chunk's candidates into it."),
        Mistake("too few candidates per chunk", _retrieve_chunk_k_too_small,
                "keep up to k candidates from every chunk: all of the best k documents may be in one chunk."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. re-ranking

def _rerank_ref(inputs):
    scores, order = torch.sort(inputs["cross_scores"], dim=1, descending=True, stable=True)
    return inputs["retrieved"].gather(1, order), scores


def _rerank_positions(retrieved, cross_scores):
    scores, order = torch.sort(cross_scores, dim=1, descending=True)
    return order, scores


def _rerank_ascending(retrieved, cross_scores):
    scores, order = torch.sort(cross_scores, dim=1)
    return retrieved.gather(1, order), scores


def _rerank_scores_only(retrieved, cross_scores):
    return retrieved, torch.sort(cross_scores, dim=1, descending=True).values


def _rerank_wrong_dim(retrieved, cross_scores):
    scores, order = torch.sort(cross_scores, dim=0, descending=True)
    return retrieved.gather(0, order), scores


RERANK = Check(
    H.RERANK,
    reference=_rerank_ref,
    tolerance=SEARCH_TOL,
    mistakes=(
        Mistake("positions, not documents", _rerank_positions,
                "your indices are positions 0..k-1 in the retrieved list: map them back to document indices "
                "with retrieved.gather(1, order)."),
        Mistake("ascending", _rerank_ascending,
                "your order is increasing: the best cross-encoder score comes first."),
        Mistake("documents not reordered", _rerank_scores_only,
                "your scores are sorted but the document indices are still in the bi-encoder's order: reorder "
                "both with the same permutation."),
        Mistake("sorted across queries", _rerank_wrong_dim,
                "your sort runs over the queries (dim 0): sort each query's k candidates (dim 1)."),
    ),
)


CHECKS = CheckSet(CHAPTER, [PAIR_INPUT, BI_SCORE, RETRIEVE, RERANK])
check = CHECKS.check
