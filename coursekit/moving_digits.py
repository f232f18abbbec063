"""Moving digits: tiny video clips of one handwritten digit sliding in a stated direction, and their judge.

A clip is ``(1, F, S, S)`` (channel, frames, height, width): scikit-learn's native 8x8 digit (no
upsampling) pasted on an ``S x S`` canvas and moved by ``speed`` pixels per frame to the ``right``,
``left``, ``down`` or ``up``. Its labels are the digit (0-9) and the direction (0-3, :data:`DIRECTIONS`).
The training clips are made from the digits of the course's training split, the test clips from the
test split (``coursekit.digits``: a fixed stratified 80/20 split).

The judge (:func:`judge_clips`) reads a clip frame by frame with the course's digit judge
(``coursekit.judge``, trained on 8x8 digits): in every frame it finds the 8x8 window that holds the
most ink and asks the judge which digit it shows (identity); the direction is that of the largest
displacement of the ink's centre of mass from the first to the last frame (motion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coursekit.digits import load_digits

__all__ = ["DIRECTIONS", "Clips", "ClipJudgement", "make_clips", "judge_clips", "centre_of_mass", "ink_crops",
           "frame_strip"]

DIRECTIONS = ("right", "left", "down", "up")
_STEP = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}    # (dy, dx) per frame for each direction


@dataclass(frozen=True)
class Clips:
    """Clips ``(N, 1, F, S, S)`` with pixels in ``value_range``, digit labels ``(N,)``, directions ``(N,)``."""

    videos: torch.Tensor
    digits: torch.Tensor
    directions: torch.Tensor

    def __len__(self) -> int:
        return len(self.digits)

    @property
    def labels(self) -> torch.Tensor:
        """``(N, 2)``: digit and direction, the DiT's two label columns."""
        return torch.stack([self.digits, self.directions], dim=1)


def make_clips(n: int, split: str = "train", frames: int = 4, size: int = 12, speed: int = 1, jitter: int = 0,
               value_range: tuple[float, float] = (-1.0, 1.0), seed: int = 0) -> Clips:
    """``n`` random clips: a random digit of ``split``, a random direction, the path placed so that the
    digit stays on the canvas (it starts at the trailing edge along the motion axis and is centred across
    it, give or take ``jitter`` pixels)."""
    room = size - 8
    if room < (frames - 1) * speed:
        raise ValueError(f"a {size}x{size} canvas has room for {room} pixels of motion, {frames} frames at "
                         f"speed {speed} need {(frames - 1) * speed}")
    if not 0 <= jitter <= room // 2:
        raise ValueError(f"jitter must be between 0 and {room // 2}, got {jitter}")
    g = torch.Generator().manual_seed(seed)
    digits = load_digits(split, size=8, value_range=(0.0, 1.0))
    pick = torch.randint(0, len(digits), (n,), generator=g)
    directions = torch.randint(0, 4, (n,), generator=g)
    across = room // 2 + torch.randint(-jitter, jitter + 1, (n,), generator=g)
    slack = room - (frames - 1) * speed                      # where along the axis the path may start
    along = torch.randint(0, slack + 1, (n,), generator=g)
    videos = torch.zeros(n, 1, frames, size, size)
    for i in range(n):
        d = int(directions[i])
        dy, dx = _STEP[d]
        start = int(along[i]) if (dy + dx) > 0 else room - int(along[i])
        y0, x0 = (start, int(across[i])) if dy else (int(across[i]), start)
        for f in range(frames):
            y, x = y0 + dy * speed * f, x0 + dx * speed * f
            videos[i, 0, f, y:y + 8, x:x + 8] = digits.images[pick[i], 0]
    lo, hi = value_range
    return Clips(videos * (hi - lo) + lo, digits.labels[pick], directions)


def _ink(videos: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    if videos.ndim != 5 or videos.shape[1] != 1:
        raise ValueError(f"expected clips (N, 1, F, H, W), got {tuple(videos.shape)}")
    lo, hi = value_range
    return ((videos.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)[:, 0]        # (N, F, H, W) in [0, 1]


def centre_of_mass(videos: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """``(N, F, 2)``: the (row, column) centre of the ink in every frame."""
    ink = _ink(videos, value_range)
    _, _, h, w = ink.shape
    mass = ink.sum(dim=(2, 3)).clamp(min=1e-6)
    rows = (ink.sum(dim=3) * torch.arange(h)).sum(dim=2) / mass
    cols = (ink.sum(dim=2) * torch.arange(w)).sum(dim=2) / mass
    return torch.stack([rows, cols], dim=-1)


def ink_crops(videos: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0), crop: int = 8) -> torch.Tensor:
    """``(N * F, 1, crop, crop)``: in each frame the ``crop x crop`` window holding the most ink (in the
    clip's value range), for an 8x8 judge."""
    ink = _ink(videos, value_range)
    n, f, h, w = ink.shape
    frames = ink.reshape(n * f, 1, h, w)
    sums = F.avg_pool2d(frames, crop, stride=1)                           # (NF, 1, h-crop+1, w-crop+1)
    best = sums.flatten(1).argmax(dim=1)
    ys, xs = best // sums.shape[-1], best % sums.shape[-1]
    out = torch.stack([frames[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))])
    lo, hi = value_range
    return out * (hi - lo) + lo


@dataclass(frozen=True)
class ClipJudgement:
    """Per frame: the digit read (``(N, F)``); per clip: the direction read (``(N,)``); and the scores."""

    frame_digits: torch.Tensor
    directions: torch.Tensor
    identity: float     # fraction of frames read as the intended digit
    direction: float    # fraction of clips moving in the intended direction

    def __str__(self) -> str:
        return f"identity {self.identity:.3f} (frames), direction {self.direction:.3f} (clips)"


def judge_clips(videos: torch.Tensor, digits: torch.Tensor, directions: torch.Tensor, judge,
                value_range: tuple[float, float] = (-1.0, 1.0)) -> ClipJudgement:
    """Judge generated (or real) clips frame by frame: identity with ``judge`` (a ``coursekit.judge.Judge``
    for 8x8 digits in ``value_range``) on each frame's most-inked 8x8 window, direction from the centre of
    mass moving from the first to the last frame."""
    n, f = videos.shape[0], videos.shape[2]
    digits, directions = torch.as_tensor(digits).cpu(), torch.as_tensor(directions).cpu()
    if digits.shape != (n,) or directions.shape != (n,):
        raise ValueError(f"need one digit and one direction per clip ({n}), got {tuple(digits.shape)} and "
                         f"{tuple(directions.shape)}")
    read = judge.predict(ink_crops(videos, value_range)).view(n, f)
    com = centre_of_mass(videos, value_range)
    dy, dx = (com[:, -1] - com[:, 0]).unbind(-1)
    horizontal = dx.abs() >= dy.abs()
    moved = torch.where(horizontal, torch.where(dx >= 0, 0, 1), torch.where(dy >= 0, 2, 3))
    return ClipJudgement(read, moved, float((read == digits[:, None]).float().mean()),
                         float((moved == directions).float().mean()))


def frame_strip(videos: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0), pad: int = 1):
    """Clips ``(N, 1, F, H, W)`` as one numpy image in [0, 1]: a row per clip, its frames left to right."""
    from coursekit.diffusion import image_grid

    n, c, f, h, w = videos.shape
    frames = videos.detach().cpu().permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)
    return image_grid(frames, nrow=f, pad=pad, value_range=value_range)
