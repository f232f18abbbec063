"""A text-matching task generated in code: does sentence ``a`` imply sentence ``b``?

Every sentence states an **event**: who did what to whom, and when,

    Event(agent="doctor", action="help", patient="lawyer", time="monday")

where the agent and the time may be left open (``None``): "a person helped the lawyer", "the lawyer was
helped by a person once" (an open agent is "a person", an open time a vague phrase such as "once" or
"at some point": as many words as a filled slot, so that length gives nothing away). It is **realised** with a random choice of synonyms
for each slot ("doctor" / "physician", "helped" / "assisted" / "aided", ...), in the active or the
passive voice, with the time phrase at the start or the end::

    the physician assisted the lawyer on monday
    at the start of the week the lawyer was aided by the doctor
    a person helped the attorney at some point       (agent and time left open)

A pair ``(a, b)`` **matches** when ``a`` implies ``b``: the same action and patient, and ``b`` says
nothing that ``a`` does not (an open slot in ``b`` is implied by any value in ``a``; see
:func:`implies`). This is the question natural-language inference asks ("does the premise entail the
hypothesis?"), and it is **directional**: "the doctor helped the lawyer" implies "a person helped the
lawyer", not the other way round. Any score that is symmetric in its two texts -- word overlap, the
cosine of two embeddings made by the same tower -- gives both directions the same value.

* a **positive** for an anchor is the anchor's event, or a generalisation of it (agent and/or time
  left open), said with some of the choices (synonyms, voice, position of the time phrase) drawn anew;
* a **hard negative** is said with a variant of the anchor's words drawn in exactly the same way and
  is one of (:data:`HARD_NEGATIVE_KINDS`): **more specific** than the anchor (it fills in the agent or
  the time the anchor left open: implied *by* nothing the anchor says), roles swapped, or another
  agent, patient, action or time.

Events are split into train and test by a fixed hash, so test events are never seen in training.
Sentences are lower-case words separated by spaces; :class:`Vocab` maps them to ids, with ``[PAD]``
= 0, ``[CLS]`` = 1, ``[SEP]`` = 2 (BERT's layout of a pair, ``[CLS] a [SEP] b [SEP]``).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from coursekit.encoder import EncoderConfig, TransformerEncoder

# Each concept with its synonyms. Actions: (past tense, past participle) for the two voices.
PEOPLE: dict[str, tuple[str, ...]] = {
    "doctor": ("doctor", "physician"),
    "lawyer": ("lawyer", "attorney"),
    "child": ("child", "kid"),
    "teacher": ("teacher", "instructor"),
    "chef": ("chef", "cook"),
    "pilot": ("pilot", "aviator"),
    "officer": ("officer", "policeman"),
    "student": ("student", "pupil"),
    "boss": ("boss", "manager"),
    "singer": ("singer", "vocalist"),
    "farmer": ("farmer", "grower"),
    "nurse": ("nurse", "carer"),
}
ACTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "help": (("helped", "helped"), ("assisted", "assisted"), ("aided", "aided")),
    "call": (("called", "called"), ("phoned", "phoned"), ("rang", "rung")),
    "praise": (("praised", "praised"), ("complimented", "complimented"), ("commended", "commended")),
    "hire": (("hired", "hired"), ("employed", "employed"), ("recruited", "recruited")),
    "watch": (("watched", "watched"), ("observed", "observed")),
    "greet": (("greeted", "greeted"), ("welcomed", "welcomed")),
    "warn": (("warned", "warned"), ("alerted", "alerted"), ("cautioned", "cautioned")),
    "pay": (("paid", "paid"), ("compensated", "compensated")),
}
TIMES: dict[str, tuple[str, ...]] = {
    "yesterday": ("yesterday", "the day before"),
    "monday": ("on monday", "at the start of the week"),
    "morning": ("this morning", "earlier today"),
    "night": ("last night", "yesterday evening"),
    "weekend": ("at the weekend", "over the weekend"),
}
# Open slots are said with words of the same length as a filled one, so that the number of words
# does not tell a generalisation from a more specific sentence: "a person" for an open agent, and a
# vague time phrase (lengths 1 to 6, like the real ones) for an open time.
SOMEONE = "a person"
VAGUE_TIMES: tuple[str, ...] = ("once", "one day", "at some point", "some time ago", "at some point in the past")

HARD_NEGATIVE_KINDS = ("more specific", "swap roles", "other agent", "other patient", "other action",
                       "other time")
# How often each kind of hard negative is drawn: half of them are "more specific", the direction test.
HARD_NEGATIVE_WEIGHTS = (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Event:
    """Who did what to whom, and when (concept names, the keys of the tables above); the agent and
    the time may be ``None``: left open ("a person ...", a vague time phrase)."""

    agent: str | None
    action: str
    patient: str
    time: str | None

    def __post_init__(self) -> None:
        for slot, table in (("agent", PEOPLE), ("action", ACTIONS), ("patient", PEOPLE), ("time", TIMES)):
            value = getattr(self, slot)
            if value is None and slot in ("agent", "time"):
                continue
            if value not in table:
                raise ValueError(f"unknown {slot} {value!r}; choose from {sorted(table)}"
                                 + (" or None" if slot in ("agent", "time") else ""))
        if self.agent == self.patient:
            raise ValueError(f"agent and patient must differ, both are {self.agent!r}")

    @property
    def full(self) -> bool:
        return self.agent is not None and self.time is not None

    @property
    def split(self) -> str:
        """``"test"`` for a fixed fifth of all full events (by a hash of the event), else ``"train"``;
        an event with open slots belongs to the split of the full events it was made from
        (see :func:`random_event`), so this is only defined for full events."""
        if not self.full:
            raise ValueError("split is defined for full events (agent and time given)")
        key = "|".join((self.agent, self.action, self.patient, self.time))
        return "test" if zlib.crc32(key.encode()) % 1000 < TEST_FRACTION * 1000 else "train"


def implies(a: Event, b: Event) -> bool:
    """Does ``a`` imply ``b``? The same action and patient, and every slot ``b`` fills is filled the
    same way in ``a`` (an open slot in ``b`` is implied by anything). Directional: a full event implies
    its generalisations, not the other way round."""
    return (a.action == b.action and a.patient == b.patient and b.agent in (None, a.agent)
            and b.time in (None, a.time))


@dataclass(frozen=True)
class Surface:
    """The choices that turn an event into words: synonym numbers, voice and word order."""

    agent: int
    action: int
    patient: int
    time: int
    passive: bool
    time_first: bool


def number_of_events() -> int:
    """Full events (agent and time given)."""
    n = len(PEOPLE)
    return n * (n - 1) * len(ACTIONS) * len(TIMES)


def random_event(rng: random.Random, split: str | None = None) -> Event:
    """A uniformly random full event, from the given split (``"train"``, ``"test"``) or from all."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    people = sorted(PEOPLE)
    while True:
        agent, patient = rng.sample(people, 2)
        event = Event(agent, rng.choice(sorted(ACTIONS)), patient, rng.choice(sorted(TIMES)))
        if split is None or event.split == split:
            return event


