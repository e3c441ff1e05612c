"""Eqs. 9–10: the forget gradient orthogonalised against the retain gradients, per factor."""

from __future__ import annotations

import torch

from worker.unlearning.interference.orthogonalisation import orthogonalize, segment_dot


def test_orthogonalized_forget_gradient_is_orthogonal_to_each_retain_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    retains = [torch.randn(4, 10, generator=gen, dtype=torch.float64) for _ in range(3)]  # not orthogonal
    segments = torch.tensor([0] * 4 + [1] * 6)
    out = orthogonalize(f, retains, segments=segments, n_segments=2, eps=0.0)
    for r in retains:
        dots = segment_dot(out, r, segments, 2)
        assert torch.allclose(dots, torch.zeros_like(dots), atol=1e-10)
    assert float(out.abs().sum()) > 0  # something of the forget gradient is left (3 < 4, 6 dims)
    # the literal Eq. 10 sequence is orthogonal to the last gradient only
    literal = orthogonalize(f, retains, segments=segments, n_segments=2, eps=0.0, gram_schmidt=False)
    assert torch.allclose(segment_dot(literal, retains[-1], segments, 2), torch.zeros(4, 2, dtype=f.dtype))
    assert not torch.allclose(segment_dot(literal, retains[0], segments, 2), torch.zeros(4, 2, dtype=f.dtype))


def test_single_retain_gradient_is_eq9_with_epsilon() -> None:
    f = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert orthogonalize(f, [r], eps=0.0).tolist() == [0.0, 4.0, 0.0]
    eps = 1.0  # Eq. 9: coefficient <f, r> / (||r||² + ε) = 3 / 2
    assert orthogonalize(f, [r], eps=eps).tolist() == [1.5, 4.0, 0.0]


def test_zero_and_rank_deficient_retain_gradients_are_skipped() -> None:
    f = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    r1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    out = orthogonalize(f, [zero], eps=0.0)  # LoRA B = 0 at start: all-zero retain gradient
    assert torch.equal(out, f)
    out = orthogonalize(f, [r1, 2 * r1, zero], eps=0.0)  # only one direction to remove
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.tensor([0.0, 2.0, 3.0], dtype=torch.float64))
    # float32 near-duplicate: the residual is rounding noise and must not be divided by
    r32 = torch.randn(50)
    f32 = torch.randn(50)
    out32 = orthogonalize(f32, [r32, r32 * 1.0000001], eps=0.0)
    expected = f32 - (f32 @ r32) / (r32 @ r32) * r32
    assert torch.allclose(out32, expected, atol=1e-5)
