"""Checks of chapter 11, ViLT: references, tolerances, classic mistakes.

References:

* ``fuse_inputs``: ViLT's ``infer`` (``vilt/modules/vilt_module.py``): text embeddings (with their
  positions) plus ``token_type_embeddings(zeros)``, image embeddings (with theirs) plus
  ``token_type_embeddings(ones)`` -- an ``nn.Embedding(2, d)`` looked up here with type ids --,
  concatenated text first, and the two masks concatenated;
* ``sample_negatives``: the lowest score among the images of another class, as a masked argmin;
* ``itm_loss``: ``F.cross_entropy`` over all pairs, label 1 for matching and 0 for mismatched ones
  (ViLT's ``compute_itm``);
* ``whole_word_mask``: ``transformers``' ``DataCollatorForLanguageModeling(whole_word_mask=True)``:
  each word is drawn with the probability at its first piece only (``_calc_word_ids_and_prob_mask``),
  and ``_whole_word_mask`` spreads a drawn first piece to every piece of its word.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import vilt as H

CHAPTER = H.CHAPTER

FUSE_TOL = Tolerance(1e-6, 1e-6, "three float32 additions per element, in any order: ~1e-7")
LOSS_TOL = Tolerance(1e-5, 1e-5, "float32 log-sum-exp over two logits, averaged over up to 128 pairs")


# ---------------------------------------------------------------------------------------------
# 1. the fused input

def _fuse_ref(i):
    B, L, _ = i["text_embeds"].shape
    M = i["image_embeds"].shape[1]
    types = torch.nn.Embedding.from_pretrained(i["type_embeds"])
    text = i["text_embeds"] + i["text_pos"][:L] + types(torch.zeros(B, L, dtype=torch.long))
    image = i["image_embeds"] + i["image_pos"] + types(torch.ones(B, M, dtype=torch.long))
    mask = torch.cat([i["text_mask"], torch.ones(B, M, dtype=torch.bool)], dim=1)
    return torch.cat([text, image], dim=1), mask


def _parts(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L, M = text_embeds.shape[1], image_embeds.shape[1]
    ones = torch.ones(image_embeds.shape[:2], dtype=torch.bool)
    return L, M, ones


def _fuse_types_swapped(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L, M, ones = _parts(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds)
    return (torch.cat([text_embeds + text_pos[:L] + type_embeds[1], image_embeds + image_pos + type_embeds[0]], 1),
            torch.cat([text_mask, ones], 1))


def _fuse_no_types(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L, M, ones = _parts(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds)
    return torch.cat([text_embeds + text_pos[:L], image_embeds + image_pos], 1), torch.cat([text_mask, ones], 1)


def _fuse_one_type(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L, M, ones = _parts(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds)
    return (torch.cat([text_embeds + text_pos[:L] + type_embeds[0], image_embeds + image_pos + type_embeds[0]], 1),
            torch.cat([text_mask, ones], 1))


def _fuse_no_positions(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L, M, ones = _parts(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds)
    return (torch.cat([text_embeds + type_embeds[0], image_embeds + type_embeds[1]], 1),
            torch.cat([text_mask, ones], 1))


def _fuse_no_image_positions(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L, M, ones = _parts(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds)
    return (torch.cat([text_embeds + text_pos[:L] + type_embeds[0], image_embeds + type_embeds[1]], 1),
            torch.cat([text_mask, ones], 1))


def _fuse_image_first(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L, M, ones = _parts(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds)
    return (torch.cat([image_embeds + image_pos + type_embeds[1], text_embeds + text_pos[:L] + type_embeds[0]], 1),
            torch.cat([ones, text_mask], 1))


def _fuse_image_masked_out(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L, M, ones = _parts(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds)
    return (torch.cat([text_embeds + text_pos[:L] + type_embeds[0], image_embeds + image_pos + type_embeds[1]], 1),
            torch.cat([text_mask, ~ones], 1))


def _fuse_padding_kept(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds):
    L, M, ones = _parts(text_embeds, text_mask, image_embeds, text_pos, image_pos, type_embeds)
    return (torch.cat([text_embeds + text_pos[:L] + type_embeds[0], image_embeds + image_pos + type_embeds[1]], 1),
            torch.cat([torch.ones_like(text_mask), ones], 1))


FUSE_INPUTS = Check(
    H.FUSE_INPUTS, reference=_fuse_ref, tolerance=FUSE_TOL,
    mistakes=(
        Mistake("types swapped", _fuse_types_swapped,
                "your text tokens carry type 1 and the image tokens type 0: text is type 0 (row 0 of "
                "type_embeds), image patches type 1."),
        Mistake("no types", _fuse_no_types,
                "your tokens carry no modality-type embedding: add type_embeds[0] to every text token and "
                "type_embeds[1] to every image token."),
        Mistake("one type for both", _fuse_one_type,
                "your image tokens get the text's type (row 0): the image's tokens are type 1."),
        Mistake("no positions", _fuse_no_positions,
                "your tokens carry no positions: add text_pos to the text (its first L rows) and image_pos to "
                "the image tokens."),
        Mistake("no image positions", _fuse_no_image_positions,
                "your image tokens carry no positions: add image_pos, or the patches are a bag without a layout."),
        Mistake("image first", _fuse_image_first,
                "your sequence starts with the image: the caption comes first, so that [CLS] sits at position 0 "
                "where the pooler reads."),
        Mistake("image masked out", _fuse_image_masked_out,
                "your key mask is False at the image tokens, so nothing may attend to them: image tokens are "
                "always real (True)."),
        Mistake("padding kept", _fuse_padding_kept,
                "your key mask is True at the caption's padding: keep text_mask for the text part."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. negatives

def _negatives_ref(i):
    labels, scores = i["labels"], i["scores"]
    other = labels[:, None] != labels[None, :]
    return torch.where(other, scores, torch.inf).argmin(dim=1)


def _neg_any_other_image(labels, scores):
    eye = torch.eye(len(labels), dtype=torch.bool)
    return torch.where(~eye, scores, torch.inf).argmin(dim=1)


def _neg_any_image(labels, scores):
    return scores.argmin(dim=1)


def _neg_highest(labels, scores):
    other = labels[:, None] != labels[None, :]
    return torch.where(other, scores, -torch.inf).argmax(dim=1)


def _neg_columns(labels, scores):
    other = labels[:, None] != labels[None, :]
    return torch.where(other, scores.T, torch.inf).argmin(dim=1)


def _neg_rolled(labels, scores):
    return torch.roll(torch.arange(len(labels)), -1)


def _neg_same_class(labels, scores):
    same = labels[:, None] == labels[None, :]
    return torch.where(same, scores, torch.inf).argmin(dim=1)


SAMPLE_NEGATIVES = Check(
    H.SAMPLE_NEGATIVES, reference=_negatives_ref, tolerance=EXACT,
    mistakes=(
        Mistake("any other image", _neg_any_other_image,
                "your negative can be another image of the SAME digit: its caption matches it, so it is not a "
                "negative. Allow only images whose label differs."),
        Mistake("any image", _neg_any_image,
                "your negative can be the caption's own image, or another of the same digit: allow only "
                "images whose label differs."),
        Mistake("highest score", _neg_highest,
                "your result takes the HIGHEST allowed score: take the lowest (argmin)."),
        Mistake("columns", _neg_columns,
                "your result reads scores[j, i]: row i of scores holds caption i's scores for every image j."),
        Mistake("rolled", _neg_rolled,
                "your result pairs caption i with image i + 1 whatever its label: that image may be the same "
                "digit, and the scores are not used."),
        Mistake("same class", _neg_same_class,
                "your result picks an image of the SAME class: a negative must show another digit."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. the ITM loss

def _itm_ref(i):
    logits = torch.cat([i["match_logits"], i["mismatch_logits"]])
    labels = torch.cat([torch.ones(len(i["match_logits"]), dtype=torch.long),
                        torch.zeros(len(i["mismatch_logits"]), dtype=torch.long)])
    return F.cross_entropy(logits, labels)


def _itm_labels_swapped(match_logits, mismatch_logits):
    return _itm_ref({"match_logits": mismatch_logits, "mismatch_logits": match_logits})


def _itm_mean_of_halves(match_logits, mismatch_logits):
    pos = F.cross_entropy(match_logits, torch.ones(len(match_logits), dtype=torch.long))
    neg = F.cross_entropy(mismatch_logits, torch.zeros(len(mismatch_logits), dtype=torch.long))
    return (pos + neg) / 2


def _itm_positives_only(match_logits, mismatch_logits):
    return F.cross_entropy(match_logits, torch.ones(len(match_logits), dtype=torch.long))


def _itm_sum(match_logits, mismatch_logits):
    return _itm_ref({"match_logits": match_logits, "mismatch_logits": mismatch_logits}) * (
        len(match_logits) + len(mismatch_logits))


def _itm_softmax_twice(match_logits, mismatch_logits):
    return _itm_ref({"match_logits": match_logits.softmax(-1), "mismatch_logits": mismatch_logits.softmax(-1)})


def _itm_sigmoid(match_logits, mismatch_logits):
    logits = torch.cat([match_logits[:, 1], mismatch_logits[:, 1]])
    labels = torch.cat([torch.ones(len(match_logits)), torch.zeros(len(mismatch_logits))])
    return F.binary_cross_entropy_with_logits(logits, labels)


def _itm_wrong_axis(match_logits, mismatch_logits):
    logits = torch.cat([match_logits, mismatch_logits])
    labels = torch.cat([torch.ones(len(match_logits), dtype=torch.long),
                        torch.zeros(len(mismatch_logits), dtype=torch.long)])
    return -logits.log_softmax(dim=0)[torch.arange(len(logits)), labels].mean()


ITM_LOSS = Check(
    H.ITM_LOSS, reference=_itm_ref, tolerance=LOSS_TOL,
    mistakes=(
        Mistake("labels swapped", _itm_labels_swapped,
                "your labels are the wrong way round: class 1 means 'matches' (the matching pairs' label), "
                "class 0 'does not match'."),
        Mistake("mean of the two halves", _itm_mean_of_halves,
                "your result averages the two halves' losses: the loss is the mean over ALL pairs, which "
                "differs when there are not as many matching as mismatched pairs."),
        Mistake("matching pairs only", _itm_positives_only,
                "your result ignores the mismatched pairs: without negatives 'match' is always right."),
        Mistake("summed", _itm_sum, "your result sums over the pairs: take the mean."),
        Mistake("softmax twice", _itm_softmax_twice,
                "your result applies a softmax before the cross-entropy, which applies its own: pass the raw "
                "logits."),
        Mistake("one sigmoid", _itm_sigmoid,
                "your result is a binary cross-entropy of the 'match' column alone: the head has two logits, "
                "and the loss is the cross-entropy over both."),
        Mistake("softmax over the batch", _itm_wrong_axis,
                "your result normalises over the pairs (dim 0): each pair's two logits are normalised "
                "against each other (dim -1)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. whole-word masking

def _first_pieces(word_ids: torch.Tensor) -> torch.Tensor:
    before = torch.cat([torch.full_like(word_ids[:, :1], -1), word_ids[:, :-1]], dim=1)
    return (word_ids >= 0) & (word_ids != before)


def _mask_ref(i):
    from transformers.data.data_collator import DataCollatorForLanguageModeling

    word_ids, uniforms, p = i["word_ids"], i["uniforms"], i["probability"]
    drawn = (_first_pieces(word_ids) & (uniforms < p)).numpy()   # the collator's Bernoulli at first pieces
    return torch.from_numpy(np.asarray(DataCollatorForLanguageModeling._whole_word_mask(word_ids.numpy(), drawn),
                                       dtype=bool))


def _spread(word_ids, drawn):
    same = (word_ids[:, :, None] == word_ids[:, None, :]) & (word_ids[:, :, None] >= 0)
    return (same & drawn[:, None, :]).any(dim=-1)


def _mask_per_piece(word_ids, uniforms, probability):
    return (word_ids >= 0) & (uniforms < probability)


def _mask_any_piece(word_ids, uniforms, probability):
    return _spread(word_ids, (word_ids >= 0) & (uniforms < probability))


def _mask_first_piece_only(word_ids, uniforms, probability):
    return _first_pieces(word_ids) & (uniforms < probability)


def _mask_specials_too(word_ids, uniforms, probability):
    before = torch.cat([torch.full_like(word_ids[:, :1], -2), word_ids[:, :-1]], dim=1)
    drawn = (word_ids != before) & (uniforms < probability)
    same = word_ids[:, :, None] == word_ids[:, None, :]
    return (same & drawn[:, None, :]).any(dim=-1)


def _mask_kept_words(word_ids, uniforms, probability):
    return _spread(word_ids, _first_pieces(word_ids) & (uniforms >= probability))


def _mask_cls_included(word_ids, uniforms, probability):
    out = _spread(word_ids, _first_pieces(word_ids) & (uniforms < probability))
    out[:, 0] |= uniforms[:, 0] < probability
    return out


WHOLE_WORD_MASK = Check(
    H.WHOLE_WORD_MASK, reference=_mask_ref, tolerance=EXACT,
    mistakes=(
        Mistake("per piece", _mask_per_piece,
                "your mask draws every piece on its own, so a word can be half masked (sev [MASK]) and read off "
                "its other half: draw each word once, at its first piece, and mask all of its pieces."),
        Mistake("any piece", _mask_any_piece,
                "your mask takes a word when ANY of its pieces' numbers is below the probability, so a word of "
                "k pieces is taken with probability 1 - (1 - p)^k, not p: use the number at its first piece only."),
        Mistake("first piece only", _mask_first_piece_only,
                "your mask marks only the first piece of a drawn word: mask every piece of it (all positions "
                "with the same word id)."),
        Mistake("specials as a word", _mask_specials_too,
                "your mask treats the -1 positions ([CLS], padding) as a word and can mask them: -1 is no word "
                "and is never masked."),
        Mistake("kept words masked", _mask_kept_words,
                "your mask takes the words whose number is NOT below the probability (a rate of 1 - p): take "
                "those with uniform < probability."),
        Mistake("[CLS] drawn", _mask_cls_included,
                "your mask can mask [CLS] (word id -1): only words are masked."),
    ),
)


CHECKS = CheckSet(CHAPTER, [FUSE_INPUTS, SAMPLE_NEGATIVES, ITM_LOSS, WHOLE_WORD_MASK])
check = CHECKS.check
