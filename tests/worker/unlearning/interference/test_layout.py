"""The flat layout of the LoRA factors and heads, and the task projection in peft's layout."""

from __future__ import annotations

import torch

from tests.worker.unlearning.interference.toy import head_a_layout, ia_model, layout_pairs
from worker.unlearning.interference.subspaces import init_subspaces, projectors


def test_layout_round_trip_and_projection_matches_peft_rank_dimensions() -> None:
    model = ia_model()
    layout = head_a_layout(model)
    params = dict(model.named_parameters())
    g = {n: torch.randn(2, *params[n].shape) for n in layout.names}
    flat = layout.pack(g, lead=1)
    assert flat.shape == (2, layout.size)
    back = layout.unpack(flat[1])
    assert all(torch.equal(back[n], g[n][1]) for n in layout.names)
    U = init_subspaces(2, 4, 2, seed=0)
    P = projectors(U).float()
    proj = layout.unpack(layout.project(flat, P)[1])  # row 1 uses P_1
    for pair in layout_pairs(model):
        assert torch.allclose(proj[pair[0]], P[1] @ g[pair[0]][1], atol=1e-6)  # A: r x in
        assert torch.allclose(proj[pair[1]], g[pair[1]][1] @ P[1], atol=1e-6)  # B: out x r
    head = layout.h_names[0]
    assert torch.equal(proj[head], g[head][1])  # heads are not projected
    assert layout.n_segments == 2 * len(layout.a_names) + len(layout.h_names)
