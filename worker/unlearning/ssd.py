"""Selective Synaptic Dampening (subset-wise paper §4.2, Eqs. 8–9/20) on the adapter and heads.

The ``ssd`` method's defaults (:data:`REFERENCE_DEFAULTS` over :class:`SSDConfig`) are the public
SSD reference's semantics (Foster et al., ``ParameterPerturber``; ``../shared/papers/README.md``):

- importance ``I_S`` = the squared gradient of each mini-batch's *mean* main-task loss, averaged
  over the mini-batches (not a per-sample Fisher), model in eval mode;
- ``D`` (for ``I_D``) is the whole training data *including* the forget set, laid out as the
  reference's loader ``DataLoader(ConcatDataset((retain, forget)), batch_size)`` does: the retain
  rows, then the forget set's rows, one unshuffled sequence cut into mini-batches
  (``layout="reference"``); ``I_f`` over the forget set's own unshuffled mini-batches;
- every parameter that gets a gradient takes part: with LoRA the A and B factors and the
  trainable heads (a head the main-task loss does not reach, e.g. the subset-ID head, has
  ``I = 0`` on both sides and is never selected);
- selection ``I_f > α·I_D``, factor ``β = min(λ·I_D / I_f, 1)``, ``θ ← β·θ`` on the selection;
  where ``I_D = 0 < I_f`` the weight becomes exactly 0; defaults α = 10, λ = 1.

Named options: ``fisher="per_sample"``: the diagonal empirical Fisher ``mean_i (∇ℓ_i)²`` over the
samples with supervision, per-sample gradients by ``torch.func`` (``vmap(grad)``);
``shuffle=True``: seeded mini-batch order; ``layout="merged"``: D = the engine's training data, one
row per sample with every label it still has, in sample-id order (computable ahead: the next
request's D is this request's retain set); ``normalise="pair"``: the batch loss is the mean over
supervised (sample, task) pairs (``types.main_task_loss``) instead of the mean over samples of the
summed task losses — with several tasks this scales a per-task forget set's ``I_f`` by
``(#tasks)²`` against ``I_D`` (α/4 with two tasks). With one task both are the same numbers.
The class defaults of :class:`SSDConfig` are the settings ``default``'s SSD stage has always run
with (shuffled, merged, pair-normalised); the ``ssd`` method reads ``REFERENCE_DEFAULTS`` first.

The full-data importance can be cached per adapter version: a safetensors file in ``cache_dir``
named by the adapter digest and a fingerprint of the settings and the data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field
from pydantic import dataclasses as pydantic_dataclasses
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from worker.unlearning.config import SETTINGS, BatchSize, NonNegative, parse_settings
from worker.unlearning.grads import eval_mode, minibatches, per_sample_grads
from worker.unlearning.lora import LoraMLPView, fast_forward
from worker.unlearning.types import (
    Batch,
    TaskSpec,
    concat_batches,
    device_of,
    main_task_loss,
    main_task_losses,
)
from worker.unlearning.vit_view import LoraViTView

FisherMode = Literal["batch", "per_sample"]
Importance = dict[str, Tensor]
Layout = Literal["reference", "merged"]
Normalisation = Literal["sample", "pair"]

#: The ``ssd`` method's defaults under ``settings["ssd"]``: with them (and one task) its dampening is
#: bitwise the reference's (tests/worker/unlearning/test_ssd.py).
REFERENCE_DEFAULTS: dict[str, Any] = {"shuffle": False, "layout": "reference", "normalise": "sample"}


@pydantic_dataclasses.dataclass(frozen=True, config=SETTINGS)
class SSDConfig:
    """``settings["ssd"]``: ``alpha``, ``lambda`` (or ``lam``), ``batch_size``, ``fisher``
    (``"batch"`` = reference, ``"per_sample"``), ``shuffle`` (mini-batch order, seeded),
    ``layout`` (D: ``"reference"`` = retain rows then forget rows, ``"merged"`` = one row per
    sample in sample-id order), ``normalise`` (batch loss: ``"sample"`` or ``"pair"``), ``cache``
    (cache the full-data importance), ``chunk_size`` (per-sample vmap chunks).

    The class defaults are ``default``'s SSD stage's (unchanged); the ``ssd`` method overlays
    :data:`REFERENCE_DEFAULTS`."""

    alpha: NonNegative = 10.0
    lam: NonNegative = Field(default=1.0, validation_alias=AliasChoices("lambda", "lam"))
    batch_size: BatchSize = 64
    fisher: FisherMode = "batch"
    shuffle: bool = True
    layout: Layout = "merged"
    normalise: Normalisation = "pair"
    cache: bool = True
    chunk_size: BatchSize = 256

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> SSDConfig:
        return parse_settings(cls, settings, "SSD")  # bounds: the fields' types

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# importance
# ----------------------------------------------------------------------------------------------


def batch_importance(
    model: nn.Module,
    data: Batch,
    tasks: Sequence[TaskSpec],
    *,
    batch_size: int,
    names: Sequence[str] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    normalise: str = "pair",
) -> Importance:
    """Reference semantics: mean over mini-batches of the squared gradient of the batch mean loss
    (:func:`batch_loss` with ``normalise``).

    A parameter that gets no gradient (``.grad is None``) keeps importance 0.
    """
    names = list(names) if names is not None else trainable_names(model)
    params = dict(model.named_parameters())
    imp = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    batches = minibatches(data, batch_size, shuffle=shuffle, seed=seed)
    if not batches:
        return imp
    saved = {n: params[n].grad for n in names}
    forward = fast_forward(model)
    with eval_mode(model):
        for batch in batches:
            for n in names:
                params[n].grad = None
            loss = batch_loss(forward(batch.inputs), batch.labels, tasks, normalise)
            loss.backward()  # type: ignore[no-untyped-call]
            torch._foreach_add_(
                [imp[n] for n in names if params[n].grad is not None],
                [g.detach().float().pow(2) for n in names if (g := params[n].grad) is not None],
            )
    for n in names:
        params[n].grad = saved[n]
    torch._foreach_div_(list(imp.values()), float(len(batches)))
    return imp


def batch_loss(
    outputs: dict[str, Tensor], labels: dict[str, Tensor], tasks: Sequence[TaskSpec], normalise: str
) -> Tensor:
    """The mini-batch loss whose gradient SSD squares.

    ``"pair"``: the mean over supervised (sample, task) pairs (``types.main_task_loss``).
    ``"sample"``: the summed weighted task losses of each sample (Eq. 2), averaged over the samples
    with any supervision — the reference's ``CrossEntropyLoss()`` mean for one task, and the
    normalisation of the per-sample Fisher. A forget set that names fewer tasks per sample than D
    (a per-task request) is then compared per sample, not per pair: with ``"pair"`` each of its
    pairs weighs ``#tasks`` times more than one of D's, so ``I_f`` grows by ``#tasks²`` (α/4 with
    two tasks)."""
    if normalise == "pair":
        return main_task_loss(outputs, labels, tasks)
    per_sample = main_task_losses(outputs, labels, tasks)
    supervised = torch.stack([t.supervised(labels[t.name]) for t in tasks]).any(0)
    return per_sample.sum() / torch.clamp(supervised.sum().to(per_sample.dtype), min=1.0)


def reference_data(retain: Batch, forget: Batch) -> Batch:
    """D as the reference's ``DataLoader(ConcatDataset((retain, forget)))`` sees it: the retain rows
    in their order, then the forget set's rows (a mini-batch may hold both)."""
    parts = [b for b in (retain, forget) if len(b)]
    return concat_batches(parts) if parts else retain


