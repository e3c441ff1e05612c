"""``ssd``: Selective Synaptic Dampening alone (settings key ``"ssd"``; see ``worker.unlearning.ssd``).

The method's defaults are the public reference's (:data:`worker.unlearning.ssd.REFERENCE_DEFAULTS`
under ``settings["ssd"]``: D = the retain rows then the forget set's rows, unshuffled, batch loss
averaged over samples). ``default``'s SSD stage calls :func:`run_ssd` without them and keeps the
settings it has always run with (:class:`~worker.unlearning.ssd.SSDConfig`'s class defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.unlearning import progress
from worker.unlearning.methods import Needs, register
from worker.unlearning.methods.base import MethodContext, MethodResult
from worker.unlearning.ssd import REFERENCE_DEFAULTS, SSDConfig, reference_data, ssd


def ssd_method_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The SSD settings the ``ssd`` method runs with: the reference's defaults, then
    ``settings["ssd"]`` (the engine computes ``I_D`` ahead with the same)."""
    return {**REFERENCE_DEFAULTS, **dict(settings.get("ssd") or {})}


def run_ssd(ctx: MethodContext, *, defaults: Mapping[str, Any] | None = None) -> dict[str, object]:
    """SSD on ``ctx.model`` in place: I_D over D (cached per adapter digest), I_f over D_f.

    ``defaults``: settings read before ``settings["ssd"]`` (the ``ssd`` method passes the
    reference's). D is ``ctx.full`` for ``layout="merged"`` and :func:`reference_data` of
    ``ctx.retain`` and D_f for ``layout="reference"``."""
    cfg = SSDConfig.from_settings({**dict(defaults or {}), **ctx.method_settings("ssd")})
    ctx.stage(progress.SSD)
    forget = ctx.partitions.forget.to(ctx.device)
    if cfg.layout == "reference":
        if ctx.retain is None:
            raise ValueError("SSD layout 'reference' needs the retain set (MethodContext.retain)")
        full = reference_data(ctx.retain.to(ctx.device), forget)
    else:
        full = ctx.full.to(ctx.device)
    return ssd(
        ctx.model,
        full=full,
        forget=forget,
        cfg=cfg,
        cache_dir=ctx.cache_dir,
        adapter_digest=ctx.cache_key,
        **ctx.common_kwargs(),
    )


@register("ssd", config=SSDConfig, needs=Needs(full_importance=ssd_method_settings))
def ssd_method(ctx: MethodContext) -> MethodResult:
    info = run_ssd(ctx, defaults=REFERENCE_DEFAULTS)
    return MethodResult(model=ctx.model, info={"method": "ssd", "ssd": info})
