"""Checks of chapter 10, CLIP: references, tolerances, classic mistakes.

References:

* ``clip_logits``: ``exp(logit_scale) * F.cosine_similarity`` of every image with every text;
* ``clip_loss``: ``F.cross_entropy`` over the rows (image -> text) and over the columns (text ->
  image) with labels ``arange(N)``, averaged -- open_clip's ``ClipLoss``;
* ``zero_shot_classifier``: open_clip's ``build_zero_shot_classifier``: normalise every template's
  embedding, average over the templates, normalise again;
* ``recall_at_k``: scikit-learn's ``top_k_accuracy_score`` with the true partner of row ``i`` being
  column ``i``, for the similarity matrix and for its transpose.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from autograders.engine.core import Check, CheckSet, Mistake, Tolerance
from autograders.harness import clip as H

CHAPTER = H.CHAPTER

LOGITS_TOL = Tolerance(1e-4, 1e-5, "float32 cosines (sums of up to 64 products, ~1e-7 relative) times a scale of "
                                   "up to 100, computed as a normalised matrix product or as cosine_similarity")
LOSS_TOL = Tolerance(1e-5, 1e-5, "float32 log-sum-exp over up to 64 logits; any stable order agrees to ~1e-6")
ZERO_SHOT_TOL = Tolerance(1e-6, 1e-5, "float32 unit vectors: normalising and averaging in another order differs by "
                                      "~1e-7")
RECALL_TOL = Tolerance(1e-6, 0.0, "fractions of N pairs, computed exactly (k / N steps of at least 0.01)")


# ---------------------------------------------------------------------------------------------
# 1. the similarity logits

def _logits_ref(i):
    cos = F.cosine_similarity(i["image_features"][:, None, :], i["text_features"][None, :, :], dim=-1)
    return i["logit_scale"].exp() * cos


def _unit(x, dim=-1):
    return x / x.norm(dim=dim, keepdim=True)


def _logits_not_normalised(image_features, text_features, logit_scale):
    return logit_scale.exp() * image_features @ text_features.T


def _logits_normalised_over_batch(image_features, text_features, logit_scale):
    return logit_scale.exp() * _unit(image_features, 0) @ _unit(text_features, 0).T


def _logits_scale_not_exponentiated(image_features, text_features, logit_scale):
    return logit_scale * _unit(image_features) @ _unit(text_features).T


def _logits_divided_by_scale(image_features, text_features, logit_scale):
    return _unit(image_features) @ _unit(text_features).T / logit_scale.exp()


def _logits_no_scale(image_features, text_features, logit_scale):
    return _unit(image_features) @ _unit(text_features).T


def _logits_texts_first(image_features, text_features, logit_scale):
    return logit_scale.exp() * _unit(text_features) @ _unit(image_features).T


def _logits_only_images_normalised(image_features, text_features, logit_scale):
    return logit_scale.exp() * _unit(image_features) @ text_features.T


CLIP_LOGITS = Check(
    H.CLIP_LOGITS, reference=_logits_ref, tolerance=LOGITS_TOL,
    mistakes=(
        Mistake("no normalisation", _logits_not_normalised,
                "your result multiplies the raw features: L2-normalise every image and every text feature "
                "(each row to length 1) first, so that the product is a cosine in [-1, 1]."),
        Mistake("normalised over the batch", _logits_normalised_over_batch,
                "your result normalises each feature COLUMN (over the batch, dim 0): normalise each row, "
                "x / x.norm(dim=-1, keepdim=True)."),
        Mistake("log scale used as the scale", _logits_scale_not_exponentiated,
                "your result multiplies by logit_scale itself: it is stored as a logarithm (ln(1/0.07) at the "
                "start), so the factor is logit_scale.exp()."),
        Mistake("divided by the scale", _logits_divided_by_scale,
                "your result divides the cosines by exp(logit_scale): exp(logit_scale) = 1 / temperature, so "
                "MULTIPLY by it (dividing by the temperature)."),
        Mistake("no scale", _logits_no_scale,
                "your result is the cosine similarity without the learned scale: multiply by logit_scale.exp()."),
        Mistake("texts x images", _logits_texts_first,
                "your result is (texts, images): rows are images, columns texts -- image_features @ text_features.T."),
        Mistake("only images normalised", _logits_only_images_normalised,
                "your result normalises the image features but not the text features: normalise both."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. the symmetric loss

def _loss_ref(i):
    logits = i["logits"]
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _nll(log_probs):
    return -log_probs.diagonal().mean()


def _loss_images_only(logits):
    return _nll(logits.log_softmax(dim=1))


def _loss_texts_only(logits):
    return _nll(logits.log_softmax(dim=0))


def _loss_summed(logits):
    return _nll(logits.log_softmax(dim=1)) + _nll(logits.log_softmax(dim=0))


def _loss_summed_over_batch(logits):
    return -(logits.log_softmax(dim=1).diagonal().sum() + logits.log_softmax(dim=0).diagonal().sum()) / 2


def _loss_naive_log_softmax(logits):
    # softmax itself is stable, but its tiny probabilities round to 0 and their log is -inf
    return (_nll(torch.log(logits.softmax(dim=1))) + _nll(torch.log(logits.softmax(dim=0)))) / 2


def _loss_whole_matrix(logits):
    return -logits.flatten().log_softmax(dim=0).reshape(logits.shape).diagonal().mean()


def _loss_wrong_sign(logits):
    return -_loss_ref({"logits": logits})


CLIP_LOSS = Check(
    H.CLIP_LOSS, reference=_loss_ref, tolerance=LOSS_TOL,
    mistakes=(
        Mistake("image -> text only", _loss_images_only,
                "your result is only the image -> text half (softmax over each row): add the text -> image half "
                "(softmax over each column) and average the two."),
        Mistake("text -> image only", _loss_texts_only,
                "your result is only the text -> image half (softmax over each column): add the image -> text "
                "half (over each row) and average the two."),
        Mistake("the two halves summed", _loss_summed,
                "your result is the SUM of the two cross-entropies: CLIP averages them, (loss_i + loss_t) / 2."),
        Mistake("summed over the batch", _loss_summed_over_batch,
                "your result sums over the N pairs: each cross-entropy is the MEAN over the batch."),
        Mistake("log of softmax", _loss_naive_log_softmax,
                "your result takes the log of a softmax: for large logits (scale 100 is the clamp's maximum) "
                "small probabilities round to 0 and their log is -inf -- use log_softmax, which subtracts the "
                "maximum first and never forms the tiny probabilities."),
        Mistake("softmax over the whole matrix", _loss_whole_matrix,
                "your result normalises over all N x N entries at once: each image competes over its row of "
                "texts, each text over its column of images."),
        Mistake("wrong sign", _loss_wrong_sign,
                "your result is the negative of the loss: cross-entropy is MINUS the mean log-probability of "
                "the right partner."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. the zero-shot classifier

def _zero_shot_ref(i):
    per_template = F.normalize(i["class_text_features"], dim=-1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


def _zs_no_renormalisation(class_text_features):
    return _unit(class_text_features).mean(dim=1)


def _zs_mean_first(class_text_features):
    return _unit(class_text_features.mean(dim=1))


def _zs_nothing_normalised(class_text_features):
    return class_text_features.mean(dim=1)


def _zs_normalised_over_templates(class_text_features):
    return _unit(_unit(class_text_features, 1).mean(dim=1))


def _zs_mean_over_classes(class_text_features):
    return _unit(_unit(class_text_features).mean(dim=0))


ZERO_SHOT_CLASSIFIER = Check(
    H.ZERO_SHOT_CLASSIFIER, reference=_zero_shot_ref, tolerance=ZERO_SHOT_TOL,
    mistakes=(
        Mistake("not renormalised", _zs_no_renormalisation,
                "your class embeddings are the mean of unit vectors, which is SHORTER than 1 (the more the "
                "templates disagree, the shorter): normalise the mean again, so that every class is scored by "
                "a cosine."),
        Mistake("averaged before normalising", _zs_mean_first,
                "your result averages the raw template features, so long ones outweigh short ones: normalise "
                "each template's feature first, then average, then normalise again."),
        Mistake("nothing normalised", _zs_nothing_normalised,
                "your result is the plain mean of the raw features: normalise each template's feature, average "
                "over the templates, and normalise the mean."),
        Mistake("normalised over the templates", _zs_normalised_over_templates,
                "your result normalises over the template axis (dim 1): normalise each feature vector, the last "
                "axis (dim -1)."),
        Mistake("averaged over the classes", _zs_mean_over_classes,
                "your result averages over the classes (dim 0): average each class's templates, dim 1 of "
                "(classes, templates, D)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. recall@k

def _top_k(scores: torch.Tensor, k: int) -> float:
    from sklearn.metrics import top_k_accuracy_score

    n = scores.shape[0]
    with warnings.catch_warnings():  # k >= N: sklearn warns that the score is trivially 1
        warnings.simplefilter("ignore")
        return float(top_k_accuracy_score(np.arange(n), scores.double().numpy(), k=k, labels=np.arange(n)))


def _recall_ref(i):
    s, k = i["similarity"], i["k"]
    return _top_k(s, k), _top_k(s.T, k)


def _found(scores, k, strict=True):
    true = scores.diagonal()[:, None]
    higher = (scores > true).sum(dim=1) if strict else (scores >= true).sum(dim=1) - 1
    return (higher < k).float().mean()


def _recall_swapped(similarity, k):
    return _found(similarity.T, k), _found(similarity, k)


def _recall_lowest(similarity, k):
    return _found(-similarity, k), _found(-similarity.T, k)


def _recall_top_k_plus_one(similarity, k):
    return _found(similarity, k + 1), _found(similarity.T, k + 1)


def _recall_divided_by_k(similarity, k):
    return _found(similarity, k) / k, _found(similarity.T, k) / k


def _recall_percent(similarity, k):
    return 100 * _found(similarity, k), 100 * _found(similarity.T, k)


def _recall_one_direction_twice(similarity, k):
    return _found(similarity, k), _found(similarity, k)


RECALL_AT_K = Check(
    H.RECALL_AT_K, reference=_recall_ref, tolerance=RECALL_TOL,
    mistakes=(
        Mistake("directions swapped", _recall_swapped,
                "your two numbers are swapped: image -> text ranks the texts in each ROW (one row per image), "
                "text -> image the images in each column."),
        Mistake("lowest scores", _recall_lowest,
                "your result looks for the true partner among the k LOWEST similarities: take the k highest "
                "(topk's default, largest=True)."),
        Mistake("k + 1 candidates", _recall_top_k_plus_one,
                "your result counts a pair as found among the top k + 1: found at k means fewer than k candidates "
                "score higher than the true partner."),
        Mistake("divided by k", _recall_divided_by_k,
                "your result divides by k (that is precision@k): recall@k is the fraction of queries whose true "
                "partner is among their top k."),
        Mistake("percent", _recall_percent, "your result is in percent: return a fraction between 0 and 1."),
        Mistake("one direction twice", _recall_one_direction_twice,
                "your text -> image recall equals the image -> text one: rank the images for each text, i.e. "
                "over the columns (similarity.T)."),
    ),
)


CHECKS = CheckSet(CHAPTER, [CLIP_LOGITS, CLIP_LOSS, ZERO_SHOT_CLASSIFIER, RECALL_AT_K])
check = CHECKS.check