def _losses(outputs: dict[str, Tensor], *, labels: dict[str, Tensor], tasks: Sequence[TaskSpec]) -> Tensor:
    return main_task_losses(outputs, labels, tasks)


def per_sample_importance(
    model: nn.Module,
    data: Batch,
    tasks: Sequence[TaskSpec],
    *,
    names: Sequence[str] | None = None,
    chunk_size: int = 256,
) -> Importance:
    """Diagonal empirical Fisher ``mean_i (∇ℓ_i)²`` over samples with supervision (``vmap(grad)``)."""
    names = list(names) if names is not None else trainable_names(model)
    params = dict(model.named_parameters())
    imp = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    supervised = torch.stack([t.supervised(data.labels[t.name]) for t in tasks]).any(0)
    data = data.select(supervised)
    n_total = len(data)
    if n_total == 0:
        return imp
    view = fast_forward(model)
    squares = (
        isinstance(view, (LoraMLPView, LoraViTView)) and {id(params[n]) for n in names} <= view.tensor_ids()
    )
    for part in data.split(chunk_size):
        if squares:  # the same sums from one backward pass (the views' sample_grad_squares)
            assert isinstance(view, (LoraMLPView, LoraViTView))
            sq = view.sample_grad_squares(
                part.inputs, functools.partial(_losses, labels=part.labels, tasks=tasks)
            )
            torch._foreach_add_([imp[n] for n in names], [sq[id(params[n])].float() for n in names])
        else:
            g = per_sample_grads(model, names, part, tasks, chunk_size=chunk_size)
            torch._foreach_add_([imp[n] for n in names], [g[n].float().pow(2).sum(0) for n in names])
    torch._foreach_div_(list(imp.values()), float(n_total))
    return imp


