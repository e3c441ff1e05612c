"""Reference adapters for the likelihood-ratio audit (issue 8 part 5; UNLEARNING.md "Audit evidence").

``K`` adapters (``settings["audit"]["reference_adapters"]``, even; 0 = off) trained once per model,
off the request path, with v1's recipe (:func:`worker.unlearning.training.train_v1`), each on a
seeded random half of the model's clients. The halves are balanced per client, as in LiRA
(Carlini et al. 2022: every example is IN exactly half of the shadow models): client ``c`` is IN
the first ``K/2`` references of a seeded random permutation of ``0..K-1``, so each client has
exactly ``K/2`` OUT references — the ones the attack
(:mod:`worker.unlearning.likelihood_ratio`) reads for that client's samples.

``settings["audit"]["reference_in_fraction"]`` (deviation from LiRA's halves, default 0.5): each
client is IN ``round(K·f)`` references instead. The attack and the per-client targets read only OUT
references, so LiRA's balance is not needed for them; a larger share trains each OUT reference on
more of the other clients, nearer what a retrain without the client trains on (docs/methods.md,
"Reference adapters on more than half of the clients"). "Half" below means that share.

On disk (one directory): ``ref-<i>/`` (peft ``save_pretrained``, :func:`save_adapter`, and the
reference's outputs on the model's held-out split, :data:`HELDOUT_OUTPUTS`, and on each client's
samples, :data:`CLIENT_OUTPUTS`, which the rounds read instead of forwarding them) and
``references.json`` (the clients, which of them each reference was
trained on, the seed, the recipe and its digest). Written into a temporary sibling and renamed,
so that a crash leaves the old set or none, never half of one.

A reference trained on a client keeps that client's data in its weights: when clients are
forgotten, :func:`drop_references_with` deletes every reference whose half held one of them
(the OUT references of everyone stay valid) and, from the others, their outputs on the forgotten
clients' samples; :func:`refresh_references` retrains the dropped
ones on their half minus the forgotten clients (off the request path: the worker runs it after
a round's purge while no request of the model waits, and stops it when one arrives,
``worker.cleanup``), so that K does not shrink to nothing as clients are forgotten.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from worker.unlearning.adapter_io import AdapterView, load_adapters, save_adapter
from worker.unlearning.model import MultiTaskModel
from worker.unlearning.row_outputs import RowOutputs, load_outputs, read_outputs, save_outputs
from worker.unlearning.training import TrainConfig, TrainingInterruptedError, train_v1
from worker.unlearning.types import Batch, TaskSpec, without_labels
from worker.unlearning.workload import Workload

REFERENCES_FILE = "references.json"
#: each client's share of IN references by default: LiRA's halves
HALF = 0.5
#: in ``ref-<i>/``: the reference's outputs on the model's held-out split, computed when it is
#: trained (off the request path), which every round's target and audit would otherwise forward
HELDOUT_OUTPUTS = "heldout_outputs.safetensors"
#: in ``ref-<i>/``: one file per client (:func:`client_outputs_file`) with the reference's outputs
#: on that client's samples, computed when it is trained: a request's forget set is a client's
#: samples, which the per-client target and the audit would otherwise forward on the request path
CLIENT_OUTPUTS = "client_outputs"


def _ref_dir(index: int) -> str:
    return f"ref-{index}"


def client_outputs_file(client: str) -> str:
    """The file name of ``client``'s outputs in :data:`CLIENT_OUTPUTS` (a digest: client ids are
    the controller's strings, never a path)."""
    return hashlib.sha256(client.encode()).hexdigest()[:32] + ".safetensors"


def _client_rows(data: Batch, client_index: Mapping[str, int]) -> dict[str, Batch]:
    """``data``'s rows per client (in ``data``'s order), for the clients with any."""
    out: dict[str, Batch] = {}
    for client, index in client_index.items():
        rows = (data.subset == index).nonzero().reshape(-1)
        if len(rows):
            out[client] = data.select(rows)
    return out


