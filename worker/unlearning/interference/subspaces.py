"""Task subspaces and their projectors (interference paper Eqs. 7–8, Algorithm 1 line 18).

Task ``t`` has an orthonormal basis ``U_t ∈ R^{r×s}`` of the LoRA rank space, ``P_t = U_t U_tᵀ``;
the bases take a gradient step on ``Σ_{t≠t'} ||U_tᵀU_t'||²_F`` per iteration and are
re-orthonormalised by QR.
"""

from __future__ import annotations

import torch
from torch import Tensor


def orthonormalize(U: Tensor) -> Tensor:
    """QR of each ``[r, s]`` basis in ``U`` (``[..., r, s]``), signs fixed so that diag(R) ≥ 0."""
    Q, R = torch.linalg.qr(U)
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    out: Tensor = Q * sign.unsqueeze(-2)
    return out


def init_subspaces(num_tasks: int, rank: int, dim: int, *, seed: int, mode: str = "random") -> Tensor:
    """``[T, r, s]`` orthonormal bases: independent random ones, or disjoint columns of one random
    orthogonal matrix (``mode="orthogonal"``, needs ``T·s ≤ r``)."""
    if not 1 <= dim <= rank:
        raise ValueError(f"subspace dimension {dim} must be in [1, {rank}]")
    gen = torch.Generator().manual_seed(seed)
    if mode == "orthogonal":
        if num_tasks * dim > rank:
            raise ValueError("orthogonal subspaces need num_tasks * dim <= rank")
        Q = orthonormalize(torch.randn(rank, rank, generator=gen, dtype=torch.float64))
        return Q[:, : num_tasks * dim].reshape(rank, num_tasks, dim).permute(1, 0, 2).contiguous()
    return orthonormalize(torch.randn(num_tasks, rank, dim, generator=gen, dtype=torch.float64))


def gradient_subspaces(rank_grads: Tensor, dim: int) -> Tensor:
    """``[T, r, s]`` disjoint orthonormal bases, each task's spanning the leading directions of its
    own gradient in the rank space (``rank_grads``: ``[T, r, m]``, :meth:`FlatLayout.rank_space`).

    Round robin over the tasks, one direction at a time: task t takes the leading eigenvector of
    its trace-normalised second moment ``M_t M_tᵀ`` restricted to the directions not yet taken, so
    every task gets its most used directions and no two bases overlap (needs ``T·s ≤ r``). A task
    whose gradient has no energy left takes the first remaining coordinate direction."""
    T, r = int(rank_grads.shape[0]), int(rank_grads.shape[1])
    if dim < 1 or T * dim > r:
        raise ValueError("gradient subspaces need 1 <= dim and num_tasks * dim <= rank")
    M = rank_grads.detach().to(torch.float64)
    C = M @ M.transpose(-1, -2)  # [T, r, r]
    C = C / torch.diagonal(C, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)[:, None, None]
    eye = torch.eye(r, dtype=torch.float64)
    taken = torch.zeros(r, 0, dtype=torch.float64)
    bases: list[list[Tensor]] = [[] for _ in range(T)]
    for _ in range(dim):
        for t in range(T):
            rest = eye - taken @ taken.T  # projector on the directions not yet taken
            _, vecs = torch.linalg.eigh(rest @ C[t] @ rest)
            v = rest @ vecs[:, -1]
            if float(v.norm()) < 1e-6:  # nothing left in this task's gradient: any free direction
                free = torch.linalg.norm(rest, dim=0).argmax()
                v = rest[:, free]
            v = v / v.norm()
            v = v - taken @ (taken.T @ v)  # exact orthogonality against rounding
            v = v / v.norm()
            bases[t].append(v)
            taken = torch.cat([taken, v[:, None]], dim=1)
    return torch.stack([torch.stack(b, dim=1) for b in bases])


def projectors(U: Tensor) -> Tensor:
    """``P_t = U_t U_tᵀ`` for every task: ``[T, r, r]``."""
    return U @ U.transpose(-1, -2)


def subspace_penalty(U: Tensor) -> Tensor:
    """``Σ_{t≠t'} ||U_tᵀ U_t'||²_F`` (ordered pairs)."""
    G = torch.einsum("tri,urj->tuij", U, U)  # [T, T, s, s]
    sq = (G**2).sum(dim=(-1, -2))
    total: Tensor = sq.sum() - torch.diagonal(sq).sum()
    return total


def subspace_penalty_grad(U: Tensor) -> Tensor:
    """The gradient of :func:`subspace_penalty` in closed form: ``4·(Σ_{t'} P_t' − P_t)·U_t``
    (each unordered pair is counted twice and ``∂||U_tᵀU_t'||²_F/∂U_t = 2·U_t'U_t'ᵀU_t``)."""
    P = projectors(U)
    return 4.0 * (P.sum(0, keepdim=True) - P) @ U


def subspace_step(U: Tensor, lr: float) -> Tensor:
    """One gradient step on :func:`subspace_penalty`, then QR re-orthonormalisation."""
    if U.shape[0] < 2 or lr == 0:
        return orthonormalize(U)
    U = U.detach()
    return orthonormalize(U - lr * subspace_penalty_grad(U))
