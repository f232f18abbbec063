"""coursekit.vision: patches in the stated order, the shared ViT against PyTorch, the CNN, training."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from coursekit.encoder import torch_encoder, torch_state_dict
from coursekit.vision import (SmallCNN, ViT, ViTConfig, accuracy, cosine_schedule, count_parameters, patchify,
                              progress_bar, random_shift, showing_progress, train_classifier, unpatchify)


@pytest.mark.parametrize("shape, p", [((2, 1, 8, 8), 2), ((3, 3, 12, 8), 4), ((1, 2, 6, 9), 3), ((2, 1, 4, 4), 4),
                                      ((1, 3, 5, 5), 1)])
def test_patchify_equals_unfold_and_round_trips(shape, p):
    x = torch.randn(shape)
    patches = patchify(x, p)
    assert torch.equal(patches, F.unfold(x, p, stride=p).transpose(1, 2))
    assert torch.equal(unpatchify(patches, p, shape[2], shape[3]), x)


def test_patch_order_is_row_major_and_channel_first():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    patches = patchify(x, 2)  # a 2 x 3 grid
    assert patches.shape == (1, 6, 8)
    assert torch.equal(patches[0, 1], x[0, :, 0:2, 2:4].flatten())  # patch 1: row 0, column 1
    assert torch.equal(patches[0, 3], x[0, :, 2:4, 0:2].flatten())  # patch 3: row 1, column 0


def test_patch_errors_are_clear():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.randn(1, 1, 7, 8), 2)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patchify(torch.randn(8, 8), 2)
    with pytest.raises(ValueError, match="do not tile"):
        unpatchify(torch.randn(1, 5, 4), 2, 4, 4)


def _vit_reference(model: ViT, images: torch.Tensor) -> torch.Tensor:
    """The same ViT from PyTorch's pieces: a strided conv, concatenation, nn.TransformerEncoder."""
    c = model.config
    x = F.conv2d(images, model.patch_embed.weight, model.patch_embed.bias, stride=c.patch_size)
    x = torch.cat([model.cls_token.expand(len(images), -1, -1), x.flatten(2).transpose(1, 2)], 1) + model.pos_embed
    encoder = torch_encoder(c.encoder)
    encoder.load_state_dict(torch_state_dict(model.encoder))
    return model.head(encoder.eval()(x)[:, 0])


@pytest.mark.parametrize("config", [ViTConfig(), ViTConfig(image_size=12, patch_size=3, channels=3, n_classes=4,
                                                           d_model=24, n_heads=2, d_ff=48, n_layers=3)])
def test_vit_equals_pytorch_pieces(config):
    torch.manual_seed(0)
    model = ViT(config).eval()
    with torch.no_grad():
        model.cls_token.normal_()
        model.pos_embed.normal_()
        images = torch.rand(3, config.channels, config.image_size, config.image_size)
        logits = model(images)
        assert logits.shape == (3, config.n_classes)
        torch.testing.assert_close(logits, _vit_reference(model, images), atol=1e-4, rtol=1e-4)
        features, maps = model.features(images, return_attention=True)
    assert features.shape == (3, config.d_model)
    assert len(maps) == config.n_layers and maps[0].shape == (3, config.n_heads, config.n_patches + 1,
                                                                 config.n_patches + 1)


def test_vit_sizes_and_errors():
    model = ViT(ViTConfig())
    assert 60_000 < count_parameters(model) < 80_000
    assert ViT(ViTConfig(n_classes=0))(torch.rand(2, 1, 16, 16)).shape == (2, 64)
    with pytest.raises(ValueError, match="expects images"):
        model(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=10, patch_size=4)


def test_small_cnn():
    model = SmallCNN()
    assert model(torch.rand(5, 1, 16, 16)).shape == (5, 10)
    assert 20_000 < count_parameters(model) < 40_000


def test_random_shift_moves_whole_images():
    torch.manual_seed(0)
    images = torch.rand(64, 2, 6, 6)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape
    assert torch.equal(random_shift(images, 0), images)
    padded = F.pad(images, (2, 2, 2, 2))
    for i in range(len(images)):  # every output is one of the 25 crops of its padded image
        crops = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(shifted[i], c) for c in crops)
    assert not torch.equal(shifted, images)


def test_cosine_schedule():
    assert cosine_schedule(0.0) == 0.0 and cosine_schedule(0.05) == pytest.approx(1.0)
    assert cosine_schedule(1.0) == pytest.approx(0.0, abs=1e-12) and cosine_schedule(2.0) == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < cosine_schedule(0.5) < 1.0


def _blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    images[labels == 1, :, :4] += 0.7  # class 1 is bright at the top
    return images, labels


def test_train_classifier_learns_and_keeps_its_budgets():
    torch.manual_seed(0)
    images, labels = _blobs(256, 0)
    model = SmallCNN(n_classes=2, image_size=8, width=4, hidden=8)
    before = accuracy(model, images, labels)
    result = train_classifier(model, images, labels, max_steps=60, max_seconds=30, batch_size=32, lr=1e-2,
                              shift=1, evaluate=lambda m: accuracy(m, images, labels), eval_every_s=0.01)
    assert result.steps == 60 and len(result.losses) == 60
    assert accuracy(model, images, labels) > max(0.9, before)
    assert result.eval_values and result.eval_seconds == sorted(result.eval_seconds)
    assert model.training  # left in training mode, as it was
    start = time.perf_counter()
    timed = train_classifier(model, images, labels, max_steps=10**6, max_seconds=0.3, batch_size=32)
    assert timed.steps < 10**6 and time.perf_counter() - start < 5.0 and timed.seconds >= 0.3


def test_bad_training_arguments():
    images, labels = _blobs(8, 0)
    with pytest.raises(ValueError, match="max_steps"):
        train_classifier(SmallCNN(2, image_size=8), images, labels, max_steps=0, max_seconds=1)
    with pytest.raises(ValueError, match="as many labels"):
        accuracy(SmallCNN(2, image_size=8), images, labels[:3])


def test_progress_bar_is_quiet_in_unattended_runs(capsys, monkeypatch):
    for _ in progress_bar(range(3), desc="quiet"):
        pass
    assert "quiet" not in capsys.readouterr().err
    monkeypatch.delenv("COURSE_PROGRESS", raising=False)
    assert not showing_progress()  # under pytest
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/student/vision_transformer.ipynb")
    assert showing_progress()  # a notebook opened in Jupyter
    monkeypatch.setenv("COURSE_PROGRESS", "0")
    assert not showing_progress()
