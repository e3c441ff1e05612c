"""``ssd``: Selective Synaptic Dampening alone (settings key ``"ssd"``; see ``worker.unlearning.ssd``)."""

from __future__ import annotations

from worker.unlearning.methods import register
from worker.unlearning.methods.base import MethodContext, MethodResult
from worker.unlearning.ssd import SSDConfig, ssd


def run_ssd(ctx: MethodContext) -> dict[str, object]:
    """SSD on ``ctx.model`` in place: I_D over ``ctx.full`` (cached per adapter digest), I_f over D_f."""
    return ssd(
        ctx.model,
        full=ctx.full.to(ctx.device),
        forget=ctx.partitions.forget.to(ctx.device),
        cfg=SSDConfig.from_settings(ctx.method_settings("ssd")),
        cache_dir=ctx.cache_dir,
        adapter_digest=ctx.cache_key,
        **ctx.common_kwargs(),
    )


@register("ssd")
def ssd_method(ctx: MethodContext) -> MethodResult:
    info = run_ssd(ctx)
    return MethodResult(model=ctx.model, info={"method": "ssd", "ssd": info})
