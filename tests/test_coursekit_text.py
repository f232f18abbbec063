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
