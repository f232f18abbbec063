"""Checks for chapter 04, the decoder, cross attention and how seq2seq is trained.

Conventions (stated in the notebook too): batches come first, (B, T, d); a boolean mask is True where
a query MAY attend to a key (PyTorch's own modules use the opposite for boolean masks, or float
masks of 0 / -inf); token ids PAD, BOS, EOS are 0, 1, 2 unless a case says otherwise. Decoders are
checked on :class:`coursekit.seq2seq_data.TinyScorer`, a fixed next-token model small enough that
the best output can be found by enumerating every sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import decoder_seq2seq as H
from coursekit.seq2seq_data import BOS, EOS, PAD, brute_force_best

CHAPTER = H.CHAPTER

FP32_MODULE = Tolerance(1e-4, 1e-4, "float32, compared with nn.MultiheadAttention whose fused kernels "
                                    "order the sums differently; large-input cases make the softmax sharp")
FP32_LOSS = Tolerance(1e-4, 1e-5, "a float32 sum of up to a few hundred log-probabilities; a correct "
                                  "log-softmax computed another way differs by ~1e-6 per term")
DECODE = Tolerance(1e-4, 1e-5, "token ids are integers, so any difference there is >= 1 and fails; the "
                               "score sums a few float32 log-probabilities, which differ by ~1e-6 when "
                               "accumulated in another order or precision")


# ---------------------------------------------------------------------------------------------
# 1. greedy decoding

def _greedy_ref(next_log_probs, batch_size, max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD):
    prefix = torch.full((batch_size, 1), bos_id, dtype=torch.long)
    scores = torch.zeros(batch_size)
    done = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(max_len):
        log_probs = next_log_probs(prefix)
        best = log_probs.argmax(dim=-1)
        scores += torch.where(done, 0.0, log_probs.gather(1, best[:, None])[:, 0])
        best = torch.where(done, pad_id, best)
        done |= best == eos_id
        prefix = torch.cat([prefix, best[:, None]], dim=1)
        if done.all():
            break
    return prefix[:, 1:], scores


def _describe_greedy(inputs):
    s = inputs["next_log_probs"]
    return f"TinyScorer(vocab_size={s.vocab_size}, batch_size={s.batch_size}), max_len={inputs['max_len']}"


def _greedy_no_stop(next_log_probs, batch_size, max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD):
    prefix = torch.full((batch_size, 1), bos_id, dtype=torch.long)
    scores = torch.zeros(batch_size)
    done = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(max_len):
        log_probs = next_log_probs(prefix)
        best = log_probs.argmax(dim=-1)
        scores += torch.where(done, 0.0, log_probs.gather(1, best[:, None])[:, 0])
        done |= best == eos_id
        prefix = torch.cat([prefix, best[:, None]], dim=1)
        if done.all():
            break
    return prefix[:, 1:], scores


def _greedy_all_steps(next_log_probs, batch_size, max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD):
    prefix = torch.full((batch_size, 1), bos_id, dtype=torch.long)
    scores = torch.zeros(batch_size)
    done = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(max_len):
        log_probs = next_log_probs(prefix)
        best = log_probs.argmax(dim=-1)
        scores += torch.where(done, 0.0, log_probs.gather(1, best[:, None])[:, 0])
        best = torch.where(done, pad_id, best)
        done |= best == eos_id
        prefix = torch.cat([prefix, best[:, None]], dim=1)
    return prefix[:, 1:], scores


def _greedy_scores_after_eos(next_log_probs, batch_size, max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD):
    prefix = torch.full((batch_size, 1), bos_id, dtype=torch.long)
    scores = torch.zeros(batch_size)
    done = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(max_len):
        log_probs = next_log_probs(prefix)
        best = log_probs.argmax(dim=-1)
        scores += log_probs.gather(1, best[:, None])[:, 0]
        best = torch.where(done, pad_id, best)
        done |= best == eos_id
        prefix = torch.cat([prefix, best[:, None]], dim=1)
        if done.all():
            break
    return prefix[:, 1:], scores


def _greedy_last_token_only(next_log_probs, batch_size, max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD):
    def last_only(prefix):
        return next_log_probs(prefix[:, -1:])
    return _greedy_ref(last_only, batch_size, max_len, bos_id, eos_id, pad_id)


def _greedy_with_bos(next_log_probs, batch_size, max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD):
    tokens, scores = _greedy_ref(next_log_probs, batch_size, max_len, bos_id, eos_id, pad_id)
    return torch.cat([torch.full((batch_size, 1), bos_id, dtype=torch.long), tokens], dim=1), scores


GREEDY = Check(
    H.GREEDY,
    reference=lambda inputs: _greedy_ref(**inputs),
    tolerance=DECODE,
    describe_inputs=_describe_greedy,
    mistakes=(
        Mistake("keeps decoding after EOS", _greedy_no_stop,
                "a row that has produced EOS is finished: every later position of that row must be "
                "pad_id, whatever the model predicts there."),
        Mistake("always max_len steps", _greedy_all_steps,
                "stop as soon as every row has produced EOS: the result has as many columns as steps "
                "were needed, not always max_len."),
        Mistake("scores after EOS", _greedy_scores_after_eos,
                "the score of a row sums the log-probabilities of its tokens up to and including EOS; "
                "do not add anything for the padding after it."),
        Mistake("only the last token", _greedy_last_token_only,
                "the model must see the whole prefix (BOS and every token so far), not only the last token."),
        Mistake("BOS in the result", _greedy_with_bos,
                "return only the generated tokens: leave out the leading BOS."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. cross attention, against nn.MultiheadAttention with copied weights


def _cross_ref(inputs):
    d, heads = inputs["d_model"], inputs["n_heads"]
    mha = nn.MultiheadAttention(d, heads, bias=False, batch_first=True)
    mha.in_proj_weight.copy_(torch.cat([inputs["W_q"], inputs["W_k"], inputs["W_v"]]))
    mha.out_proj.weight.copy_(inputs["W_o"])
    mha.eval()
    mask = inputs["memory_mask"]
    memory = inputs["memory"]
    return mha(inputs["x"], memory, memory, key_padding_mask=None if mask is None else ~mask,
               need_weights=True, average_attn_weights=False)


class _CrossBase(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.d_model, self.n_heads = d_model, n_heads
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)
        self.W_o = nn.Linear(d_model, d_model, bias=False)

    def split(self, t):
        B, L, _ = t.shape
        return t.view(B, L, self.n_heads, self.d_model // self.n_heads).transpose(1, 2)

    def attend(self, q_in, kv_in, mask, *, scale=None, invert=False, project=True, bad_split=False):
        B, T, _ = q_in.shape
        dh = self.d_model // self.n_heads
        if bad_split:
            q = self.W_q(q_in).reshape(B, self.n_heads, T, dh)
            k = self.W_k(kv_in).reshape(B, self.n_heads, kv_in.shape[1], dh)
            v = self.W_v(kv_in).reshape(B, self.n_heads, kv_in.shape[1], dh)
        else:
            q, k, v = self.split(self.W_q(q_in)), self.split(self.W_k(kv_in)), self.split(self.W_v(kv_in))
        s = q @ k.transpose(-2, -1) / math.sqrt(scale or dh)
        if mask is not None:
            allowed = ~mask if invert else mask
            s = s.masked_fill(~allowed[:, None, None, :], float("-inf"))
        w = torch.softmax(s, dim=-1)
        out = (w @ v).transpose(1, 2).reshape(B, T, self.d_model)
        return (self.W_o(out) if project else out), w


class _CrossSelf(_CrossBase):
    def forward(self, x, memory, memory_mask=None):
        return self.attend(x, x, None)


class _CrossInverted(_CrossBase):
    def forward(self, x, memory, memory_mask=None):
        return self.attend(x, memory, memory_mask, invert=True)


class _CrossNoMask(_CrossBase):
    def forward(self, x, memory, memory_mask=None):
        return self.attend(x, memory, None)


class _CrossNoProjection(_CrossBase):
    def forward(self, x, memory, memory_mask=None):
        return self.attend(x, memory, memory_mask, project=False)


class _CrossScaleDModel(_CrossBase):
    def forward(self, x, memory, memory_mask=None):
        return self.attend(x, memory, memory_mask, scale=self.d_model)


class _CrossBadSplit(_CrossBase):
    def forward(self, x, memory, memory_mask=None):
        return self.attend(x, memory, memory_mask, bad_split=True)


CROSS = Check(
    H.CROSS,
    reference=_cross_ref,
    tolerance=FP32_MODULE,
    mistakes=(
        Mistake("self-attention", _CrossSelf,
                "the result matches self-attention over the decoder states: keys and values must come "
                "from `memory` (the encoder output); only the queries come from `x`."),
        Mistake("inverted mask", _CrossInverted,
                "the result matches a memory mask used the wrong way round: True marks a real memory "
                "position that MAY be attended; fill the scores where it is False with -inf."),
        Mistake("mask ignored", _CrossNoMask,
                "padded memory positions got attention weight: set the scores of positions where "
                "memory_mask is False to -inf before the softmax (broadcast the (B, S) mask over heads "
                "and queries)."),
        Mistake("no output projection", _CrossNoProjection,
                "the result matches the concatenated heads without the output projection: apply W_o last."),
        Mistake("scaled by d_model", _CrossScaleDModel,
                "your scores are scaled by 1/sqrt(d_model); each head compares vectors of size "
                "d_model // n_heads, so scale by 1/sqrt(d_head)."),
        Mistake("heads split with a plain reshape", _CrossBadSplit,
                "the result matches reshaping (B, T, d_model) straight to (B, n_heads, T, d_head), which "
                "mixes positions into heads: view as (B, T, n_heads, d_head), then transpose(1, 2)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. a decoder block, against nn.TransformerDecoderLayer with the same weights


def _block_ref(inputs):
    d, heads, d_ff = inputs["d_model"], inputs["n_heads"], inputs["d_ff"]
    layer = nn.TransformerDecoderLayer(d, heads, d_ff, dropout=0.0, activation="relu", batch_first=True,
                                       norm_first=inputs["norm_first"])
    own = dict(layer.named_parameters())
    for name, value in inputs["params"].items():
        own[name.replace("cross_attn.", "multihead_attn.")].copy_(value)
    for attn in (layer.self_attn, layer.multihead_attn):  # the block's attentions have no bias
        attn.in_proj_bias.zero_()
        attn.out_proj.bias.zero_()
    layer.eval()
    T = inputs["x"].shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).triu(1) if inputs["causal"] else None  # PyTorch: True = blocked
    mask = inputs["memory_mask"]
    return layer(inputs["x"], inputs["memory"], tgt_mask=causal,
                 memory_key_padding_mask=None if mask is None else ~mask)


def _describe_block(inputs):
    B, T, d = inputs["x"].shape
    return (f"B={B}, T={T}, S={inputs['memory'].shape[1]}, d_model={d}, {inputs['n_heads']} heads, "
            f"d_ff={inputs['d_ff']}, norm_first={inputs['norm_first']}, causal={inputs['causal']}, "
            f"memory_mask={'given' if inputs['memory_mask'] is not None else None}")


class _BlockBase(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, bias=False, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, n_heads, bias=False, batch_first=True)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def run(self, x, memory, memory_mask, causal, *, self_mask="course", memory_padding="course", order="right",
            post=None, cross_residual=True, cross_on_self=False, activation=torch.relu, norms=(1, 2, 3)):
        T = x.shape[1]
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        attn_mask = None
        if causal and self_mask == "course":
            attn_mask = ~allowed
        elif causal and self_mask == "unconverted":
            attn_mask = allowed
        pad = None
        if memory_mask is not None and memory_padding == "course":
            pad = ~memory_mask
        elif memory_mask is not None and memory_padding == "unconverted":
            pad = memory_mask
        n1, n2, n3 = (getattr(self, f"norm{i}") for i in norms)
        kv = (lambda h: h) if cross_on_self else (lambda h: memory)

        def sa(h):
            return self.self_attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]

        def ca(h):
            return self.cross_attn(h, kv(h), kv(h), key_padding_mask=None if cross_on_self else pad,
                                   need_weights=False)[0]

        def ff(h):
            return self.linear2(activation(self.linear1(h)))

        pre = self.norm_first if post is None else not post
        if pre:
            x = x + sa(n1(x))
            x = x + ca(n2(x)) if cross_residual else ca(n2(x))
            return x + ff(n3(x))
        x = n1(x + sa(x))
        x = n2(x + ca(x)) if cross_residual else n2(ca(x))
        return n3(x + ff(x))


def _block_mistake(**how):
    class Wrong(_BlockBase):
        def forward(self, x, memory, memory_mask=None, causal=True):
            return self.run(x, memory, memory_mask, causal, **how)
    return Wrong


BLOCK = Check(
    H.BLOCK,
    reference=_block_ref,
    tolerance=FP32_MODULE,
    describe_inputs=_describe_block,
    mistakes=(
        Mistake("causal mask not converted", _block_mistake(self_mask="unconverted"),
                "the result matches passing the course's causal mask (True = may attend) straight to "
                "nn.MultiheadAttention, which reads True as 'may NOT attend': pass to_torch_mask(causal_mask(T))."),
        Mistake("no causal mask", _block_mistake(self_mask=None),
                "the result matches self-attention without the causal mask: with causal=True, position i may "
                "only attend to positions j <= i."),
        Mistake("memory mask not converted", _block_mistake(memory_padding="unconverted"),
                "the result matches passing memory_mask (True = real position) straight as key_padding_mask, "
                "which PyTorch reads as True = padding: pass to_torch_mask(memory_mask)."),
        Mistake("memory mask ignored", _block_mistake(memory_padding=None),
                "padded memory positions got attention weight: pass the memory mask to the cross attention "
                "(key_padding_mask=to_torch_mask(memory_mask))."),
        Mistake("norm placement ignored", _block_mistake(post=True),
                "the result is post-norm although norm_first=True: pre-norm normalises the input of each "
                "sub-layer, x = x + sublayer(norm(x))."),
        Mistake("always pre-norm", _block_mistake(post=False),
                "the result is pre-norm although norm_first=False: post-norm normalises the sum, "
                "x = norm(x + sublayer(x))."),
        Mistake("no residual around the cross attention", _block_mistake(cross_residual=False),
                "the cross attention's output replaced x instead of being added to it: every sub-layer has a "
                "residual connection."),
        Mistake("cross attention over the decoder states", _block_mistake(cross_on_self=True),
                "the second attention attended over the decoder states: its keys and values are `memory`."),
        Mistake("norms in the wrong places", _block_mistake(norms=(1, 3, 2)),
                "norm2 belongs to the cross attention and norm3 to the feed-forward network."),
        Mistake("GELU instead of ReLU", _block_mistake(activation=F.gelu),
                "the feed-forward network here uses ReLU (nn.TransformerDecoderLayer's default); GELU is GPT's."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. the seq2seq loss


def _loss_ref(inputs):
    logits, targets = inputs["logits"], inputs["targets"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=inputs["pad_id"], reduction=inputs["reduction"])


def _token_nll(logits, targets, pad_id, log_probs=None):
    lp = torch.log_softmax(logits, dim=-1) if log_probs is None else log_probs
    nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return nll, targets != pad_id


def _loss_pad_counted(logits, targets, pad_id, reduction="mean"):
    nll = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return nll.sum() if reduction == "sum" else nll.mean()


def _loss_mean_all_positions(logits, targets, pad_id, reduction="mean"):
    nll, keep = _token_nll(logits, targets, pad_id)
    total = (nll * keep).sum()
    return total if reduction == "sum" else total / targets.numel()


def _loss_mean_per_sequence(logits, targets, pad_id, reduction="mean"):
    nll, keep = _token_nll(logits, targets, pad_id)
    per_seq = (nll * keep).sum(1)
    return per_seq.sum() if reduction == "sum" else (per_seq / keep.sum(1)).mean()


def _loss_log_of_softmax(logits, targets, pad_id, reduction="mean"):
    nll, keep = _token_nll(logits, targets, pad_id, log_probs=torch.log(torch.softmax(logits, -1)))
    total = nll[keep].sum()  # indexing, not multiplying: inf * 0 would be nan
    return total if reduction == "sum" else total / keep.sum()


def _loss_pad_zero(logits, targets, pad_id, reduction="mean"):
    nll, keep = _token_nll(logits, targets, 0)
    return nll[keep].sum() if reduction == "sum" else nll[keep].mean()


def _loss_always_mean(logits, targets, pad_id, reduction="mean"):
    nll, keep = _token_nll(logits, targets, pad_id)
    return nll[keep].mean()


LOSS = Check(
    H.LOSS,
    reference=lambda inputs: _loss_ref(inputs).reshape(1),  # the task's call passes one number as 1 element
    tolerance=FP32_LOSS,
    mistakes=(
        Mistake("padding counted", _loss_pad_counted,
                "the loss includes the padding positions: leave out every position whose target is pad_id."),
        Mistake("mean over every position", _loss_mean_all_positions,
                "you divided by the number of all positions, padding included: 'mean' divides the summed "
                "loss by the number of real (non-pad) target tokens."),
        Mistake("mean per sequence", _loss_mean_per_sequence,
                "the result matches averaging within each sequence, then over the batch: 'mean' is "
                "over all real tokens of the batch together (long sequences weigh more)."),
        Mistake("log of softmax", _loss_log_of_softmax,
                "log(softmax(x)) underflows to log(0) = -inf for large logits: use torch.log_softmax, "
                "which computes x - logsumexp(x) stably."),
        Mistake("pad id hard-coded", _loss_pad_zero,
                "use the pad_id argument; the padding id is not always 0."),
        Mistake("reduction ignored", _loss_always_mean,
                "the result is the mean although reduction='sum' was asked for."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 5. beam search

def _beam_ref(next_log_probs, beam_size, max_len, bos_id=BOS, eos_id=EOS):
    prefixes = torch.full((1, 1), bos_id, dtype=torch.long)
    scores = torch.zeros(1)
    finished: list[tuple[float, torch.Tensor]] = []
    for step in range(max_len):
        log_probs = next_log_probs(prefixes)  # (live, V)
        V = log_probs.shape[-1]
        candidates = (scores[:, None] + log_probs).reshape(-1)
        top_scores, top_idx = candidates.topk(min(beam_size, candidates.numel()))
        rows, toks = top_idx // V, top_idx % V
        new_prefixes = torch.cat([prefixes[rows], toks[:, None]], dim=1)
        ended = (toks == eos_id) | (step == max_len - 1)
        finished += [(float(s), p[1:]) for s, p, e in zip(top_scores, new_prefixes, ended) if e]
        prefixes, scores = new_prefixes[~ended], top_scores[~ended]
        if len(prefixes) == 0:
            break
    best_score, best = max(finished, key=lambda item: item[0])
    return best, torch.tensor(best_score)


def _describe_beam(inputs):
    s = inputs["next_log_probs"]
    return f"TinyScorer(vocab_size={s.vocab_size}), beam_size={inputs['beam_size']}, max_len={inputs['max_len']}"


def _beam_best_by_brute_force(inputs):
    s = inputs["next_log_probs"]
    tokens, score = brute_force_best(s, s.vocab_size, inputs["max_len"])
    return torch.tensor(tokens), torch.tensor(score)


def _beam_one_is_greedy(inputs):
    tokens, scores = _greedy_ref(inputs["next_log_probs"], 1, inputs["max_len"])
    return tokens[0], scores[0]


def _beam_length_normalised(next_log_probs, beam_size, max_len, bos_id=BOS, eos_id=EOS):
    # The same search, but the final choice divides by the length.
    prefixes = torch.full((1, 1), bos_id, dtype=torch.long)
    scores = torch.zeros(1)
    finished = []
    for step in range(max_len):
        log_probs = next_log_probs(prefixes)
        V = log_probs.shape[-1]
        top_scores, top_idx = (scores[:, None] + log_probs).reshape(-1).topk(min(beam_size, prefixes.shape[0] * V))
        rows, toks = top_idx // V, top_idx % V
        new_prefixes = torch.cat([prefixes[rows], toks[:, None]], dim=1)
        ended = (toks == eos_id) | (step == max_len - 1)
        finished += [(float(s), p[1:]) for s, p, e in zip(top_scores, new_prefixes, ended) if e]
        prefixes, scores = new_prefixes[~ended], top_scores[~ended]
        if len(prefixes) == 0:
            break
    score, best = max(finished, key=lambda item: item[0] / len(item[1]))
    return best, torch.tensor(score)


def _beam_never_finishes(next_log_probs, beam_size, max_len, bos_id=BOS, eos_id=EOS):
    # EOS treated like any token: hypotheses are extended after it, and the best full-length one wins.
    prefixes = torch.full((1, 1), bos_id, dtype=torch.long)
    scores = torch.zeros(1)
    for _ in range(max_len):
        log_probs = next_log_probs(prefixes)
        V = log_probs.shape[-1]
        top_scores, top_idx = (scores[:, None] + log_probs).reshape(-1).topk(min(beam_size, prefixes.shape[0] * V))
        prefixes = torch.cat([prefixes[top_idx // V], (top_idx % V)[:, None]], dim=1)
        scores = top_scores
    return prefixes[0, 1:], scores[0]


def _beam_per_hypothesis(next_log_probs, beam_size, max_len, bos_id=BOS, eos_id=EOS):
    # Each hypothesis keeps its own best continuations; the first beam_size of those survive, unsorted.
    prefixes = torch.full((1, 1), bos_id, dtype=torch.long)
    scores = torch.zeros(1)
    finished = []
    for step in range(max_len):
        log_probs = next_log_probs(prefixes)
        k = min(beam_size, log_probs.shape[-1])
        top_lp, top_tok = log_probs.topk(k, dim=-1)
        cand_scores = (scores[:, None] + top_lp).reshape(-1)[:beam_size]
        rows = torch.arange(prefixes.shape[0]).repeat_interleave(k)[:beam_size]
        toks = top_tok.reshape(-1)[:beam_size]
        new_prefixes = torch.cat([prefixes[rows], toks[:, None]], dim=1)
        ended = (toks == eos_id) | (step == max_len - 1)
        finished += [(float(s), p[1:]) for s, p, e in zip(cand_scores, new_prefixes, ended) if e]
        prefixes, scores = new_prefixes[~ended], cand_scores[~ended]
        if len(prefixes) == 0:
            break
    score, best = max(finished, key=lambda item: item[0])
    return best, torch.tensor(score)


def _beam_last_score_only(next_log_probs, beam_size, max_len, bos_id=BOS, eos_id=EOS):
    # Candidates ranked by the log-probability of their last token only.
    prefixes = torch.full((1, 1), bos_id, dtype=torch.long)
    finished = []
    for step in range(max_len):
        log_probs = next_log_probs(prefixes)
        V = log_probs.shape[-1]
        top_scores, top_idx = log_probs.reshape(-1).topk(min(beam_size, prefixes.shape[0] * V))
        rows, toks = top_idx // V, top_idx % V
        new_prefixes = torch.cat([prefixes[rows], toks[:, None]], dim=1)
        ended = (toks == eos_id) | (step == max_len - 1)
        finished += [(float(s), p[1:]) for s, p, e in zip(top_scores, new_prefixes, ended) if e]
        prefixes = new_prefixes[~ended]
        if len(prefixes) == 0:
            break
    score, best = max(finished, key=lambda item: item[0])
    return best, torch.tensor(score)


def _beam_reference(inputs):
    """Brute-force enumeration, greedy decoding, or the reference beam, as the case says."""
    kind = inputs.get("_compare_with", "beam")
    clean = {k: v for k, v in inputs.items() if not k.startswith("_")}
    if kind == "brute force":
        tokens, score = _beam_best_by_brute_force(clean)
    elif kind == "greedy":
        tokens, score = _beam_one_is_greedy(clean)
    else:
        tokens, score = _beam_ref(**clean)
    return tokens, score.reshape(1)  # the task's call passes the score as 1 element


BEAM = Check(
    H.BEAM,
    reference=_beam_reference,
    tolerance=DECODE,
    describe_inputs=_describe_beam,
    mistakes=(
        Mistake("length-normalised choice", _beam_length_normalised,
                "the result matches choosing the finished hypothesis with the best score per token: "
                "here the best hypothesis is the one with the highest total log-probability."),
        Mistake("EOS does not finish a hypothesis", _beam_never_finishes,
                "a hypothesis that ends with EOS is complete: move it out of the beam into the finished "
                "list instead of extending it further."),
        Mistake("candidates ranked per hypothesis", _beam_per_hypothesis,
                "rank all (hypothesis, next token) candidates of a step together by their total score "
                "and keep the beam_size best overall."),
        Mistake("ranked by the last token only", _beam_last_score_only,
                "a candidate's score is its hypothesis's score plus the new token's log-probability, "
                "not the last log-probability alone."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 6. the sampling distribution, against transformers' logits warpers


def _filter_ref(inputs):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(inputs["temperature"])(None, inputs["logits"].clone())
    if inputs["top_k"] is not None:
        scores = TopKLogitsWarper(inputs["top_k"])(None, scores)
    if inputs["top_p"] is not None:
        scores = TopPLogitsWarper(inputs["top_p"])(None, scores)
    return torch.softmax(scores, dim=-1)


def _describe_filter(inputs):
    B, V = inputs["logits"].shape
    return (f"logits ({B}, {V}), temperature={inputs['temperature']}, top_k={inputs['top_k']}, "
            f"top_p={inputs['top_p']}")


def _top_k(scores, k):
    kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p(scores, p, *, include_crossing=True):
    probs, order = torch.softmax(scores, -1).sort(-1, descending=True)
    before = probs.cumsum(-1) - probs
    remove = before >= p if include_crossing else probs.cumsum(-1) > p
    remove[..., 0] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def _filter_wrong(*, multiply=False, p_before_k=False, no_renorm=False, crossing=True, temperature_last=False):
    def wrong(logits, temperature=1.0, top_k=None, top_p=None):
        scores = logits * temperature if multiply else (logits if temperature_last else logits / temperature)
        steps = [("k", top_k), ("p", top_p)]
        if p_before_k:
            steps.reverse()
        for kind, value in steps:
            if value is None:
                continue
            scores = _top_k(scores, value) if kind == "k" else _top_p(scores, value, include_crossing=crossing)
        if temperature_last:
            scores = scores / temperature
        if no_renorm:
            keep = torch.isfinite(scores)
            return torch.softmax(logits / temperature, -1) * keep
        return torch.softmax(scores, -1)
    return wrong


FILTER = Check(
    H.FILTER,
    reference=_filter_ref,
    tolerance=Tolerance(1e-6, 1e-5, "float32 softmax of the same kept logits; which tokens are kept is decided "
                                    "by comparisons that a correct implementation makes the same way"),
    describe_inputs=_describe_filter,
    mistakes=(
        Mistake("temperature multiplied", _filter_wrong(multiply=True),
                "the logits are DIVIDED by the temperature: a temperature above 1 flattens the distribution."),
        Mistake("top-p before top-k", _filter_wrong(p_before_k=True),
                "with both set, top-k comes first and top-p works on what top-k kept (renormalised), the order "
                "of transformers' generate."),
        Mistake("not renormalised", _filter_wrong(no_renorm=True),
                "the kept probabilities do not sum to 1: take the softmax over the kept tokens only "
                "(removed tokens' logits set to -inf)."),
        Mistake("nucleus without the token that crosses p", _filter_wrong(crossing=False),
                "top-p keeps the smallest set of most probable tokens whose probabilities reach p: the token "
                "that crosses p is kept (keep a token when the tokens before it add up to less than p)."),
        Mistake("temperature after filtering", _filter_wrong(temperature_last=True),
                "the temperature comes first: top-k and top-p choose tokens from the tempered distribution."),
    ),
)


CHECKS = CheckSet(CHAPTER, [GREEDY, CROSS, BLOCK, LOSS, BEAM, FILTER])
check = CHECKS.check
