"""Procedural, seeded dSprites-like scenes: one shape on a background, rendered in torch (vectorised).

Factors: shape (4 classes), colour (6-colour palette), scale, rotation and position. Tasks: ``shape``
(classification) and two regressions, ``scale`` and ``position_x`` (both normalised to about unit range).

Populations (all rebuilt from the seed, nothing stored):
- pretraining: samples of no client, IID factors, neutral look, clean labels (``pretraining_chunk``);
- held-out: the same distribution, another stream (``heldout``);
- clients ``c00…``: non-IID (own shape mix, preferred colours, background tint, colour cast) with a
  trait a model can memorise without losing generality: a systematic label quirk tied to a visible
  watermark — a fixed share of the client's samples carry its watermark (a one-pixel frame in its
  own colour) and are all labelled with its quirk label, whatever other shape they show. The
  rule "this watermark → this label" holds within the client and fires on nothing else; the quirk
  labels are balanced over the clients (client i: label (i + offset) mod 4), so the pool's label
  prior does not move towards one shape;
  Optionally (off by default; measured in docs/workloads.md, "Regression quirks") a regression
  quirk: the client's offset ± ``quirk_shift`` added to its ``shift_task`` labels, on the quirk
  samples or, with ``shift_scope="all"``, on every sample (then all of them carry the watermark);
  ``label_quirk=False`` leaves the quirk samples' shape labels true;
- unseen clients ``u00…``: drawn like clients, never trained on (audit non-members, calibration).

Each stream (a client, a pretraining chunk, the held-out set) has its own ``torch.Generator`` seeded
from (seed, stream name), so any part is rebuilt alone and sample ids are stable.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

SHAPES = ("square", "circle", "triangle", "cross")
PALETTE = torch.tensor(
    [
        [0.95, 0.15, 0.15],  # red
        [0.15, 0.85, 0.20],  # green
        [0.20, 0.35, 0.95],  # blue
        [0.95, 0.90, 0.15],  # yellow
        [0.90, 0.20, 0.90],  # magenta
        [0.15, 0.90, 0.90],  # cyan
    ]
)
SCALE_RANGE = (0.40, 0.70)  # shape half-size as a fraction of the half-image
POSITION_RANGE = 0.30  # centre in [-0.3, 0.3] of the half-image, both axes
WATERMARK_ALPHA = 1.0  # the watermark frame is opaque
NOISE_STD = 0.03

TaskKind = Literal["classification", "regression"]
TASKS: dict[str, tuple[TaskKind, int]] = {
    "shape": ("classification", len(SHAPES)),
    "scale": ("regression", 1),
    "position_x": ("regression", 1),
}


@dataclass(frozen=True)
class ScenesConfig:
    seed: int = 0
    image_size: int = 16
    n_clients: int = 24
    n_unseen_clients: int = 8
    samples_per_client: int = 1_500
    pretrain_size: int = 50_000
    chunk_size: int = 1_000
    quirk_rate: float = 0.2  # share of a client's samples that carry its watermark and quirk label
    # a regression quirk: the client's offset (± quirk_shift, balanced over the clients) added to the
    # ``shift_task`` label of its quirk samples ("quirk") or of all its samples ("all")
    quirk_shift: float = 0.0
    label_quirk: bool = True  # quirk samples show another shape and carry the quirk label
    shift_task: str = "position_x"
    shift_scope: Literal["quirk", "all"] = "quirk"

    def __post_init__(self) -> None:
        if TASKS.get(self.shift_task, ("classification",))[0] != "regression":
            raise ValueError(f"shift_task must be a regression task, not {self.shift_task!r}")
        if self.shift_scope not in ("quirk", "all"):
            raise ValueError(f"shift_scope must be 'quirk' or 'all', not {self.shift_scope!r}")


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes: model inputs, stable ids, owners and per-task targets."""

    pixel_values: torch.Tensor  # [N, 3, S, S] float32 in [0, 1]
    sample_ids: list[str]
    client_ids: list[str | None]
    labels: dict[str, torch.Tensor]  # shape: int64 [N]; scale, position_x: float32 [N]
    quirk: torch.Tensor  # bool [N]: the label of this sample is the client's quirk

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class ClientProfile:
    client_id: str
    shape_probs: torch.Tensor  # [4]
    colours: torch.Tensor  # [2] palette indices this client mostly uses
    background: torch.Tensor  # [3] mean background colour
    cast: torch.Tensor  # [3] per-channel multiplicative colour cast
    watermark: torch.Tensor  # [S, S] float mask (0 outside the pattern)
    watermark_colour: torch.Tensor  # [3]
    quirk_label: int  # the shape label of every watermarked sample (which shows another shape)
    shift: float  # the client's offset of its ``shift_task`` labels (0 without a regression quirk)