def generalisations(event: Event) -> list[Event]:
    """The event itself and every event made from it by leaving the agent and/or the time open."""
    out = [event]
    if event.agent is not None:
        out.append(replace(event, agent=None))
    if event.time is not None:
        out.append(replace(event, time=None))
    if event.agent is not None and event.time is not None:
        out.append(replace(event, agent=None, time=None))
    return out


def random_surface(event: Event, rng: random.Random) -> Surface:
    n_agent = len(PEOPLE[event.agent]) if event.agent is not None else 1
    n_time = len(TIMES[event.time]) if event.time is not None else len(VAGUE_TIMES)
    return Surface(rng.randrange(n_agent), rng.randrange(len(ACTIONS[event.action])),
                   rng.randrange(len(PEOPLE[event.patient])), rng.randrange(n_time),
                   rng.random() < 0.5, rng.random() < 0.5)


def realise(event: Event, surface: Surface) -> str:
    """The sentence for ``event`` with the given choices (synonym numbers wrap around). An open agent
    is "a person", an open time one of :data:`VAGUE_TIMES`."""
    patient = PEOPLE[event.patient][surface.patient % len(PEOPLE[event.patient])]
    past, participle = ACTIONS[event.action][surface.action % len(ACTIONS[event.action])]
    agent = SOMEONE if event.agent is None else "the " + PEOPLE[event.agent][surface.agent % len(PEOPLE[event.agent])]
    clause = (f"the {patient} was {participle} by {agent}" if surface.passive
              else f"{agent} {past} the {patient}")
    times = VAGUE_TIMES if event.time is None else TIMES[event.time]
    time = times[surface.time % len(times)]
    return f"{time} {clause}" if surface.time_first else f"{clause} {time}"


def vary(event: Event, surface: Surface, rng: random.Random) -> Surface:
    """Another way of saying it: every choice of ``surface`` is drawn again with a probability that is
    itself random (from 0.2 to 1), so a variant keeps anything from most to almost none of the words."""
    p = rng.uniform(0.2, 1.0)
    fresh = random_surface(event, rng)
    return Surface(*(new if rng.random() < p else old
                     for old, new in zip(vars(surface).values(), vars(fresh).values())))


