"""The flat layout of the updated parameters: LoRA A (rank rows), LoRA B (rank columns), heads.

peft stores ``A`` as ``r × in`` and ``B`` as ``out × r`` (the paper writes ``W + B Aᵀ`` with
``A ∈ R^{k×r}``), so task ``t``'s projection is ``P_t ∇_A`` and ``∇_B P_t`` — the paper's
right-multiplication in peft's layout. The LoRA pairs are found through peft, whatever the
target modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from worker.unlearning.lora import LoraPair


class FlatLayout:
    """Packs ``{name: [*lead, *shape]}`` gradients into ``[*lead, D]``: all A factors as one
    ``[r, ΣK]`` block, all B factors as one ``[ΣD, r]`` block, then the head tensors flat.

    ``segments`` ([D], long) numbers the factors ``Z`` of Eq. 9: one per layer's A, one per layer's
    B, one per head tensor.
    """

    def __init__(self, shapes: Mapping[str, torch.Size], pairs: Sequence[LoraPair], heads: Sequence[str]):
        self.a_names = [p.a for p in pairs]
        self.b_names = [p.b for p in pairs]
        self.h_names = list(heads)
        ranks = {p.rank for p in pairs}
        if len(ranks) > 1:
            raise ValueError("all LoRA layers must share one rank")
        self.rank = ranks.pop() if ranks else 0
        self.a_cols = [int(shapes[n][1]) for n in self.a_names]
        self.b_rows = [int(shapes[n][0]) for n in self.b_names]
        self.h_shapes = [tuple(shapes[n]) for n in self.h_names]
        self.h_sizes = [math.prod(s) for s in self.h_shapes]
        self.n_a = self.rank * sum(self.a_cols)
        self.n_b = sum(self.b_rows) * self.rank
        self.n_h = sum(self.h_sizes)
        L = len(pairs)
        col_layer = torch.repeat_interleave(torch.arange(L), torch.tensor(self.a_cols, dtype=torch.long))
        row_layer = torch.repeat_interleave(torch.arange(L), torch.tensor(self.b_rows, dtype=torch.long))
        head_seg = torch.repeat_interleave(
            torch.arange(len(self.h_names)), torch.tensor(self.h_sizes, dtype=torch.long)
        )
        self.segments = torch.cat(
            [col_layer.repeat(self.rank), L + row_layer.repeat_interleave(self.rank), 2 * L + head_seg]
        )
        self.n_segments = 2 * L + len(self.h_names)
        self._matrices: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def segment_matrix(self, like: Tensor) -> Tensor:
        """The ``[D, S]`` segment indicator with ``like``'s dtype and device (built once each)."""
        key = (like.dtype, like.device)
        if key not in self._matrices:
            onehot = torch.nn.functional.one_hot(self.segments.to(like.device), self.n_segments)
            self._matrices[key] = onehot.to(like.dtype)
        return self._matrices[key]

    @property
    def names(self) -> list[str]:
        return [*self.a_names, *self.b_names, *self.h_names]

    @property
    def size(self) -> int:
        return self.n_a + self.n_b + self.n_h

    def pack(self, g: Mapping[str, Tensor], lead: int) -> Tensor:
        parts: list[Tensor] = []
        if self.a_names:
            a = torch.cat([g[n] for n in self.a_names], dim=-1)  # [*lead, r, ΣK]
            parts.append(a.reshape(*a.shape[:lead], -1))
            b = torch.cat([g[n] for n in self.b_names], dim=-2)  # [*lead, ΣD, r]
            parts.append(b.reshape(*b.shape[:lead], -1))
        for n in self.h_names:
            parts.append(g[n].reshape(*g[n].shape[:lead], -1))
        return torch.cat(parts, dim=-1)

    def unpack(self, flat: Tensor) -> dict[str, Tensor]:
        """``[D]`` → ``{name: tensor}`` (views into ``flat``)."""
        out: dict[str, Tensor] = {}
        a, b, h = torch.split(flat, [self.n_a, self.n_b, self.n_h])
        if self.a_names:
            a_blocks = torch.split(a.reshape(self.rank, -1), self.a_cols, dim=1)
            b_blocks = torch.split(b.reshape(-1, self.rank), self.b_rows, dim=0)
            out.update(zip(self.a_names, a_blocks, strict=True))
            out.update(zip(self.b_names, b_blocks, strict=True))
        for n, piece, shape in zip(self.h_names, torch.split(h, self.h_sizes), self.h_shapes, strict=True):
            out[n] = piece.reshape(shape)
        return out

    def rank_space(self, flat: Tensor) -> Tensor:
        """``[..., D]`` → ``[..., r, ΣK + ΣD]``: every A and B gradient as columns of the rank space
        (A's rows and Bᵀ's rows), the side the task projectors act on; heads left out."""
        lead = flat.shape[:-1]
        a, b, _ = torch.split(flat, [self.n_a, self.n_b, self.n_h], dim=-1)
        a = a.reshape(*lead, self.rank, -1)
        b = b.reshape(*lead, -1, self.rank).transpose(-1, -2)
        return torch.cat([a, b], dim=-1)

    def project(self, flat: Tensor, P: Tensor) -> Tensor:
        """Apply ``P_t`` to task ``t``'s row: ``flat`` is ``[..., T, D]``, ``P`` is ``[T, r, r]``.

        A block: ``P_t ∇_A`` (rank rows); B block: ``∇_B P_t`` (rank columns); heads unchanged.
        """
        if not self.a_names:
            return flat
        lead = flat.shape[:-1]
        a, b, h = torch.split(flat, [self.n_a, self.n_b, self.n_h], dim=-1)
        a = a.reshape(*lead, self.rank, -1)
        b = b.reshape(*lead, -1, self.rank)
        P = P.to(device=flat.device, dtype=flat.dtype)
        a = torch.einsum("tij,...tjk->...tik", P, a)
        b = torch.einsum("...tdi,tij->...tdj", b, P)
        return torch.cat([a.reshape(*lead, -1), b.reshape(*lead, -1), h], dim=-1)
