"""Task subspaces (Eqs. 7–8): projectors, the separating regulariser and its closed-form gradient."""

from __future__ import annotations

import pytest
import torch

from worker.unlearning.interference.subspaces import (
    init_subspaces,
    projectors,
    subspace_penalty,
    subspace_penalty_grad,
    subspace_step,
)


@pytest.mark.parametrize("mode", ["random", "orthogonal"])
def test_projector_is_idempotent_and_symmetric(mode: str) -> None:
    U = init_subspaces(3, 8, 2, seed=0, mode=mode)
    for _ in range(3):
        U = subspace_step(U, 0.1)
    P = projectors(U)
    assert P.shape == (3, 8, 8)
    assert torch.allclose(P @ P, P, atol=1e-10)
    assert torch.allclose(P, P.transpose(-1, -2), atol=1e-12)
    eye = torch.eye(2, dtype=U.dtype).expand(3, 2, 2)
    assert torch.allclose(U.transpose(-1, -2) @ U, eye, atol=1e-10)  # orthonormal after QR
    assert torch.allclose(torch.diagonal(P, dim1=-2, dim2=-1).sum(-1), torch.full((3,), 2.0, dtype=U.dtype))


def test_regulariser_separates_random_subspaces() -> None:
    U = init_subspaces(2, 8, 4, seed=3)
    start = float(subspace_penalty(U))
    assert start > 0.1
    for _ in range(200):
        U = subspace_step(U, 0.1)
    assert float(subspace_penalty(U)) < 1e-3 * start
    # brute-force definition: sum over ordered pairs t != t'
    brute = sum(float((U[i].T @ U[j]).pow(2).sum()) for i in range(2) for j in range(2) if i != j)
    assert float(subspace_penalty(U)) == pytest.approx(brute)


def test_closed_form_subspace_gradient_equals_autograd() -> None:
    U = init_subspaces(3, 8, 2, seed=1).requires_grad_(True)
    (want,) = torch.autograd.grad(subspace_penalty(U), U)
    assert torch.allclose(subspace_penalty_grad(U.detach()), want, atol=1e-12)