def paraphrase(event: Event, surface: Surface, rng: random.Random) -> str:
    """The same event said another way (never with exactly the same words)."""
    anchor = realise(event, surface)
    for _ in range(100):
        sentence = realise(event, vary(event, surface, rng))
        if sentence != anchor:
            return sentence
    raise RuntimeError(f"no other wording found for {anchor!r}")


def applicable(event: Event, kind: str) -> bool:
    """Whether a hard negative of this kind exists for ``event`` (a full event has nothing to fill in;
    an open agent cannot be swapped or replaced; an open time cannot be replaced)."""
    if kind not in HARD_NEGATIVE_KINDS:
        raise ValueError(f"unknown kind of hard negative {kind!r}; choose from {HARD_NEGATIVE_KINDS}")
    return {"more specific": not event.full, "swap roles": event.agent is not None,
            "other agent": event.agent is not None, "other time": event.time is not None}.get(kind, True)


def perturb(event: Event, kind: str, rng: random.Random, source: Event | None = None) -> Event:
    """A hard negative's event: ``kind`` from :data:`HARD_NEGATIVE_KINDS`. For ``"more specific"`` an
    open slot is filled in -- from ``source`` (the full event ``event`` was made from) if given, else at
    random; the others change one slot. The result is never implied by ``event``."""
    if not applicable(event, kind):
        raise ValueError(f"no {kind!r} hard negative for {event}")
    if kind == "more specific":
        options = []
        if event.agent is None:
            agent = source.agent if source else rng.choice(sorted(set(PEOPLE) - {event.patient}))
            options.append(replace(event, agent=agent))
        if event.time is None:
            options.append(replace(event, time=source.time if source else rng.choice(sorted(TIMES))))
        return rng.choice(options)
    if kind == "swap roles":
        return replace(event, agent=event.patient, patient=event.agent)
    if kind in ("other agent", "other patient"):
        taken = {event.agent, event.patient}
        person = rng.choice(sorted(set(PEOPLE) - taken))
        return replace(event, agent=person) if kind == "other agent" else replace(event, patient=person)
    slot, table = {"other action": ("action", ACTIONS), "other time": ("time", TIMES)}[kind]
    return replace(event, **{slot: rng.choice(sorted(set(table) - {getattr(event, slot)}))})


def hard_negative(event: Event, surface: Surface, rng: random.Random, kind: str | None = None,
                  source: Event | None = None) -> tuple[str, str, Event]:
    """(sentence, kind, its event): an event ``event`` does not imply, said with a variant of the
    anchor's words drawn exactly as a positive's are -- so the number of shared words does not tell
    the two apart."""
    if kind is None:
        kinds = [k for k in HARD_NEGATIVE_KINDS if applicable(event, k)]
        kind = rng.choices(kinds, [w for k, w in zip(HARD_NEGATIVE_KINDS, HARD_NEGATIVE_WEIGHTS) if k in kinds])[0]
    other = perturb(event, kind, rng, source)
    return realise(other, vary(other, surface, rng)), kind, other


def positive(event: Event, surface: Surface, rng: random.Random) -> tuple[str, Event]:
    """(sentence, its event): something ``event`` implies -- the event itself or a generalisation --
    said with a variant of the anchor's words (never exactly the anchor's sentence)."""
    anchor = realise(event, surface)
    for _ in range(100):
        target = rng.choice(generalisations(event))
        sentence = realise(target, vary(target, surface, rng))
        if sentence != anchor:
            return sentence, target
    raise RuntimeError(f"no positive found for {anchor!r}")


@dataclass(frozen=True)
class Triplet:
    """An anchor sentence, a sentence it implies, a hard negative (with the kind); the three events,
    and ``source``, the full event the anchor's was made from (its split is the triplet's)."""

    anchor: str
    positive: str
    negative: str
    kind: str
    event: Event
    positive_event: Event
    negative_event: Event
    source: Event


def random_anchor(rng: random.Random, split: str | None = None) -> tuple[Event, Event]:
    """(anchor event, the full event it was made from): half the time the full event, else one of its
    generalisations with at least one open slot."""
    full = random_event(rng, split)
    return (full if rng.random() < 0.5 else rng.choice(generalisations(full)[1:])), full


def triplet(rng: random.Random, split: str | None = None) -> Triplet:
    event, full = random_anchor(rng, split)
    surface = random_surface(event, rng)
    anchor = realise(event, surface)
    pos, pos_event = positive(event, surface, rng)
    negative, kind, neg_event = hard_negative(event, surface, rng, source=full)
    return Triplet(anchor, pos, negative, kind, event, pos_event, neg_event, full)


