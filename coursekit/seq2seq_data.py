"""A sequence-to-sequence task generated in code, and a tiny scoring model for checking decoders.

**Numbers to words.** The source is the digits of a number, the target its English words::

    "4207"  ->  four thousand two hundred seven <eos>

Input and output have different lengths and vocabularies, and the output length depends on the
digits ("17" -> one word, "27" -> two), so the task needs an encoder-decoder.

**A tiny scoring model** (:class:`TinyScorer`) gives next-token log-probabilities that depend on the
whole prefix. It is small enough that every output sequence can be enumerated
(:func:`brute_force_best`), which is how greedy and beam search are checked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# --- vocabularies ---------------------------------------------------------------------------------

PAD, BOS, EOS = 0, 1, 2  # target ids; PAD is also 0 in the source vocabulary

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

SRC_VOCAB: tuple[str, ...] = ("<pad>",) + tuple("0123456789")
TGT_VOCAB: tuple[str, ...] = ("<pad>", "<bos>", "<eos>") + tuple(_ONES) + tuple(_TENS) + ("hundred", "thousand", "and")
_TGT_ID = {w: i for i, w in enumerate(TGT_VOCAB)}

MAX_NUMBER = 999_999


def number_to_words(n: int, british: bool = False) -> list[str]:
    """English words of ``0 <= n <= 999999``: 4207 -> four thousand two hundred seven.

    ``british=True`` puts "and" between the hundreds and the rest of a group (two hundred and seven),
    as British English does; American English leaves it out.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"number_to_words expects an int, got {type(n).__name__}")
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number_to_words supports 0 <= n <= {MAX_NUMBER}, got {n}")
    if n == 0:
        return ["zero"]

    def below_thousand(m: int) -> list[str]:
        words = []
        if m >= 100:
            words += [_ONES[m // 100], "hundred"]
            m %= 100
            if british and m:
                words.append("and")
        if m >= 20:
            words.append(_TENS[m // 10 - 2])
            m %= 10
        if m > 0:
            words.append(_ONES[m])
        return words

    thousands, rest = divmod(n, 1000)
    words = below_thousand(thousands) + ["thousand"] if thousands else []
    return words + below_thousand(rest)


def max_lengths(high: int) -> tuple[int, int]:
    """(source length, target length including <eos>) that fit every number in ``0 <= n < high``."""
    if not 1 <= high <= MAX_NUMBER + 1:
        raise ValueError(f"high must be in [1, {MAX_NUMBER + 1}], got {high}")
    longest = max(len(number_to_words(n, british=True)) for n in range(high))
    return len(str(high - 1)), longest + 1


def valid_renderings(n: int) -> set[str]:
    """Every correct text for ``n``: the American and the British style (the same for most n < 100)."""
    return {" ".join(number_to_words(n)), " ".join(number_to_words(n, british=True))}


def encode_numbers(numbers: Sequence[int] | torch.Tensor, src_len: int, tgt_len: int, british_prob: float = 0.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Source digits and target words as padded id tensors.

    Returns ``src`` of shape (B, src_len) -- digit ``d`` has id ``d + 1``, padding (after the digits)
    is PAD -- and ``tgt`` of shape (B, tgt_len): the word ids, then EOS, then PAD. Each target is
    written in the British style (with "and") with probability ``british_prob``, drawn independently.
    """
    numbers = [int(n) for n in (numbers.tolist() if isinstance(numbers, torch.Tensor) else numbers)]
    if not numbers:
        raise ValueError("encode_numbers needs at least one number")
    if not 0.0 <= british_prob <= 1.0:
        raise ValueError(f"british_prob must be in [0, 1], got {british_prob}")
    british = (torch.rand(len(numbers), generator=generator) < british_prob).tolist()
    src = torch.full((len(numbers), src_len), PAD, dtype=torch.long)
    tgt = torch.full((len(numbers), tgt_len), PAD, dtype=torch.long)
    for row, n in enumerate(numbers):
        digits = [int(c) + 1 for c in str(n)]
        words = [_TGT_ID[w] for w in number_to_words(n, british=british[row])] + [EOS]
        if len(digits) > src_len or len(words) > tgt_len:
            raise ValueError(f"{n} needs src_len >= {len(digits)} and tgt_len >= {len(words)}, "
                             f"got {src_len} and {tgt_len}")
        src[row, :len(digits)] = torch.tensor(digits)
        tgt[row, :len(words)] = torch.tensor(words)
    return src, tgt


def split_numbers(high: int, n_test: int, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random split of ``0 .. high-1`` into training numbers and ``n_test`` held-out test numbers."""
    if not 0 < n_test < high:
        raise ValueError(f"need 0 < n_test < high, got n_test={n_test}, high={high}")
    perm = torch.randperm(high, generator=generator)
    return perm[n_test:], perm[:n_test]


def decode_words(ids: Sequence[int] | torch.Tensor) -> str:
    """Target ids back to text, stopping at the first EOS and skipping PAD and BOS."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    words = []
    for i in ids:
        if i == EOS:
            break
        if i not in (PAD, BOS):
            words.append(TGT_VOCAB[i])
    return " ".join(words)


def decode_digits(ids: Sequence[int] | torch.Tensor) -> str:
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return "".join(SRC_VOCAB[i] for i in ids if i != PAD)


# --- a tiny scoring model whose best output can be enumerated -----------------------------------

class TinyScorer:
    """A fixed next-token model: ``log p(next | prefix)`` from a table, for checking decoders.

    Token ids ``0, 1, 2`` are PAD, BOS, EOS (the same convention as the number task); PAD and BOS get
    log-probability ``-inf``, so they are never generated. The logits at step ``t`` (prefix length
    ``t``) are ``bias[t-1] + context[row] + sum_i table[i, prefix[:, i]]``: they depend on the step, on
    every earlier token and its position, and -- for a batch -- on the row, which plays the role of a
    source sentence.

    Call it with a LongTensor prefix of shape (rows, t), BOS first; it returns (rows, vocab_size)
    log-probabilities. A scorer built with ``batch_size=1`` accepts any number of rows (all score the
    same context, as the hypotheses of one beam do); otherwise ``rows`` must equal ``batch_size``.
    """

    def __init__(self, vocab_size: int = 6, max_len: int = 4, batch_size: int = 1, sharpness: float = 1.5,
                 generator: torch.Generator | None = None):
        if vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4 (PAD, BOS, EOS and a word), got {vocab_size}")
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"max_len and batch_size must be >= 1, got {max_len} and {batch_size}")
        self.vocab_size, self.max_len, self.batch_size = vocab_size, max_len, batch_size
        self.table = torch.randn(max_len, vocab_size, vocab_size, generator=generator) * sharpness
        self.bias = torch.randn(max_len, vocab_size, generator=generator) * sharpness
        self.context = torch.randn(batch_size, vocab_size, generator=generator) * sharpness

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        if not isinstance(prefix, torch.Tensor) or prefix.ndim != 2:
            raise ValueError(f"the prefix must be a 2-D LongTensor (rows, t), got "
                             f"{tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__}")
        if prefix.dtype != torch.long:
            raise ValueError(f"the prefix must hold token ids (torch.long), got {prefix.dtype}")
        rows, t = prefix.shape
        if not 1 <= t <= self.max_len:
            raise ValueError(f"this scorer takes prefixes of length 1..{self.max_len} (BOS plus at most "
                             f"max_len - 1 tokens), got length {t}")
        if self.batch_size > 1 and rows != self.batch_size:
            raise ValueError(f"this scorer was built for a batch of {self.batch_size} rows, got {rows}")
        if prefix.min() < 0 or prefix.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {prefix.min()}..{prefix.max()}")
        logits = self.bias[t - 1] + self.context.expand(rows, -1).clone()
        for i in range(t):
            logits = logits + self.table[i, prefix[:, i]]
        logits[:, PAD] = float("-inf")
        logits[:, BOS] = float("-inf")
        return torch.log_softmax(logits, dim=-1)


def sequence_log_prob(next_log_probs, tokens: Sequence[int], bos_id: int = BOS) -> float:
    """Sum of ``log p(token | prefix)`` over ``tokens`` (BOS not included), for one sequence."""
    prefix = torch.tensor([[bos_id]])
    total = 0.0
    for tok in tokens:
        total += float(next_log_probs(prefix)[0, tok])
        prefix = torch.cat([prefix, torch.tensor([[tok]])], dim=1)
    return total


def brute_force_best(next_log_probs, vocab_size: int, max_len: int, bos_id: int = BOS, eos_id: int = EOS
                     ) -> tuple[list[int], float]:
    """The highest-scoring output by enumeration: every sequence that ends with its first EOS within
    ``max_len`` tokens, plus every ``max_len``-token sequence without EOS (tokens with log-probability
    -inf are skipped). Exponential in ``max_len``: tiny models only."""
    if vocab_size ** max_len > 200_000:
        raise ValueError(f"{vocab_size}^{max_len} sequences are too many to enumerate")
    best: list = [None, float("-inf")]

    def visit(seq: list[int], score: float) -> None:
        prefix = torch.tensor([[bos_id] + seq])
        log_probs = next_log_probs(prefix)[0].tolist()
        for tok, lp in enumerate(log_probs):
            if lp == float("-inf"):
                continue
            total = score + lp
            if tok == eos_id or len(seq) + 1 == max_len:
                if total > best[1]:
                    best[0], best[1] = seq + [tok], total
            else:
                visit(seq + [tok], total)

    visit([], 0.0)
    return best[0], best[1]
