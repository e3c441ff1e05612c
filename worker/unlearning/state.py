"""RoundState: what one unlearning round hands to the next, stored as ``unlearning_state.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "unlearning_state.json"
STATE_FORMAT = 1


@dataclass
class RoundState:
    """Explicit, JSON-serialisable state of the sequential setting.

    - ``forgotten_clients``: clients forgotten in full (never re-enter a retain set);
    - ``forgotten_samples``: samples forgotten for every task (listed even when their client is);
    - ``forgotten_pairs``: (sample id, task) pairs forgotten by partial-task requests;
    - ``pruned_subset_outputs``: subset-ID head outputs suppressed for good (re-applied each round);
    - ``importance_cache_key``: key of the cached full-data importance of this version (the digest
      of its trainable weights, ``ssd.weights_digest``), or None;
    - ``version``: adapter version this state belongs to (1 = original), ``requests``: request ids
      processed so far, in order;
    - ``original_val``: the original version's (v1) held-out metric per task: the level the
      acceptance check keeps every later version within a tolerance of (empty: unknown).
    """

    forgotten_clients: list[str] = field(default_factory=list)
    forgotten_samples: list[str] = field(default_factory=list)
    forgotten_pairs: list[tuple[str, str]] = field(default_factory=list)
    pruned_subset_outputs: list[int] = field(default_factory=list)
    importance_cache_key: str | None = None
    version: int = 1
    requests: list[str] = field(default_factory=list)
    original_val: dict[str, float] = field(default_factory=dict)

    # -- queries -------------------------------------------------------------------------------
    def forgotten_pair_set(self) -> set[tuple[str, str]]:
        return {(s, t) for s, t in self.forgotten_pairs}

    def is_excluded(self, sample_id: str, client_id: str | None) -> bool:
        """True for an instance that may never re-enter a retain set."""
        return (client_id is not None and client_id in self.forgotten_clients) or (
            sample_id in self.forgotten_samples
        )

    # -- updates (keep the lists sorted and duplicate-free: the JSON is canonical) --------------
    def add_clients(self, clients: Iterable[str]) -> None:
        self.forgotten_clients = sorted(set(self.forgotten_clients) | set(clients))

    def add_samples(self, samples: Iterable[str]) -> None:
        self.forgotten_samples = sorted(set(self.forgotten_samples) | set(samples))

    def add_pairs(self, pairs: Iterable[tuple[str, str]], *, all_tasks: Iterable[str] = ()) -> None:
        """Add (sample, task) pairs; a sample forgotten so for every one of ``all_tasks`` becomes a
        forgotten sample (nothing of it is kept: the data store deletes its inputs too)."""
        merged = self.forgotten_pair_set() | {(s, t) for s, t in pairs}
        tasks = set(all_tasks)
        if tasks:
            by_sample: dict[str, set[str]] = {}
            for s, t in merged:
                by_sample.setdefault(s, set()).add(t)
            complete = {s for s, ts in by_sample.items() if ts >= tasks}
            if complete:
                self.add_samples(complete)
        self.forgotten_pairs = sorted(merged)

    def add_pruned(self, outputs: Iterable[int]) -> None:
        self.pruned_subset_outputs = sorted(set(self.pruned_subset_outputs) | {int(o) for o in outputs})

    def copy(self) -> RoundState:
        return RoundState.from_json(self.to_json())

    # -- serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": self.version,
            "forgotten_clients": list(self.forgotten_clients),
            "forgotten_samples": list(self.forgotten_samples),
            "forgotten_pairs": [[s, t] for s, t in self.forgotten_pairs],
            "pruned_subset_outputs": list(self.pruned_subset_outputs),
            "importance_cache_key": self.importance_cache_key,
            "requests": list(self.requests),
            "original_val": dict(sorted(self.original_val.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundState:
        fmt = int(data.get("format", STATE_FORMAT))
        if fmt != STATE_FORMAT:
            raise ValueError(f"unsupported unlearning state format {fmt}")
        key = data.get("importance_cache_key")
        return cls(
            forgotten_clients=[str(c) for c in data.get("forgotten_clients", [])],
            forgotten_samples=[str(s) for s in data.get("forgotten_samples", [])],
            forgotten_pairs=[(str(p[0]), str(p[1])) for p in data.get("forgotten_pairs", [])],
            pruned_subset_outputs=[int(o) for o in data.get("pruned_subset_outputs", [])],
            importance_cache_key=None if key is None else str(key),
            version=int(data.get("version", 1)),
            requests=[str(r) for r in data.get("requests", [])],
            original_val={str(k): float(v) for k, v in (data.get("original_val") or {}).items()},
        )

    def save(self, adapter_dir: Path) -> Path:
        """Write ``adapter_dir/unlearning_state.json`` atomically."""
        adapter_dir.mkdir(parents=True, exist_ok=True)
        path = adapter_dir / STATE_FILE
        tmp = adapter_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, adapter_dir: Path) -> RoundState:
        """Read ``adapter_dir/unlearning_state.json``.

        A missing file is an error (FileNotFoundError), never an empty state: an empty state would
        let forgotten data back into the retain sets.
        """
        return cls.load_file(adapter_dir / STATE_FILE)

    @classmethod
    def load_file(cls, path: Path) -> RoundState:
        """Read a state file (kept outside the served adapter directory by the worker)."""
        return cls.from_json(json.loads(path.read_text()))