def importance(
    model: nn.Module,
    data: Batch,
    tasks: Sequence[TaskSpec],
    cfg: SSDConfig,
    *,
    names: Sequence[str] | None = None,
    seed: int = 0,
) -> Importance:
    """The importance of ``cfg.fisher`` kind over ``data`` (moved to the model's device: the engine
    computes the next request's ``I_D`` from the retain set as the data store holds it, on the CPU)."""
    data = data.to(device_of(model))
    if cfg.fisher == "per_sample":
        return per_sample_importance(model, data, tasks, names=names, chunk_size=cfg.chunk_size)
    return batch_importance(
        model,
        data,
        tasks,
        batch_size=cfg.batch_size,
        names=names,
        shuffle=cfg.shuffle,
        seed=seed,
        normalise=cfg.normalise,
    )


# ----------------------------------------------------------------------------------------------
# cache of the full-data importance
# ----------------------------------------------------------------------------------------------


def importance_fingerprint(data: Batch, cfg: SSDConfig, names: Sequence[str], seed: int) -> str:
    """Digest of what the full-data importance depends on besides the adapter weights."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "fisher": cfg.fisher,
                "batch_size": cfg.batch_size,
                "shuffle": cfg.shuffle,
                "seed": seed if cfg.shuffle else None,
                "layout": cfg.layout,
                "normalise": cfg.normalise,
                "names": list(names),
                "rows": len(data),
            },
            sort_keys=True,
        ).encode()
    )
    if len(data.sample_ids) == len(data):
        h.update("\0".join(data.sample_ids).encode())
    else:
        for key in sorted(data.inputs):
            h.update(data.inputs[key].detach().cpu().contiguous().numpy().tobytes())
    for name in sorted(data.labels):
        h.update(name.encode())
        h.update(data.labels[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's trainable tensors (names, shapes, dtypes, values): the cache key of the
    full-data importance. The same for a model in memory and after a save/load round trip of its
    adapter, so a round can compute the next version's ``I_D`` before it is published."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def precompute_full_importance(
    model: nn.Module,
    data: Batch,
    tasks: Sequence[TaskSpec],
    settings: Mapping[str, Any] | None,
    *,
    seed: int,
    cache_dir: Path | None,
) -> tuple[str | None, float]:
    """Compute ``I_D`` of ``model`` over ``data`` (the training data of the *next* request) into the
    cache ahead of time. Returns the cache key (``None``: caching is off) and the seconds it took —
    work moved, not removed: callers report it next to the method's own time.

    Nothing is computed for ``layout="reference"``: its D ends with the next request's forget set,
    which is not known yet."""
    cfg = SSDConfig.from_settings(settings)
    if not cfg.cache or cache_dir is None or cfg.layout == "reference":
        return None, 0.0
    t0 = time.perf_counter()
    key = weights_digest(model)
    full_importance(model, data, tasks, cfg, seed=seed, cache_dir=cache_dir, adapter_digest=key)
    return key, time.perf_counter() - t0


def cache_path(cache_dir: Path, adapter_digest: str, fingerprint: str) -> Path:
    safe = "".join(c for c in adapter_digest if c.isalnum() or c in "-_")[:128]
    if not safe:
        raise ValueError("empty adapter digest")
    return Path(cache_dir) / f"importance-{safe}-{fingerprint}.safetensors"


def save_importance(path: Path, imp: Mapping[str, Tensor]) -> None:
    """Write ``imp`` (safetensors) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in imp.items()}, str(tmp))
    os.replace(tmp, path)


def load_importance(path: Path, names: Sequence[str] | None = None) -> Importance | None:
    """Read a cached importance; ``None`` if absent, unreadable or missing one of ``names``."""
    if not path.exists():
        return None
    try:
        imp = load_file(str(path))
    except Exception:  # a torn or foreign file is a cache miss, never an error
        return None
    if names is not None and any(n not in imp for n in names):
        return None
    return dict(imp)


def canonical_order(data: Batch) -> Batch:
    """``data`` sorted by sample id (unchanged without one id per row)."""
    ids = data.sample_ids
    if len(ids) != len(data) or all(a <= b for a, b in pairwise(ids)):
        return data
    return data.select(torch.tensor(sorted(range(len(ids)), key=ids.__getitem__), dtype=torch.long))


