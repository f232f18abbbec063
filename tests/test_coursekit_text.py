"""coursekit.minilm (the real all-MiniLM-L6-v2, offline) and coursekit.matching (chapter 17's data)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from coursekit import minilm

TEXTS = ["A man is playing a guitar.", "hi", "The boat drifted towards the river bank in the evening fog."]


# --- coursekit.minilm -----------------------------------------------------------------------------

def test_model_folder_is_complete():
    path = minilm.model_path()
    assert (path / "model.safetensors").stat().st_size > 80e6
    assert (path / "1_Pooling" / "config.json").is_file()


def test_loaders_are_cached_and_offline():
    st = minilm.load_sentence_transformer()
    assert minilm.load_sentence_transformer() is st and minilm.load_sentence_transformer("cpu") is st
    model = minilm.load_model()
    assert minilm.load_model("cpu") is model and not model.training
    assert minilm.load_tokenizer() is minilm.load_tokenizer()
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert minilm.parameter_count(model) == 22_713_216
    assert model.config.hidden_size == minilm.EMBEDDING_DIM and st.max_seq_length == minilm.MAX_SEQ_LENGTH


def test_encode_is_masked_mean_pooling_then_normalisation():
    """The fact chapter 18 is built on: Pooling(mean) + Normalize over the token outputs = encode()."""
    st = minilm.load_sentence_transformer()
    h, mask = minilm.token_outputs(TEXTS)
    assert h.shape[:2] == mask.shape and h.shape[-1] == 384 and mask.dtype == torch.int64
    assert (mask == 0).any(), "the batch must contain padding for this test to mean something"
    m = mask[..., None].float()
    ours = F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    reference = st.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    plain = F.normalize(h.mean(1), dim=-1)  # padding counted: wrong for the padded rows
    assert (plain - reference).abs().max() > 1e-2


def test_tokenize_truncates_like_sentence_transformers_and_rejects_bad_input():
    batch = minilm.tokenize(["word " * 400, "short"])
    assert batch["input_ids"].shape == (2, minilm.MAX_SEQ_LENGTH)
    assert batch["attention_mask"][1].sum() == 3  # [CLS] short [SEP]
    with pytest.raises(TypeError, match="list of strings"):
        minilm.tokenize("not a list")
    with pytest.raises(ValueError, match="at least one"):
        minilm.tokenize([])


def test_random_model_is_untrained_and_reproducible():
    a, b = minilm.random_model(seed=1), minilm.random_model(seed=1)
    trained = minilm.load_model()
    wa = a.encoder.layer[0].attention.self.query.weight
    assert torch.equal(wa, b.encoder.layer[0].attention.self.query.weight)
    assert not torch.allclose(wa, trained.encoder.layer[0].attention.self.query.weight)
    state = torch.random.get_rng_state()
    minilm.random_model(seed=2)
    assert torch.equal(state, torch.random.get_rng_state()), "random_model must not disturb the global RNG"


# --- coursekit.matching ---------------------------------------------------------------------------

from coursekit import matching  # noqa: E402


def test_events_split_and_realise():
    import random

    rng = random.Random(0)
    splits = [matching.random_event(rng).split for _ in range(2000)]
    assert 0.15 < splits.count("test") / len(splits) < 0.25
    event = matching.Event("doctor", "help", "lawyer", "monday")
    active = matching.Surface(0, 0, 0, 0, passive=False, time_first=False)
    passive = matching.Surface(1, 1, 1, 1, passive=True, time_first=True)
    assert matching.realise(event, active) == "the doctor helped the lawyer on monday"
    assert matching.realise(event, passive) == "at the start of the week the attorney was assisted by the physician"
    open_agent, open_both = matching.Event(None, "help", "lawyer", "monday"), matching.Event(None, "help", "lawyer", None)
    assert matching.realise(open_agent, active) == "a person helped the lawyer on monday"
    assert matching.realise(open_both, passive) == "one day the attorney was assisted by a person"
    # an open slot takes as many words as a filled one
    assert len(matching.realise(open_agent, passive).split()) == len(matching.realise(event, passive).split())
    with pytest.raises(ValueError, match="must differ"):
        matching.Event("doctor", "help", "doctor", "monday")
    with pytest.raises(ValueError, match="unknown action"):
        matching.Event("doctor", "fly", "lawyer", "monday")
    with pytest.raises(ValueError, match="full events"):
        open_agent.split


def test_implication_is_directional():
    full = matching.Event("doctor", "help", "lawyer", "monday")
    for general in matching.generalisations(full):
        assert matching.implies(full, general)
        assert matching.implies(general, full) == (general == full)
    assert not matching.implies(full, matching.Event("lawyer", "help", "doctor", "monday"))
    assert not matching.implies(full, matching.Event(None, "help", "lawyer", "night"))
    import random

    rng = random.Random(1)
    for kind in matching.HARD_NEGATIVE_KINDS:
        for event in matching.generalisations(full):
            if matching.applicable(event, kind):
                assert not matching.implies(event, matching.perturb(event, kind, rng))
            else:
                with pytest.raises(ValueError, match="no "):
                    matching.perturb(event, kind, rng)


def test_triplets_are_implied_sentences_and_near_misses():
    for t in matching.triplets(300, "train", seed=1):
        assert t.source.split == "train" and matching.implies(t.source, t.event)
        assert t.positive != t.anchor
        assert matching.implies(t.event, t.positive_event) and not matching.implies(t.event, t.negative_event)
        assert t.kind in matching.HARD_NEGATIVE_KINDS
    turned = [t for t in matching.triplets(300, "test", seed=2) if t.kind == "more specific"]
    assert len(turned) > 60 and all(t.source.split == "test" for t in turned)
    assert all(matching.implies(t.negative_event, t.event) for t in turned), "the positive turned round"
    # a role swap said with the same choices has exactly the same words
    event = matching.Event("chef", "pay", "pilot", "night")
    surface = matching.Surface(0, 0, 0, 0, False, False)
    swapped = matching.perturb(event, "swap roles", None)
    assert sorted(matching.realise(event, surface).split()) == sorted(matching.realise(swapped, surface).split())


def test_word_overlap_and_length_do_not_solve_the_task():
    a, b, y = matching.labelled_pairs(2000, "test", seed=0)
    assert y.float().mean() == 0.5
    for name, feature in (("overlap", [matching.word_overlap(x, z) for x, z in zip(a, b)]),
                          ("length", [len(x.split()) - len(z.split()) for x, z in zip(a, b)])):
        f = torch.tensor(feature, dtype=torch.float)
        best = max(max(((f >= t).long() == y).float().mean().item(),
                       ((f < t).long() == y).float().mean().item()) for t in f.unique())
        assert best < 0.6, (name, best)


def test_retrieval_set_has_one_answer_per_query():
    r = matching.retrieval_set(20, 500, negatives_per_query=5, seed=3)
    assert len(r.candidates) == 500 and len(r.queries) == 20
    assert len(set(r.answers.tolist())) == 20
    with pytest.raises(ValueError, match="n_candidates"):
        matching.retrieval_set(20, 100, negatives_per_query=5)


def test_vocab_and_tower():
    vocab = matching.Vocab()
    assert vocab.words[:3] == list(matching.SPECIALS)
    ids, mask = vocab.batch(["the doctor helped the lawyer", "the kid rang the cook on monday"])
    assert ids.shape == mask.shape == (2, 7) and mask[0].sum() == 5 and ids[0, 5] == matching.PAD
    assert vocab.decode(ids[0]) == "the doctor helped the lawyer"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("the doctor flew")
    tower = matching.TokenEncoder(len(vocab), matching.encoder_config(16, 1, 2), max_len=8)
    out = tower(ids, mask)
    assert out.shape == (2, 7, 16)
    # padding is invisible to the real tokens
    longer = torch.cat([ids, torch.zeros(2, 1, dtype=torch.long)], 1)
    torch.testing.assert_close(tower(longer, (longer != 0).long())[:, :7][mask.bool()], out[mask.bool()])
    with pytest.raises(ValueError, match="max_len"):
        tower(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.long))