def triplets(n: int, split: str = "train", seed: int = 0) -> list[Triplet]:
    """``n`` triplets of events from ``split``, reproducible from ``seed``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = random.Random(f"triplets-{split}-{seed}")
    return [triplet(rng, split) for _ in range(n)]


def labelled_pairs(n: int, split: str = "test", seed: int = 0) -> tuple[list[str], list[str], torch.Tensor]:
    """``n`` pairs ``(a, b)``, half with ``a`` implying ``b`` (label 1) and half hard negatives (label 0), shuffled."""
    if not isinstance(n, int) or n < 2 or n % 2:
        raise ValueError(f"n must be an even integer >= 2, got {n!r}")
    rows = []
    for t in triplets(n // 2, split, seed):
        rows += [(t.anchor, t.positive, 1), (t.anchor, t.negative, 0)]
    random.Random(f"shuffle-{split}-{seed}").shuffle(rows)
    first, second, labels = zip(*rows)
    return list(first), list(second), torch.tensor(labels)


def easy_pairs(n: int, split: str = "test", seed: int = 0) -> tuple[list[str], list[str], torch.Tensor]:
    """``n`` pairs, half positives (label 1) and half a sentence of another, random event (label 0)."""
    if not isinstance(n, int) or n < 2 or n % 2:
        raise ValueError(f"n must be an even integer >= 2, got {n!r}")
    rng = random.Random(f"easy-{split}-{seed}")
    rows = []
    for t in triplets(n // 2, split, seed + 7919):
        other = random_event(rng, split)
        while other == t.source:
            other = random_event(rng, split)
        rows += [(t.anchor, t.positive, 1), (t.anchor, realise(other, random_surface(other, rng)), 0)]
    rng.shuffle(rows)
    first, second, labels = zip(*rows)
    return list(first), list(second), torch.tensor(labels)


@dataclass(frozen=True)
class RetrievalSet:
    """Queries and one pool of candidates: ``answers[i]`` is the index of the one candidate query i
    implies. The pool holds every query's answer and hard negatives, and fillers: sentences of other
    events; no query implies any candidate but its answer."""

    queries: list[str]
    candidates: list[str]
    answers: torch.Tensor


def retrieval_set(n_queries: int, n_candidates: int, negatives_per_query: int = 10, split: str = "test",
                  seed: int = 0) -> RetrievalSet:
    """A retrieval task: ``n_queries`` queries against ``n_candidates`` shuffled candidates. Every query
    leaves the agent or the time open, so its hard negatives include sentences more specific than it."""
    needed = n_queries * (1 + negatives_per_query)
    if n_queries < 1 or negatives_per_query < 0 or n_candidates < needed:
        raise ValueError(f"{n_queries} queries with 1 + {negatives_per_query} candidates each need "
                         f"n_candidates >= {needed}, got {n_candidates}")
    rng = random.Random(f"retrieval-{split}-{seed}")
    by_topic: dict[tuple[str, str], list[Event]] = {}   # (action, patient) -> query events

    def implied_by_a_query(e: Event) -> bool:
        return any(implies(q, e) for q in by_topic.get((e.action, e.patient), ()))

    # the queries first, so that every candidate can be checked against all of them
    chosen = []
    while len(chosen) < n_queries:
        full = random_event(rng, split)
        event = rng.choice(generalisations(full)[1:])
        if implied_by_a_query(event) or any(implies(event, q) for q in by_topic.get((event.action, event.patient), ())):
            continue
        by_topic.setdefault((event.action, event.patient), []).append(event)
        chosen.append((event, full))
    queries, pool, owner = [], [], []
    for event, full in chosen:
        surface = random_surface(event, rng)
        queries.append(realise(event, surface))
        while True:   # the answer: implied by this query and by no other
            sentence, target = positive(event, surface, rng)
            if sum(implies(q, target) for q in by_topic[(target.action, target.patient)]) == 1:
                break
        pool.append(sentence)
        owner.append(len(queries) - 1)
        added = 0
        while added < negatives_per_query:
            kinds = [k for k in HARD_NEGATIVE_KINDS if applicable(event, k)]
            kind = rng.choices(kinds, [w for k, w in zip(HARD_NEGATIVE_KINDS, HARD_NEGATIVE_WEIGHTS) if k in kinds])[0]
            other = perturb(event, kind, rng, full if rng.random() < 0.5 else None)
            if implied_by_a_query(other):
                continue
            pool.append(realise(other, vary(other, surface, rng)))
            owner.append(-1)
            added += 1
    while len(pool) < n_candidates:
        event = random_event(rng, split)
        if not implied_by_a_query(event):
            pool.append(realise(event, random_surface(event, rng)))
            owner.append(-1)
    order = list(range(len(pool)))
    rng.shuffle(order)
    candidates = [pool[i] for i in order]
    answers = torch.empty(n_queries, dtype=torch.long)
    for new, old in enumerate(order):
        if owner[old] >= 0:
            answers[owner[old]] = new
    return RetrievalSet(queries, candidates, answers)


def word_overlap(a: str, b: str) -> float:
    """Jaccard index of the two sentences' word sets (1 = the same words)."""
    wa, wb = set(a.split()), set(b.split())
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