def full_importance(
    model: nn.Module,
    data: Batch,
    tasks: Sequence[TaskSpec],
    cfg: SSDConfig,
    *,
    seed: int = 0,
    names: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    adapter_digest: str | None = None,
) -> tuple[Importance, bool]:
    """``I_D`` over ``data``, read from / written to the cache when ``cache_dir`` and
    ``adapter_digest`` are given (and ``cfg.cache``). Returns the importance and whether it was a hit.

    With ``layout="merged"`` the rows are put in sample-id order first, so that the same training
    data gives the same mini-batches (and cache entry) whichever order it was assembled in: the
    engine computes the next request's ``I_D`` ahead of time from the retain set
    (``engine.precompute_importance``). ``layout="reference"`` keeps the rows as given (retain,
    then forget: :func:`reference_data`)."""
    names = list(names) if names is not None else trainable_names(model)
    if cfg.layout == "merged":
        data = canonical_order(data)
    path: Path | None = None
    if cfg.cache and cache_dir is not None and adapter_digest:
        path = cache_path(cache_dir, adapter_digest, importance_fingerprint(data, cfg, names, seed))
        cached = load_importance(path, names)
        if cached is not None:
            device = device_of(model)
            return {n: cached[n].to(device) for n in names}, True
    imp = importance(model, data, tasks, cfg, names=names, seed=seed)
    if path is not None:
        save_importance(path, imp)
    return imp, False


# ----------------------------------------------------------------------------------------------
# dampening
# ----------------------------------------------------------------------------------------------


def dampening_factors(full: Tensor, forget: Tensor, alpha: float, lam: float) -> tuple[Tensor, Tensor]:
    """``(selected, beta)``: ``selected = I_f > α·I_D``; ``beta = min(λ·I_D / I_f, 1)`` there, 1 elsewhere.

    ``I_D = 0 < I_f`` gives ``beta = 0`` (the weight is zeroed), as in the reference.
    """
    selected = forget > alpha * full
    safe = torch.where(selected, forget, torch.ones_like(forget))
    beta = torch.where(selected, torch.clamp(lam * full / safe, max=1.0), torch.ones_like(forget))
    return selected, beta


def dampen(
    model: nn.Module,
    full: Mapping[str, Tensor],
    forget: Mapping[str, Tensor],
    *,
    alpha: float = 10.0,
    lam: float = 1.0,
) -> dict[str, Any]:
    """Apply Eq. 9/20 in place to the parameters named in ``forget`` (all of them at once, flat)."""
    params = dict(model.named_parameters())
    names = [n for n in forget if n in params]
    if not names:
        return {"parameters": 0, "selected": 0, "zeroed": 0, "per_parameter": {}}
    flat_full = torch.cat([full[n].reshape(-1).to(params[n].device) for n in names])
    flat_forget = torch.cat([forget[n].reshape(-1).to(params[n].device) for n in names])
    selected, beta = dampening_factors(flat_full.float(), flat_forget.float(), alpha, lam)
    sizes = [params[n].numel() for n in names]
    factors = [
        b.view_as(params[n]).to(params[n].dtype) for n, b in zip(names, torch.split(beta, sizes), strict=True)
    ]
    with torch.no_grad():
        torch._foreach_mul_([params[n] for n in names], factors)
    per_param = {
        n: int(s.sum()) for n, s in zip(names, torch.split(selected, sizes), strict=True) if bool(s.any())
    }
    return {
        "parameters": int(flat_forget.numel()),
        "selected": int(selected.sum()),
        "zeroed": int((selected & (beta == 0)).sum()),
        "per_parameter": per_param,
    }


def ssd(
    model: nn.Module,
    *,
    full: Batch,
    forget: Batch,
    tasks: Sequence[TaskSpec],
    cfg: SSDConfig | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    adapter_digest: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """SSD on ``model`` (in place): ``I_D`` over ``full`` (cached), ``I_f`` over ``forget``, dampen.

    Returns JSON info: settings, cache hit, selected/zeroed counts.
    """
    cfg = cfg or SSDConfig()
    names = trainable_names(model)
    if progress is not None:
        progress("ssd: full-data importance")
    imp_full, hit = full_importance(
        model, full, tasks, cfg, seed=seed, names=names, cache_dir=cache_dir, adapter_digest=adapter_digest
    )
    if progress is not None:
        progress("ssd: forget-set importance")
    imp_forget = importance(model, forget, tasks, cfg, names=names, seed=seed + 1)
    stats = dampen(model, imp_full, imp_forget, alpha=cfg.alpha, lam=cfg.lam)
    return {"config": cfg.to_json(), "cache_hit": hit, **stats}