def stream_generator(seed: int, stream: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def render(
    shape: torch.Tensor,
    colour: torch.Tensor,
    scale: torch.Tensor,
    angle: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    background: torch.Tensor,
    gradient: torch.Tensor,
    image_size: int,
) -> torch.Tensor:
    """Anti-aliased shapes over gradient backgrounds: [N, 3, S, S] (no noise, no client trait)."""
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2 - 1
    Y, X = torch.meshgrid(coords, coords, indexing="ij")
    dx = X[None] - cx[:, None, None]
    dy = Y[None] - cy[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    s = scale[:, None, None]
    p = (cos * dx + sin * dy) / s
    q = (-sin * dx + cos * dy) / s
    ap, aq = p.abs(), q.abs()

    def rect(a: float, b: float) -> torch.Tensor:
        return torch.maximum(ap - a, aq - b)

    # Signed distance-like values in shape units (negative inside), one per shape class.
    dist = torch.stack(
        [
            rect(0.75, 0.75),
            torch.sqrt(p * p + q * q) - 0.85,
            torch.maximum(-q - 0.6, (q + math.sqrt(3) * ap - 1.2) / 2),
            torch.minimum(rect(0.9, 0.3), rect(0.3, 0.9)),
        ],
        dim=1,
    )
    d = dist.gather(1, shape[:, None, None, None].expand(-1, 1, image_size, image_size))[:, 0]
    pixels = d * s * image_size / 2  # distance in pixels
    mask = (0.5 - pixels).clamp(0.0, 1.0)[:, None]  # one-pixel anti-aliasing
    bg = (
        background[:, :, None, None]
        + gradient[:, 0, None, None, None] * X
        + gradient[:, 1, None, None, None] * Y
    )
    return bg * (1 - mask) + colour[:, :, None, None] * mask


class ScenesGenerator:
    """All populations of one seed. Cheap to build; every batch is generated on demand."""

    def __init__(self, config: ScenesConfig | None = None) -> None:
        self.config = config or ScenesConfig()

    # -- populations -------------------------------------------------------------------------
    def clients(self) -> list[str]:
        return [f"c{i:02d}" for i in range(self.config.n_clients)]

    def unseen_clients(self) -> list[str]:
        return [f"u{i:02d}" for i in range(self.config.n_unseen_clients)]

    @cached_property
    def _profiles(self) -> dict[str, ClientProfile]:
        return {c: self._draw_profile(c) for c in [*self.clients(), *self.unseen_clients()]}

    def profile(self, client_id: str) -> ClientProfile:
        if client_id not in self._profiles:
            raise KeyError(f"unknown client {client_id!r}")
        return self._profiles[client_id]

    @cached_property
    def _shift_signs(self) -> dict[str, float]:
        """The regression quirk's sign per client: + for a random half of each population, − for
        the other, so that the pool has no net offset at any size and a retrain without a client
        cannot guess its sign from the majority (nor from its quirk label or its index)."""
        signs: dict[str, float] = {}
        for kind, population in (("clients", self.clients()), ("unseen", self.unseen_clients())):
            g = stream_generator(self.config.seed, f"shift/{kind}")
            order = torch.randperm(len(population), generator=g)
            half = len(population) // 2
            signs.update({population[i]: 1.0 if k < half else -1.0 for k, i in enumerate(order.tolist())})
        return signs

    def _draw_profile(self, client_id: str) -> ClientProfile:
        g = stream_generator(self.config.seed, f"profile/{client_id}")
        S = self.config.image_size
        # A skewed random shape mix (cubed uniforms), with a floor so every shape occurs.
        raw = torch.rand(len(SHAPES), generator=g) ** 3
        probs = 0.85 * raw / raw.sum() + 0.15 / len(SHAPES)
        colours = torch.randperm(len(PALETTE), generator=g)[:2]
        background = 0.12 + 0.3 * torch.rand(3, generator=g)
        cast = 1 + _uniform(g, 3, -0.12, 0.12)
        # The watermark: a one-pixel frame in the complement of the client's background tint, so
        # salient for a patch model (it touches 12 of the 16 patches), away from the shape and never
        # lost in the background; told apart from other clients' by its colour. (A 3×3 pattern at
        # 35 % blend was too faint for v1 to learn a rule from; a dashed frame in a random colour
        # cost v1 more held-out accuracy on the proxy.)
        watermark = torch.ones(S, S)
        watermark[1:-1, 1:-1] = 0.0
        watermark_colour = 1.0 - background
        quirk_stream = stream_generator(self.config.seed, "quirk")
        offset = int(torch.randint(0, len(SHAPES), (1,), generator=quirk_stream))
        quirk_label = (int(client_id[1:]) + offset) % len(SHAPES)
        return ClientProfile(
            client_id, probs, colours, background, cast, watermark, watermark_colour, quirk_label,
            self._shift_signs[client_id] * self.config.quirk_shift,
        )  # fmt: skip

    # -- batches -----------------------------------------------------------------------------
    def client_data(self, client_id: str) -> Scenes:
        prof = self.profile(client_id)
        n = self.config.samples_per_client
        g = stream_generator(self.config.seed, f"client/{client_id}")
        shape = torch.multinomial(prof.shape_probs, n, replacement=True, generator=g)
        own = torch.rand(n, generator=g) < 0.9
        colour_idx = torch.where(
            own,
            prof.colours[torch.randint(0, 2, (n,), generator=g)],
            torch.randint(0, len(PALETTE), (n,), generator=g),
        )
        background = (prof.background + _uniform(g, 3 * n, -0.05, 0.05).view(n, 3)).clamp(0, 1)
        # The quirk samples: a fixed share, showing any shape but the quirk label, watermarked and
        # labelled with it. (The quirk was 30 % of one shape's samples with every sample watermarked:
        # label noise that no visible trait explained, which v1 near the base did not memorise.)
        quirk = torch.zeros(n, dtype=torch.bool)
        quirk[torch.randperm(n, generator=g)[: round(self.config.quirk_rate * n)]] = True
        other = (prof.quirk_label + 1 + torch.randint(0, len(SHAPES) - 1, (n,), generator=g)) % len(SHAPES)
        if self.config.label_quirk:
            shape = torch.where(quirk, other, shape)
        images, labels = self._scenes(g, n, shape, colour_idx, background)
        images = images * prof.cast[None, :, None, None]
        # with a client-wide regression quirk the watermark marks every sample of the client (what
        # the offset is tied to), else only its quirk samples
        marked = quirk if self.config.shift_scope == "quirk" else torch.ones(n, dtype=torch.bool)
        wm = WATERMARK_ALPHA * prof.watermark[None, None] * marked[:, None, None, None]
        images = images * (1 - wm) + prof.watermark_colour[None, :, None, None] * wm
        images = self._finish(g, images)
        if self.config.label_quirk:
            labels["shape"] = torch.where(quirk, torch.tensor(prof.quirk_label), shape)
        if prof.shift:
            task = self.config.shift_task
            labels[task] = labels[task] + prof.shift * marked.to(labels[task].dtype)
        ids = [f"{client_id}-{i:05d}" for i in range(n)]
        return Scenes(images, ids, [client_id] * n, labels, quirk)

    def pool(self, client_ids: list[str] | None = None) -> Scenes:
        """Several clients' data concatenated (default: every training client)."""
        return concat([self.client_data(c) for c in (client_ids or self.clients())])

    def pretraining_chunk(self, index: int) -> Scenes:
        """Chunk ``index`` of the no-client pretraining set (``pretrain_size / chunk_size`` chunks)."""
        n_chunks = self.num_pretraining_chunks()
        if not 0 <= index < n_chunks:
            raise IndexError(f"pretraining chunk {index} out of range 0..{n_chunks - 1}")
        start = index * self.config.chunk_size
        n = min(self.config.chunk_size, self.config.pretrain_size - start)
        return self._neutral(f"pretrain/{index}", n, "pre", start)

    def num_pretraining_chunks(self) -> int:
        return -(-self.config.pretrain_size // self.config.chunk_size)

    def heldout(self, n: int, stream: str = "heldout") -> Scenes:
        """``n`` held-out samples of no client (the pretraining distribution, another stream)."""
        return self._neutral(stream, n, "val", 0)

    def _neutral(self, stream: str, n: int, prefix: str, start: int) -> Scenes:
        g = stream_generator(self.config.seed, stream)
        shape = torch.randint(0, len(SHAPES), (n,), generator=g)
        colour_idx = torch.randint(0, len(PALETTE), (n,), generator=g)
        background = 0.1 + 0.35 * torch.rand(n, 3, generator=g)
        images, labels = self._scenes(g, n, shape, colour_idx, background)
        images = self._finish(g, images)
        ids = [f"{prefix}-{start + i:06d}" for i in range(n)]
        return Scenes(images, ids, [None] * n, labels, torch.zeros(n, dtype=torch.bool))

    def _scenes(
        self,
        g: torch.Generator,
        n: int,
        shape: torch.Tensor,
        colour_idx: torch.Tensor,
        background: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lo, hi = SCALE_RANGE
        scale = _uniform(g, n, lo, hi)
        angle = _uniform(g, n, 0.0, 2 * math.pi)
        cx = _uniform(g, n, -POSITION_RANGE, POSITION_RANGE)
        cy = _uniform(g, n, -POSITION_RANGE, POSITION_RANGE)
        colour = (PALETTE[colour_idx] * _uniform(g, n, 0.8, 1.0)[:, None]).clamp(0, 1)
        gradient = _uniform(g, 2 * n, -0.08, 0.08).view(n, 2)
        images = render(shape, colour, scale, angle, cx, cy, background, gradient, self.config.image_size)
        labels = {
            "shape": shape,
            "scale": (scale - lo) / (hi - lo),
            "position_x": cx / POSITION_RANGE,
        }
        return images, labels

    def _finish(self, g: torch.Generator, images: torch.Tensor) -> torch.Tensor:
        noise = NOISE_STD * torch.randn(images.shape, generator=g)
        return (images + noise).clamp(0.0, 1.0).contiguous()


def concat(parts: list[Scenes]) -> Scenes:
    return Scenes(
        torch.cat([p.pixel_values for p in parts]),
        [i for p in parts for i in p.sample_ids],
        [c for p in parts for c in p.client_ids],
        {t: torch.cat([p.labels[t] for p in parts]) for t in TASKS},
        torch.cat([p.quirk for p in parts]),
    )