def recipe_digest(
    workload: str,
    cfg: TrainConfig,
    seed: int,
    k: int,
    withhold_tasks: Sequence[str] = (),
    in_fraction: float = HALF,
) -> str:
    """sha256 of what the references depend on besides the data: workload, v1 recipe, seed, K (and
    the tasks whose labels are withheld, when any: :func:`assign_withheld`; the IN share, when it
    is not a half)."""
    doc: dict[str, Any] = {"workload": workload, "train": cfg.to_json(), "seed": seed, "references": k}
    if withhold_tasks:
        doc["withhold_tasks"] = list(withhold_tasks)
    if in_fraction != HALF:
        doc["in_fraction"] = in_fraction
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def in_count(k: int, in_fraction: float = HALF) -> int:
    """How many of ``k`` references each client is IN: ``round(k·in_fraction)``, clamped to
    ``1..k−1`` so that every client has an IN and an OUT reference (the OUT ones are what the
    attack and the per-client target read); ``references.json`` records who is IN where."""
    return min(k - 1, max(1, round(k * in_fraction)))


def _ranks(clients: Sequence[str], k: int, gen: torch.Generator) -> torch.Tensor:
    if k < 2 or k % 2:
        raise ValueError(f"the number of reference adapters must be even and at least 2, got {k}")
    # rank of each reference in a random permutation per client; the first in_count hold the client
    return torch.rand(len(clients), k, generator=gen).argsort(1).argsort(1)


def assign_halves(clients: Sequence[str], k: int, seed: int, in_fraction: float = HALF) -> list[list[str]]:
    """Per reference, the clients it trains on: each client IN exactly :func:`in_count` references
    (``k/2`` by default), drawn (a random permutation of the references per client) from a
    generator seeded with ``seed``."""
    n_in = in_count(k, in_fraction)
    inside = _ranks(clients, k, torch.Generator().manual_seed(seed)) < n_in  # [clients, k]
    return [[c for c, m in zip(clients, inside[:, r].tolist(), strict=True) if m] for r in range(k)]


def assign_withheld(
    clients: Sequence[str], k: int, seed: int, tasks: Sequence[str], in_fraction: float = HALF
) -> list[dict[str, list[str]]]:
    """Per reference, the clients of its half whose labels of one task it is trained without (the
    task-withheld calibration of per-task requests, issue 8 part 1): client ``c``'s IN references,
    in the order of its permutation (:func:`assign_halves`, same generator), withhold one task each,
    ``tasks[(j + o_c) % T]`` for the ``j``-th (``o_c`` a seeded random offset), the first ``T`` of
    them only. So with an IN count (:func:`in_count`, ``k/2`` by default) ``>= T`` every (client,
    task) has a reference that saw the client's inputs and its other tasks' labels but not that
    task's: what a per-task retrain sees of it.
    Fewer than two tasks: nothing is withheld (a per-task request needs a kept task)."""
    if len(tasks) < 2:
        return [{} for _ in range(k)]
    gen = torch.Generator().manual_seed(seed)
    ranks = _ranks(clients, k, gen)  # the same draw as assign_halves
    n_in = in_count(k, in_fraction)
    offsets = torch.randint(len(tasks), (len(clients),), generator=gen).tolist()
    out: list[dict[str, list[str]]] = [{} for _ in range(k)]
    for i, c in enumerate(clients):
        for r in range(k):
            j = int(ranks[i, r])
            if j < min(n_in, len(tasks)):
                out[r][c] = [tasks[(j + offsets[i]) % len(tasks)]]
    return out


def _draw(
    clients: Sequence[str], k: int, seed: int, withhold_tasks: Sequence[str], in_fraction: float
) -> tuple[list[list[str]], list[dict[str, list[str]]]]:
    """A set's reproducible draw: each reference's clients (:func:`assign_halves`) and, per
    reference, the clients' withheld tasks (:func:`assign_withheld`; none without ``withhold_tasks``).
    Training and every refresh read it from the same arguments, so a refresh keeps the draw."""
    halves = assign_halves(clients, k, seed, in_fraction)
    if not withhold_tasks:
        return halves, [{} for _ in range(k)]
    return halves, assign_withheld(clients, k, seed, list(withhold_tasks), in_fraction)


def _withhold(data: Batch, client_index: Mapping[str, int], withheld: Mapping[str, Sequence[str]]) -> Batch:
    """``data`` with the labels of each listed client's withheld tasks removed (inputs kept)."""
    labels = dict(data.labels)
    for client, names in withheld.items():
        rows = data.subset == client_index[client]
        for name in names:
            if name in labels:
                labels[name] = without_labels(labels[name], rows.to(labels[name].device))
    return Batch(inputs=data.inputs, labels=labels, subset=data.subset, sample_ids=data.sample_ids)


