"""Where a round is: the stages the ML core reports through a callback (no database here).

``StageCallback(stage, step, of)``: ``stage`` is one of :data:`STAGES` (the worker adds
``publish``); ``step`` of ``of`` counts within the stage (request k of n for ``partitions`` and
``audit``, epoch k of n for ``update``; 0 of 0: the stage has no steps). The worker throttles what it
writes (``worker.progress``); the core calls the callback as often as it likes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

PARTITIONS: Final = "partitions"
SSD: Final = "ssd"
UPDATE: Final = "update"
ACCEPTANCE: Final = "acceptance"
AUDIT: Final = "audit"
#: The engine's stages in order (``service.db.models.ROUND_STAGES`` adds the worker's ``publish``).
STAGES: Final = (PARTITIONS, SSD, UPDATE, ACCEPTANCE, AUDIT)

StageCallback = Callable[[str, int, int], None]