# --- token ids ------------------------------------------------------------------------------------

PAD, CLS, SEP = 0, 1, 2
SPECIALS = ("[PAD]", "[CLS]", "[SEP]")


def _all_words() -> list[str]:
    words = {"the", "was", "by", *SOMEONE.split()}
    for form in VAGUE_TIMES:
        words.update(form.split())
    for table in (PEOPLE, TIMES):
        for forms in table.values():
            for form in forms:
                words.update(form.split())
    for forms in ACTIONS.values():
        for pair in forms:
            words.update(pair)
    return sorted(words)


class Vocab:
    """Word <-> id for the task's sentences; ids 0, 1, 2 are ``[PAD]``, ``[CLS]``, ``[SEP]``."""

    def __init__(self) -> None:
        self.words = list(SPECIALS) + _all_words()
        self.ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, sentence: str) -> list[int]:
        words = sentence.split()
        unknown = [w for w in words if w not in self.ids]
        if unknown or not words:
            raise ValueError(f"words not in the vocabulary: {unknown}" if unknown else "an empty sentence")
        return [self.ids[w] for w in words]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return " ".join(self.words[i] for i in ids if i != PAD)

    def batch(self, sentences: Sequence[str], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``(B, T)`` padded with ``[PAD]`` at the end, and the attention mask ``(B, T)`` (1 = word)."""
        if isinstance(sentences, str) or len(sentences) == 0:
            raise ValueError("batch expects a non-empty list of sentences")
        rows = [self.encode(s) for s in sentences]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids.to(device), (ids != PAD).long().to(device)


def max_sentence_length() -> int:
    """The longest sentence the generator can produce, in words."""
    longest = max(len(f.split()) for forms in PEOPLE.values() for f in forms)
    time = max(len(f.split()) for forms in TIMES.values() for f in forms)
    return 6 + 2 * longest + time  # passive: the P was V by the A TIME



# --- the tower both models share ------------------------------------------------------------------

class TokenEncoder(torch.nn.Module):
    """Token, position and segment embeddings followed by the course's Transformer encoder
    (:class:`coursekit.encoder.TransformerEncoder`): ids ``(B, T)`` -> token outputs ``(B, T, d_model)``.

    ``attention_mask`` is 1 at real tokens and 0 at padding (the Hugging Face convention); it becomes
    the encoder's key mask (True at real tokens). ``token_type_ids`` (0 for the first text, 1 for the second) are added
    only when given: a bi-encoder never passes them, a cross-encoder always does."""

    def __init__(self, vocab_size: int, config: EncoderConfig, max_len: int = 64):
        super().__init__()
        if vocab_size < 4 or max_len < 1:
            raise ValueError(f"need vocab_size >= 4 and max_len >= 1, got {vocab_size}, {max_len}")
        d = config.d_model
        self.config, self.max_len = config, max_len
        self.tokens = torch.nn.Embedding(vocab_size, d, padding_idx=PAD)
        self.positions = torch.nn.Embedding(max_len, d)
        self.segments = torch.nn.Embedding(2, d)
        self.encoder = TransformerEncoder(config)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() != 2 or attention_mask.shape != ids.shape:
            raise ValueError(f"ids and attention_mask must both be (B, T), got {tuple(ids.shape)} and "
                             f"{tuple(attention_mask.shape)}")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequences of {ids.shape[1]} tokens are longer than max_len={self.max_len}")
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))[None]
        if token_type_ids is not None:
            x = x + self.segments(token_type_ids)
        return self.encoder(x, key_mask=attention_mask != 0)


def encoder_config(d_model: int = 64, n_layers: int = 2, n_heads: int = 4) -> EncoderConfig:
    """The towers' configuration: pre-norm, GELU, d_ff = 2 d_model (as small as the task allows)."""
    return EncoderConfig(d_model=d_model, n_heads=n_heads, d_ff=2 * d_model, n_layers=n_layers,
                         norm_first=True, activation="gelu")