@dataclass
class ReferenceSet:
    """``references.json``: who each reference was trained on."""

    clients: list[str]  # every client of the model when the references were trained
    members: dict[int, list[str]]  # reference index -> the clients of its half (IN)
    k: int  # how many were trained (``members`` may hold fewer after drop_references_with)
    seed: int
    workload: str
    recipe: dict[str, Any]
    recipe_digest: str
    train_s: float
    # task-withheld calibration: the tasks that may be withheld (empty: none), and per reference the
    # clients of its half trained without those tasks' labels (:func:`assign_withheld`)
    withhold_tasks: list[str] = field(default_factory=list)
    withheld: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    in_fraction: float = HALF  # each client's share of IN references (:func:`in_count`)

    def to_json(self) -> dict[str, Any]:
        return {
            "clients": list(self.clients),
            "references": [
                {"index": i, "dir": _ref_dir(i), "clients": m, "withheld": self.withheld.get(i, {})}
                for i, m in self.members.items()
            ],
            "withhold_tasks": list(self.withhold_tasks),
            "k": self.k,
            "seed": self.seed,
            "workload": self.workload,
            "recipe": self.recipe,
            "recipe_digest": self.recipe_digest,
            "train_s": self.train_s,
            "in_fraction": self.in_fraction,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReferenceSet:
        return cls(
            clients=[str(c) for c in data["clients"]],
            members={int(r["index"]): [str(c) for c in r["clients"]] for r in data["references"]},
            k=int(data["k"]),
            seed=int(data["seed"]),
            workload=str(data["workload"]),
            recipe=dict(data["recipe"]),
            recipe_digest=str(data["recipe_digest"]),
            train_s=float(data["train_s"]),
            withhold_tasks=[str(t) for t in data.get("withhold_tasks", [])],
            withheld={
                int(r["index"]): {str(c): [str(t) for t in ts] for c, ts in r.get("withheld", {}).items()}
                for r in data["references"]
                if r.get("withheld")
            },
            in_fraction=float(data.get("in_fraction", HALF)),  # sets written before it: halves
        )

    def out_mask(self, subset: torch.Tensor, client_index: dict[str, int]) -> torch.Tensor:
        """``[references, N]`` bool: True where reference ``r`` never saw row ``i``'s client. A row
        of no client (``subset`` < 0, held-out data) is OUT of every reference."""
        by_index = {i: c for c, i in client_index.items()}
        n_clients = max([*client_index.values(), -1]) + 1
        # [references, clients + 1]: the last column is "no client" (OUT everywhere)
        table = torch.ones(len(self.members), n_clients + 1, dtype=torch.bool)
        for row, members in enumerate(self.members.values()):
            held = set(members)
            for i in range(n_clients):
                table[row, i] = by_index.get(i) not in held
        col = torch.where(subset < 0, torch.full_like(subset, n_clients), subset)
        return table[:, col]

    def withheld_mask(
        self, subset: torch.Tensor, client_index: dict[str, int], tasks: Sequence[str]
    ) -> torch.Tensor:
        """``[references, N]`` bool: True where reference ``r`` was trained on row ``i``'s client
        with exactly ``tasks``' labels withheld (it saw the inputs and the other tasks' labels) —
        the per-task request's calibration. Rows of no client are False everywhere."""
        want = sorted(tasks)
        by_index = {i: c for c, i in client_index.items()}
        n_clients = max([*client_index.values(), -1]) + 1
        table = torch.zeros(len(self.members), n_clients + 1, dtype=torch.bool)
        for row, (r, members) in enumerate(self.members.items()):
            held = self.withheld.get(r, {})
            for i in range(n_clients):
                c = by_index.get(i)
                table[row, i] = c in members and sorted(held.get(c or "", [])) == want
        col = torch.where(subset < 0, torch.full_like(subset, n_clients), subset)
        return table[:, col]


def train_references(
    base: MultiTaskModel,
    data: Batch,
    tasks: Sequence[TaskSpec],
    cfg: TrainConfig,
    *,
    client_index: dict[str, int],
    k: int,
    seed: int,
    directory: Path,
    workload: str,
    device: str = "cpu",
    withhold_tasks: Sequence[str] = (),
    heldout: Batch | None = None,
    in_fraction: float = HALF,
) -> ReferenceSet:
    """Train ``k`` references (v1's recipe, reference ``r`` seeded ``seed + 1 + r``) on halves of the
    clients of ``data`` (rows with ``subset`` = the client's index) and write them to ``directory``
    (replacing what was there); ``in_fraction``: each client's IN share (:func:`in_count`).
    ``withhold_tasks`` (two or more task names): each client's IN
    references are trained without one of these tasks' labels for that client
    (:func:`assign_withheld`); the OUT references of a client are what they would be anyway.
    ``heldout``: the model's held-out split; each reference's outputs on it are written beside it
    (:data:`HELDOUT_OUTPUTS`), and so are its outputs on every client's samples of ``data``
    (:data:`CLIENT_OUTPUTS`), so that rounds read them instead of forwarding them."""
    t0 = time.perf_counter()
    clients = sorted(client_index, key=client_index.__getitem__)
    halves, withheld = _draw(clients, k, seed, withhold_tasks, in_fraction)
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    per_client = _client_rows(data, client_index)
    for r, half in enumerate(halves):
        keep = torch.tensor([client_index[c] for c in half], dtype=torch.long)
        rows = torch.isin(data.subset, keep).nonzero().reshape(-1)
        half_data = _withhold(data.select(rows), client_index, withheld[r])
        model = train_v1(base, half_data, tasks, cfg, seed=seed + 1 + r, device=device)
        _save_reference(model, tmp / _ref_dir(r), heldout, per_client)
    refs = ReferenceSet(
        clients=clients,
        members=dict(enumerate(halves)),
        k=k,
        seed=seed,
        workload=workload,
        recipe=cfg.to_json(),
        recipe_digest=recipe_digest(workload, cfg, seed, k, withhold_tasks, in_fraction),
        train_s=time.perf_counter() - t0,
        withhold_tasks=list(withhold_tasks),
        withheld={r: dict(w) for r, w in enumerate(withheld) if w},
        in_fraction=in_fraction,
    )
    (tmp / REFERENCES_FILE).write_text(json.dumps(refs.to_json(), indent=2, sort_keys=True))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.replace(directory)
    return refs


def _save_reference(
    model: PeftModel, directory: Path, heldout: Batch | None, per_client: Mapping[str, Batch]
) -> None:
    """The adapter, and its outputs on the held-out split and on each client's samples (inputs
    only: a reference's outputs do not depend on which labels it was trained with)."""
    save_adapter(model, directory)
    if heldout is not None and len(heldout):
        save_outputs(model, heldout, directory / HELDOUT_OUTPUTS)
    if per_client:
        (directory / CLIENT_OUTPUTS).mkdir()
    for client, rows in per_client.items():
        save_outputs(model, rows, directory / CLIENT_OUTPUTS / client_outputs_file(client))


def read_references(directory: Path | None) -> ReferenceSet | None:
    """The ``references.json`` of ``directory``; ``None`` when there is none."""
    if directory is None or not (Path(directory) / REFERENCES_FILE).is_file():
        return None
    return ReferenceSet.from_json(json.loads((Path(directory) / REFERENCES_FILE).read_text()))


@dataclass
class LoadedReferences:
    r"""The reference set and a model per reference (eval mode), in ``refs.members`` order. As
    :func:`load_references` loads them, the models are :class:`AdapterView`\ s of ONE copy of the
    base holding the K adapters: memory is one base and K small adapters, not K bases. The models
    are read only while loaded (their outputs are cached by row)."""

    refs: ReferenceSet
    models: list[nn.Module]
    #: where the references' outputs computed ahead are (:data:`CLIENT_OUTPUTS`), and the model's
    #: client index to find a row's client; ``None``: every row is forwarded when first asked for
    directory: Path | None = None
    client_index: Mapping[str, int] | None = None
    #: per model, its outputs on the rows asked for so far (:meth:`outputs`): a row is forwarded once
    cache: list[RowOutputs] = field(init=False, repr=False)
    #: per model, the clients whose outputs computed ahead were read (or found missing)
    _read_clients: list[set[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cache = [RowOutputs(m) for m in self.models]
        self._read_clients = [set() for _ in self.models]

    def outputs(
        self, index: int, parts: Sequence[tuple[str, Batch]], device: str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """``models[index]``'s outputs on the rows of ``parts`` (``(role, batch)``: ``"forget"``
        for the model's client samples, ``"unseen"`` for held-out rows), each row forwarded once
        while these references are loaded (:class:`~worker.unlearning.row_outputs.RowOutputs`);
        a client sample whose outputs were computed when the reference was trained is read, not
        forwarded (when its inputs are still those it was computed on)."""
        for role, batch in parts:
            if role == "forget" and len(batch):
                self._read_ahead(index, batch)
        return self.cache[index].of(parts, device)

    def _read_ahead(self, index: int, batch: Batch) -> None:
        if self.directory is None or self.client_index is None:
            return
        by_index = {i: c for c, i in self.client_index.items()}
        clients = {by_index[i] for i in torch.unique(batch.subset).tolist() if i in by_index}
        folder = self.directory / _ref_dir(list(self.refs.members)[index]) / CLIENT_OUTPUTS
        for client in sorted(clients - self._read_clients[index]):
            self._read_clients[index].add(client)
            stored = read_outputs(folder / client_outputs_file(client))
            if stored is not None:
                self.cache[index].seed_rows("forget", *stored)


def load_references(
    base: MultiTaskModel,
    directory: Path | None,
    *,
    device: str = "cpu",
    heldout: Batch | None = None,
    client_index: Mapping[str, int] | None = None,
) -> LoadedReferences | None:
    """Load every reference of ``directory`` onto one copy of ``base`` (one named peft adapter
    each, ``ref-<i>``); ``None`` when there are none. ``heldout``: the model's held-out split; a
    reference's outputs on it written at training (:data:`HELDOUT_OUTPUTS`) are read into its row
    cache when they are these rows (same ids, same inputs), else they are forwarded when asked.
    ``client_index``: the model's clients; with it a client's samples are read from the outputs
    written at training (:data:`CLIENT_OUTPUTS`) when first asked for, row by row where the inputs
    are those the outputs were computed on."""
    refs = read_references(directory)
    if refs is None or directory is None or not refs.members:
        return None
    names = [_ref_dir(i) for i in refs.members]
    shared = load_adapters(base, {name: Path(directory) / name for name in names}, device=device)
    loaded = LoadedReferences(
        refs=refs,
        models=[AdapterView(shared, name) for name in names],
        directory=Path(directory),
        client_index=dict(client_index) if client_index is not None else None,
    )
    if heldout is not None and len(heldout):
        for cache, name in zip(loaded.cache, names, strict=True):
            outputs = load_outputs(Path(directory) / name / HELDOUT_OUTPUTS, heldout)
            if outputs is not None:
                cache.seed("unseen", heldout, outputs)
    return loaded


def drop_references_with(directory: Path | None, clients: Iterable[str]) -> list[int]:
    """Delete the references trained on any of ``clients`` (forgotten data must not survive in a
    reference), and the other references' outputs on those clients' samples (derived from their
    data); returns the indices dropped. ``references.json`` is rewritten first, so a crash leaves
    at most an unlisted directory, never a listed reference that holds a forgotten client."""
    refs = read_references(directory)
    if refs is None or directory is None:
        return []
    gone = set(clients)
    dropped = [i for i, m in refs.members.items() if gone & set(m)]
    for i in refs.members:
        if i not in dropped:
            folder = Path(directory) / _ref_dir(i) / CLIENT_OUTPUTS
            for client in gone:
                (folder / client_outputs_file(client)).unlink(missing_ok=True)
    if not dropped:
        return []
    refs.members = {i: m for i, m in refs.members.items() if i not in dropped}
    refs.withheld = {i: w for i, w in refs.withheld.items() if i not in dropped}
    _write_json(Path(directory), refs)
    for i in dropped:
        shutil.rmtree(Path(directory) / _ref_dir(i), ignore_errors=True)
    return dropped


def _write_json(directory: Path, refs: ReferenceSet) -> None:
    path = Path(directory) / REFERENCES_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(refs.to_json(), indent=2, sort_keys=True))
    tmp.replace(path)


def refresh_references(
    base: MultiTaskModel,
    data: Batch,
    tasks: Sequence[TaskSpec],
    cfg: TrainConfig,
    *,
    client_index: dict[str, int],
    directory: Path | None,
    forgotten: Iterable[str],
    device: str = "cpu",
    should_stop: Callable[[], bool] | None = None,
    heldout: Batch | None = None,
) -> list[int]:
    """Retrain every reference of ``directory`` that was dropped (:func:`drop_references_with`) on
    its original half (:func:`assign_halves` of the set's clients, K and seed: the draw is
    reproducible) minus the ``forgotten`` clients and any client ``data`` no longer holds; with the
    set's recipe seed (``seed + 1 + r``). ``data`` is the model's current training data (rows with
    ``subset`` = the client's index), from which forgotten samples and labels are already gone.
    Each adapter is written (into a temporary sibling, renamed) before ``references.json`` lists it,
    so a crash leaves an unlisted directory, never a listed half-written one. Returns the indices
    retrained. A refreshed reference never holds a forgotten client, and every client stays OUT of
    the references its half excluded.

    ``should_stop`` (background work that yields, e.g. to queued requests): asked before each
    reference and after every optimiser step of its training; when true, the reference in training
    is discarded and the refresh returns the ones finished — the rest stay dropped for the next
    refresh. ``heldout``: as :func:`train_references`'s."""
    refs = read_references(directory)
    if refs is None or directory is None:
        return []
    missing = [r for r in range(refs.k) if r not in refs.members]
    if not missing:
        return []
    gone = set(forgotten)
    present = set(torch.unique(data.subset).tolist())
    halves, withheld = _draw(refs.clients, refs.k, refs.seed, refs.withhold_tasks, refs.in_fraction)
    done: list[int] = []
    per_client = _client_rows(data, {c: i for c, i in client_index.items() if c not in gone})
    for r in missing:
        if should_stop is not None and should_stop():
            break
        half = [c for c in halves[r] if c not in gone and c in client_index and client_index[c] in present]
        keep = torch.tensor([client_index[c] for c in half], dtype=torch.long)
        rows = torch.isin(data.subset, keep).nonzero().reshape(-1)
        held = {c: ts for c, ts in withheld[r].items() if c in half}
        half_data = _withhold(data.select(rows), client_index, held)
        try:
            model = train_v1(base, half_data, tasks, cfg, seed=refs.seed + 1 + r, device=device,
                             should_stop=should_stop)  # fmt: skip
        except TrainingInterruptedError:
            break
        target = Path(directory) / _ref_dir(r)
        tmp = target.with_name(target.name + ".tmp")
        for stale in (tmp, target):  # an unlisted leftover of a crash
            if stale.exists():
                shutil.rmtree(stale)
        _save_reference(model, tmp, heldout, per_client)
        tmp.replace(target)
        refs.members[r] = half
        refs.members = dict(sorted(refs.members.items()))
        if held:
            refs.withheld[r] = held
            refs.withheld = dict(sorted(refs.withheld.items()))
        _write_json(Path(directory), refs)
        done.append(r)
    return done


def refresh_from_store(
    workload: Workload,
    *,
    data_dir: Path,
    base_dir: Path,
    directory: Path,
    settings: Mapping[str, Any],
    device: str = "cpu",
    should_stop: Callable[[], bool] | None = None,
) -> list[int]:
    """:func:`refresh_references` on a model's data store as it is now (after a purge: the forgotten
    clients, samples and labels are gone from it), with v1's recipe from ``settings``. The
    forgotten clients are those of the set the store no longer holds. Returns the indices retrained."""
    from worker.unlearning.datastore import DataStore
    from worker.unlearning.model import load_base
    from worker.unlearning.partitions import retain_set
    from worker.unlearning.state import RoundState

    refs = read_references(directory)
    if refs is None or len(refs.members) == refs.k or (should_stop is not None and should_stop()):
        return []
    store = DataStore(Path(data_dir), workload.collate)
    index = store.client_index()
    tasks = workload.tasks()
    data = retain_set(store.client_data(), None, tasks=[t.name for t in tasks], client_index=index,
                      state=RoundState())  # fmt: skip
    active = set(store.active_clients)
    forgotten = [c for c in refs.clients if c not in active]
    cfg = TrainConfig.from_settings(workload.settings(settings))
    base = load_base(Path(base_dir))
    return refresh_references(base, data, tasks, cfg, client_index=index, directory=directory,
                              forgotten=forgotten, device=device, should_stop=should_stop,
                              heldout=store.heldout().to_batch(index))  # fmt: skip
