"""The workload of each benchmark seed: built by name with its options, the data seed following
the benchmark's seed (``lethe bench``, the workload measurement)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.unlearning.workload import Workload, build_workload, takes_seed, workload_factory


class SeededWorkloads:
    """The workload of each benchmark seed. A registered name is built with ``options`` and, when
    its constructor takes ``seed`` and the options do not set it, ``seed=<the benchmark's seed>``:
    the data follows the seeds. A :class:`Workload` instance is used as it is for every seed."""

    def __init__(self, workload: str | Workload, options: Mapping[str, Any] | None = None) -> None:
        self.source = workload
        self.options = dict(options or {})
        self.factory: Any = None  # the registered class, resolved once (worker processes reuse it)
        if isinstance(workload, Workload):
            if self.options:
                raise ValueError("workload options need a workload name, not an instance")
            self.follows_seed = False
        else:
            self.factory = workload_factory(workload)
            self.follows_seed = "seed" not in self.options and takes_seed(self.factory)
        # the last one built only: a workload may hold its whole dataset in memory
        self._built: tuple[int | None, Workload] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # a worker process builds its own workload: the one built here (its data) is not sent
        return {**self.__dict__, "_built": None}

    def data_seed(self, seed: int) -> int | None:
        return seed if self.follows_seed else None

    def of(self, seed: int) -> Workload:
        if isinstance(self.source, Workload):
            return self.source
        key = self.data_seed(seed)
        if self._built is None or self._built[0] != key:
            self._built = (key, build_workload(self.source, self.options, seed=key, factory=self.factory))
        return self._built[1]

    def root(self, root: Path, seed: int) -> Path:
        """The directory of ``seed``'s data, base and cache (shared by seeds with the same data)."""
        key = self.data_seed(seed)
        return root / ("data-fixed" if key is None else f"data-seed-{key}")
