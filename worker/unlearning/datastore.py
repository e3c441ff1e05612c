"""The dataset store: files under a directory, one shard per client, purged in place.

Layout of ``data_dir``::

    store.json              tasks, clients (subset-head order), purge log
    clients/<client>.npz    one shard per client: x, sample_ids, one label array per task
    heldout.npz             the held-out split (belongs to no client)

Purging a client deletes its shard file (its raw samples are gone). Purging samples for every
task removes their rows from the shard. Purging (sample, task) pairs overwrites those labels with
``IGNORE``; once every task's label of a sample is purged so, its row is removed too. The purge
log in ``store.json`` records what was purged, so purged data never re-enters a retain set;
purges are idempotent. Every file is replaced atomically (write, fsync, rename).
Shards are ``.npz`` without pickled objects (``allow_pickle=False``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worker.unlearning.types import ForgetSpec, unsupervised_value
from worker.unlearning.workload import SampleSet, Workload

STORE_FILE = "store.json"
HELDOUT_FILE = "heldout.npz"
HELDOUT_CLIENTS = "unseen_client"  # heldout.npz: the unseen client of each row ("" = none)
CLIENTS_DIR = "clients"
STORE_FORMAT = 1
INPUT_PREFIX = "input__"

Collate = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def _identity(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    return inputs


@dataclass
class PurgeReport:
    """What one ``purge`` call removed (empty lists when it was already done: idempotent)."""

    deleted_clients: list[str] = field(default_factory=list)
    deleted_samples: list[str] = field(default_factory=list)
    purged_pairs: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "deleted_clients": list(self.deleted_clients),
            "deleted_samples": list(self.deleted_samples),
            "purged_pairs": [[s, t] for s, t in self.purged_pairs],
        }


@dataclass(frozen=True)
class ResolvedSpec:
    """A forget request resolved against the store: X_f (ids), T_f, and whether it is a whole client."""

    sample_ids: list[str]
    forget_tasks: list[str]
    client_id: str | None
    whole_client: bool
    full_task: bool


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    _atomic_write_bytes(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]


def _shard_arrays(data: SampleSet, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"sample_ids": np.asarray(data.sample_ids, dtype=np.str_)}
    for key, leaf in data.inputs.items():
        arrays[f"{INPUT_PREFIX}{key}"] = _stored(leaf)
    for t in tasks:
        arrays[f"label__{t}"] = _stored(data.labels[t])
    return arrays


def _stored(t: Tensor) -> np.ndarray:
    """float64 is stored as float32 and other integers as int64 (the dtypes the models take)."""
    a = t.detach().cpu().numpy()
    if a.dtype == np.float64:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer) and a.dtype != np.int64:
        return a.astype(np.int64)
    return a


class DataStore:
    """The dataset store of one model (``$LETHE_HOME/data/<model>/``)."""

    def __init__(self, data_dir: Path, collate: Collate | None = None) -> None:
        self.data_dir = Path(data_dir)
        # the workload's collate from stored arrays to the model's inputs (identity when not given)
        self.collate: Collate = collate if collate is not None else _identity
        meta_path = self.data_dir / STORE_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"no dataset store at {self.data_dir} (run prepare first)")
        self._meta: dict[str, Any] = json.loads(meta_path.read_text())
        if int(self._meta.get("format", 0)) != STORE_FORMAT:
            raise ValueError(f"unsupported dataset store format in {self.data_dir}")

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def exists(cls, data_dir: Path) -> bool:
        return (Path(data_dir) / STORE_FILE).exists()

    @classmethod
    def materialise(cls, data_dir: Path, workload: Workload) -> DataStore:
        """Write the workload's client shards and held-out split (idempotent: an existing store,
        with its purge log, is kept as it is)."""
        data_dir = Path(data_dir)
        if cls.exists(data_dir):
            return cls(data_dir, workload.collate)
        (data_dir / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
        tasks = [t.name for t in workload.tasks()]
        clients = workload.clients()
        data = workload.client_data()
        owners = np.asarray([c if c is not None else "" for c in data.client_ids], dtype=np.str_)
        unknown = set(owners.tolist()) - set(clients)
        if unknown:
            raise ValueError(f"client data has samples of unknown clients {sorted(unknown)}")
        for client in clients:
            rows = torch.from_numpy(np.nonzero(owners == client)[0])
            shard = SampleSet(
                inputs={k: v[rows] for k, v in data.inputs.items()},
                sample_ids=[data.sample_ids[i] for i in rows.tolist()],
                client_ids=[client] * int(rows.numel()),
                labels={t: data.labels[t][rows] for t in tasks},
            )
            _write_npz(data_dir / CLIENTS_DIR / f"{client}.npz", _shard_arrays(shard, tasks))
        heldout = workload.heldout_data()
        arrays = _shard_arrays(heldout, tasks)
        unseen = workload.heldout_clients()
        if unseen:
            # which unseen client each held-out row was drawn from ("" = none)
            unseen_of_row = [unseen.get(s, "") for s in heldout.sample_ids]
            arrays[HELDOUT_CLIENTS] = np.asarray(unseen_of_row, dtype=np.str_)
        _write_npz(data_dir / HELDOUT_FILE, arrays)
        meta = {
            "format": STORE_FORMAT,
            "workload": workload.name,
            "tasks": tasks,
            "clients": clients,
            "purged_clients": [],
            "purged_samples": [],
            "purged_pairs": [],
        }
        store_path = data_dir / STORE_FILE
        _atomic_write_bytes(store_path, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
        return cls(data_dir, workload.collate)

    # -- metadata ------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self._meta["tasks"])

    @property
    def clients(self) -> list[str]:
        """Every client ever registered, in subset-ID head order (purged ones included)."""
        return list(self._meta["clients"])

    @property
    def purged_clients(self) -> list[str]:
        return list(self._meta["purged_clients"])

    @property
    def purged_samples(self) -> list[str]:
        return list(self._meta["purged_samples"])

    @property
    def purged_pairs(self) -> list[tuple[str, str]]:
        return [(str(s), str(t)) for s, t in self._meta["purged_pairs"]]

    @property
    def active_clients(self) -> list[str]:
        gone = set(self.purged_clients)
        return [c for c in self.clients if c not in gone]

    def client_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.clients)}

    # -- reading -------------------------------------------------------------------------------
    def _shard_path(self, client: str) -> Path:
        return self.data_dir / CLIENTS_DIR / f"{client}.npz"

    def _read(self, path: Path, client: str | None, *, raw: bool = False) -> SampleSet:
        """A shard as a sample set; ``raw``: the stored arrays, without the workload's collate (what
        a purge rewrites)."""
        with np.load(path, allow_pickle=False) as npz:
            # "x": the single input of stores written before inputs were a dict
            keys = [k for k in npz.files if k.startswith(INPUT_PREFIX)] or ["x"]
            inputs = {k.removeprefix(INPUT_PREFIX): torch.from_numpy(np.array(npz[k])) for k in keys}
            ids = [str(s) for s in npz["sample_ids"].tolist()]
            labels = {t: torch.from_numpy(np.array(npz[f"label__{t}"])) for t in self.tasks}
        return SampleSet(
            inputs=inputs if raw else self.collate(inputs),
            sample_ids=ids,
            client_ids=[client] * len(ids),
            labels=labels,
        )

    def client_samples(self, client: str, *, raw: bool = False) -> SampleSet | None:
        """The client's remaining samples (None once the client is purged); ``raw``: see ``_read``."""
        if client not in self.clients:
            raise KeyError(f"unknown client {client!r}")
        path = self._shard_path(client)
        if client in self.purged_clients or not path.exists():
            return None
        return self._read(path, client, raw=raw)

    def client_data(self) -> SampleSet:
        """All remaining client samples, clients in head order (purged data is not there)."""
        parts = [s for s in (self.client_samples(c) for c in self.active_clients) if s is not None]
        if not parts:
            held = self.heldout()
            return SampleSet(
                inputs={k: v[:0] for k, v in held.inputs.items()},
                sample_ids=[],
                client_ids=[],
                labels={t: y[:0] for t, y in held.labels.items()},
            )
        return concat_sample_sets(parts, self.tasks)

    def heldout(self) -> SampleSet:
        return self._read(self.data_dir / HELDOUT_FILE, None)

    def heldout_clients(self) -> dict[str, str]:
        """Held-out sample id → the unseen client it was drawn from (:meth:`Workload.heldout_clients`);
        empty for a store written without them."""
        with np.load(self.data_dir / HELDOUT_FILE, allow_pickle=False) as npz:
            if HELDOUT_CLIENTS not in npz.files:
                return {}
            ids, clients = npz["sample_ids"].tolist(), npz[HELDOUT_CLIENTS].tolist()
        return {str(s): str(c) for s, c in zip(ids, clients, strict=True) if c}

    def sample_ids_of(self, client: str) -> list[str]:
        shard = self.client_samples(client)
        return [] if shard is None else list(shard.sample_ids)

    # -- requests ------------------------------------------------------------------------------
    def resolve(self, spec: ForgetSpec) -> ResolvedSpec:
        """X_f and T_f of a request, from the current store contents (see ``ForgetSpec``)."""
        all_tasks = self.tasks
        unknown = [t for t in spec.tasks if t not in all_tasks]
        if unknown:
            raise ValueError(f"request {spec.request_id}: unknown tasks {unknown}")
        if spec.kind == "task" and not spec.tasks:
            raise ValueError(f"request {spec.request_id}: a task request needs tasks")
        forget_tasks = [t for t in all_tasks if t in spec.tasks] if spec.tasks else list(all_tasks)
        full_task = len(forget_tasks) == len(all_tasks)
        if spec.client_id is not None and spec.client_id not in self.clients:
            raise ValueError(f"request {spec.request_id}: unknown client {spec.client_id!r}")
        if spec.sample_ids is not None:
            ids = list(dict.fromkeys(spec.sample_ids))
            if spec.client_id is not None:
                own = set(self.sample_ids_of(spec.client_id))
                foreign = [s for s in ids if s not in own and s not in self.purged_samples]
                if foreign and spec.client_id not in self.purged_clients:
                    raise ValueError(
                        f"request {spec.request_id}: samples {foreign[:5]} are not {spec.client_id}'s"
                    )
            return ResolvedSpec(ids, forget_tasks, spec.client_id, False, full_task)
        if spec.client_id is None:
            raise ValueError(f"request {spec.request_id}: needs client_id or sample_ids")
        ids = self.sample_ids_of(spec.client_id)
        whole = spec.kind == "client" and full_task
        return ResolvedSpec(ids, forget_tasks, spec.client_id, whole, full_task)

    def purge(self, specs: Iterable[ForgetSpec]) -> PurgeReport:
        """Delete the raw data / labels the requests name. Idempotent."""
        report = PurgeReport()
        for spec in specs:
            resolved = self.resolve(spec)
            if resolved.whole_client and resolved.client_id is not None:
                self._purge_client(resolved.client_id, report)
            elif resolved.full_task:
                self._purge_samples(resolved.sample_ids, report)
            else:
                self._purge_pairs(resolved.sample_ids, resolved.forget_tasks, report)
        return report

    def _save_meta(self) -> None:
        data = json.dumps(self._meta, indent=2).encode()
        _atomic_write_bytes(self.data_dir / STORE_FILE, lambda fh: fh.write(data))

    def _purge_client(self, client: str, report: PurgeReport) -> None:
        # Log first, then delete: a crash in between leaves a logged purge whose file a re-run removes.
        if client not in self._meta["purged_clients"]:
            self._meta["purged_clients"] = sorted({*self._meta["purged_clients"], client})
            self._save_meta()
            report.deleted_clients.append(client)
        self._shard_path(client).unlink(missing_ok=True)

    def _locate(self, sample_ids: Sequence[str]) -> dict[str, list[str]]:
        """client -> those of ``sample_ids`` that are still in its shard."""
        wanted = set(sample_ids)
        found: dict[str, list[str]] = {}
        for client in self.active_clients:
            mine = [s for s in self.sample_ids_of(client) if s in wanted]
            if mine:
                found[client] = mine
        return found

    def _rewrite_shard(self, client: str, shard: SampleSet) -> None:
        _write_npz(self._shard_path(client), _shard_arrays(shard, self.tasks))

    def _purge_samples(self, sample_ids: Sequence[str], report: PurgeReport) -> None:
        new = sorted(set(sample_ids) - set(self._meta["purged_samples"]))
        if new:
            self._meta["purged_samples"] = sorted({*self._meta["purged_samples"], *new})
            self._save_meta()
            report.deleted_samples.extend(new)
        for client, ids in self._locate(sample_ids).items():
            shard = self.client_samples(client, raw=True)
            assert shard is not None
            drop = set(ids)
            keep = torch.tensor([s not in drop for s in shard.sample_ids], dtype=torch.bool)
            rows = keep.nonzero(as_tuple=True)[0]
            self._rewrite_shard(
                client,
                SampleSet(
                    inputs={k: v[rows] for k, v in shard.inputs.items()},
                    sample_ids=[shard.sample_ids[i] for i in rows.tolist()],
                    client_ids=[client] * int(rows.numel()),
                    labels={t: y[rows] for t, y in shard.labels.items()},
                ),
            )

    def _purge_pairs(self, sample_ids: Sequence[str], tasks: Sequence[str], report: PurgeReport) -> None:
        logged = {(str(s), str(t)) for s, t in self._meta["purged_pairs"]}
        pairs = {(s, t) for s in sample_ids for t in tasks}
        new = sorted(pairs - logged)
        if new:
            self._meta["purged_pairs"] = [[s, t] for s, t in sorted(logged | pairs)]
            self._save_meta()
            report.purged_pairs.extend(new)
        for client, ids in self._locate(sample_ids).items():
            shard = self.client_samples(client, raw=True)
            assert shard is not None
            hit = set(ids)
            mask = torch.tensor([s in hit for s in shard.sample_ids], dtype=torch.bool)
            labels = dict(shard.labels)
            for t in tasks:
                labels[t] = torch.where(
                    mask, torch.full_like(labels[t], unsupervised_value(labels[t])), labels[t]
                )
            self._rewrite_shard(
                client,
                SampleSet(
                    inputs=shard.inputs,
                    sample_ids=shard.sample_ids,
                    client_ids=shard.client_ids,
                    labels=labels,
                ),
            )
        # A sample whose every task's label was erased keeps nothing: its inputs go too.
        erased = {(str(s), str(t)) for s, t in self._meta["purged_pairs"]}
        empty = [s for s in dict.fromkeys(sample_ids) if all((s, t) in erased for t in self.tasks)]
        if empty:
            self._purge_samples(empty, report)


def concat_sample_sets(parts: Sequence[SampleSet], tasks: Sequence[str]) -> SampleSet:
    if not parts:
        raise ValueError("no samples left in the store")
    return SampleSet(
        inputs={k: torch.cat([p.inputs[k] for p in parts]) for k in parts[0].inputs},
        sample_ids=[s for p in parts for s in p.sample_ids],
        client_ids=[c for p in parts for c in p.client_ids],
        labels={t: torch.cat([p.labels[t] for p in parts]) for t in tasks},
    )
