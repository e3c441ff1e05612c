"""``original``: the do-nothing bound (the model is returned unchanged)."""

from __future__ import annotations

from worker.unlearning.methods import register
from worker.unlearning.methods.base import MethodContext, MethodResult


@register("original")
def original(ctx: MethodContext) -> MethodResult:
    return MethodResult(model=ctx.model, info={"method": "original"})
