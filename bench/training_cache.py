"""A disk cache of the benchmark's trainings (``--training-cache DIR``), so that a comparison of
candidates on seeds an earlier run trained does not train them again.

A quality run trains, per seed, v1, its reference adapters, their refreshes after each stage, and
each stage's reference retrain (and ``retrain_2``). None of them depends on the method being
compared: on scenes at 1,500 samples per client they are about 80 % of a unit's CPU time. Every
one is a deterministic function of its inputs on one machine (seeded; one torch thread), so its
result can be stored and read back bit for bit.

**The key is the inputs themselves, not their names:** the bytes of the training data and of the
frozen base, the recipe, the seed, the source of every ``worker`` module the training runs
(:func:`code_fingerprint`), and the machine's arithmetic: torch, peft and transformers versions,
the CPU kernel path, the CPU model and the thread count. Any change to one of them is a miss, which
trains and stores. A hit returns what training would have returned and reports the seconds the
training took when it ran (so a row's ``wall_s`` is the measured training time, not a load).

A training that draws from the global torch RNG (dropout, say) depends on what ran before it, which
the key does not hold: such a result is never stored (``uncached``), and every call trains.

Entries are written to a temporary sibling and renamed, so two processes that train the same seed
(``--jobs``: each unit trains its seed's v1) never leave a half-written entry. A training holds a
lock on its key while it runs: a second process that asks for it waits and reads the entry,
instead of running the same training beside it. A run stopped mid-training leaves its temporary
entry behind; the next cache opened on the directory removes it (:func:`remove_abandoned`). Only
the benchmark uses this; the worker never caches a training.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import PeftModel
from torch import Tensor, nn

from worker.file_lock import exclusive_lock
from worker.unlearning.model import MultiTaskModel
from worker.unlearning.reference_adapters import train_references
from worker.unlearning.runtime import package_versions
from worker.unlearning.training import TrainConfig, fresh_adapter, train_v1
from worker.unlearning.types import Batch, TaskSpec

FORMAT = 1  # bump when what an entry holds changes
REPO_ROOT = Path(__file__).resolve().parent.parent
# the modules whose code runs when the benchmark trains (v1's recipe, references, pruning); their
# ``worker`` imports are followed, and the base model's own modules are added per call
TRAINING_MODULES = (
    "worker.unlearning.training",
    "worker.unlearning.reference_adapters",
    "worker.unlearning.pruning",
    "worker.unlearning.model",
)

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


def _module_file(name: str) -> Path | None:
    """The source file of the repository module ``name`` (``None``: not a module of this repo)."""
    path = REPO_ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imported_files(path: Path) -> set[Path]:
    """The ``worker`` modules ``path`` imports anywhere (a function's lazy import too)."""
    out: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            found = _module_file(name) if name.split(".")[0] == "worker" else None
            if found is not None:
                out.add(found)
    return out


def code_files(modules: tuple[str, ...] = TRAINING_MODULES) -> set[Path]:
    """The source files of ``modules`` and of every ``worker`` module they import, transitively."""
    todo = [f for f in (_module_file(m) for m in modules) if f is not None]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imported_files(path) - seen)
    return seen


@functools.cache
def code_fingerprint(modules: tuple[str, ...] = TRAINING_MODULES) -> str:
    """A digest of :func:`code_files`. A change to the methods (``worker.unlearning.methods``,
    ``interference``) leaves it as it is; a change to what trains does not."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(code_files(modules)):
        h.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def model_modules(model: nn.Module) -> tuple[str, ...]:
    """The repository modules that define ``model``'s layers (their forward runs in training)."""
    names = {type(m).__module__ for m in model.modules()}
    return tuple(sorted(n for n in names if _module_file(n) is not None))


def machine() -> dict[str, Any]:
    """What decides the arithmetic of a training on this machine (the thread count read each time:
    a process may set it after the first key)."""
    return {**_fixed_machine(), "threads": torch.get_num_threads()}


@functools.cache
def _fixed_machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "packages": {k: package_versions().get(k) for k in ("peft", "transformers")},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _feed(h: Any, obj: Any) -> None:
    """Feed ``obj`` into the hash ``h`` canonically; a type it cannot key raises (never a weak key)."""
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, nn.Module):
        h.update(f"M{type(obj).__qualname__}".encode())
        _feed(h, dict(obj.state_dict()))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"D{type(obj).__qualname__}".encode())
        for f in dataclasses.fields(obj):
            h.update(f.name.encode())
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, Mapping):
        h.update(f"{{{len(obj)}".encode())
        for key in sorted(obj, key=str):
            _feed(h, str(key))
            _feed(h, obj[key])
    elif isinstance(obj, list | tuple):
        h.update(f"[{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif obj is None or isinstance(obj, str | int | float | bool):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"the training cache cannot key a {type(obj).__qualname__}")


def digest(kind: str, parts: Mapping[str, Any], base: nn.Module) -> str:
    """The entry name of a ``kind`` training of ``base`` on ``parts`` (see the module doc)."""
    h = hashlib.blake2b(digest_size=20)
    _feed(h, {"format": FORMAT, "kind": kind, "machine": machine(), "parts": parts, "base": base})
    _feed(h, code_fingerprint(TRAINING_MODULES + model_modules(base)))
    return h.hexdigest()


@dataclasses.dataclass
class TrainingCache:
    """``directory``: where entries live; ``None``: every call trains (nothing is stored)."""

    directory: Path | None = None
    hits: int = 0
    misses: int = 0  # trained and stored
    uncached: int = 0  # trained, not stored: the training drew from the global RNG

    def __post_init__(self) -> None:
        if self.directory is not None:
            remove_abandoned(self.directory)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "uncached": self.uncached}

    def adapter(
        self,
        kind: str,
        parts: Mapping[str, Any],
        base: nn.Module,
        train: Callable[[], tuple[M, float]],
        fresh: Callable[[], M],
    ) -> tuple[M, float]:
        """``train()``'s model and the seconds it reports for its training. ``fresh()``: the
        untrained model ``train`` starts from (an entry stores only the tensors training changed,
        and loads them into ``fresh()``)."""

        def read(entry: Path) -> M:
            model = fresh()
            changed = torch.load(entry / "changed.pt", map_location="cpu", weights_only=True)
            own = model.state_dict()
            missing = set(changed) - set(own)
            if missing:
                raise RuntimeError(f"cache entry {entry.name}: unknown tensors {sorted(missing)[:3]}")
            device = next(iter(own.values())).device
            model.load_state_dict({k: v.to(device) for k, v in changed.items()}, strict=False)
            return model.eval()

        def write(model: M, tmp: Path) -> None:
            untrained = fresh().state_dict()
            changed = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                       if not torch.equal(v.detach().cpu(), untrained[k].detach().cpu())}  # fmt: skip
            torch.save(changed, tmp / "changed.pt")

        model, seconds, _ = self._through(kind, parts, base, train, read, write)
        return model, seconds

    def tree(
        self,
        kind: str,
        parts: Mapping[str, Any],
        base: nn.Module,
        produce: Callable[[], tuple[Any, float]],
        directory: Path,
    ) -> tuple[Any, float]:
        """``produce()`` writes ``directory`` (a reference set) and returns a JSON value and its
        seconds; those two. A hit replaces ``directory`` with the stored copy. ``parts`` should
        hold what ``directory`` held before (:func:`tree_digest`) where ``produce`` reads it."""

        def read(entry: Path) -> None:
            if directory.exists():
                shutil.rmtree(directory)
            shutil.copytree(entry / "tree", directory)

        def write(_: Any, tmp: Path) -> None:
            shutil.copytree(directory, tmp / "tree")

        value, seconds, meta = self._through(kind, parts, base, produce, read, write)
        return (meta["value"] if meta is not None else value), seconds

    def _through(
        self,
        kind: str,
        parts: Mapping[str, Any],
        base: nn.Module,
        run: Callable[[], tuple[T, float]],
        read: Callable[[Path], T],
        write: Callable[[T, Path], None],
    ) -> tuple[T, float, dict[str, Any] | None]:
        """A hit: ``read(entry)``, the stored seconds and the entry's meta. A miss: ``run()``, and
        where it left the RNGs alone ``write(result, tmp)`` and its meta (``value``: the result
        where it is JSON, a tree's); meta ``None``."""
        if self.directory is None:
            return (*run(), None)
        entry = self.directory / digest(kind, parts, base)
        with _key_lock(entry):
            if (entry / "meta.json").is_file():
                meta = json.loads((entry / "meta.json").read_text())
                self.hits += 1
                return read(entry), float(meta["train_s"]), meta
            (result, seconds), pure = _pure(run)
            if not pure:
                self.uncached += 1
                return result, seconds, None
            with _EntryWriter(entry) as tmp:
                write(result, tmp)
                meta = {"kind": kind, "train_s": seconds}
                if not isinstance(result, nn.Module):
                    meta["value"] = result
                (tmp / "meta.json").write_text(json.dumps(meta))
            self.misses += 1
            return result, seconds, None


def _key_lock(entry: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on ``entry``'s key, across processes, held from the hit check to the
    entry's rename: a second asker of the same training waits for it and then hits. Each call
    trains or reads one entry and takes no other lock inside, so no two locks are ever nested."""
    return exclusive_lock(entry.with_name(f".{entry.name}.lock"))


def remove_abandoned(directory: Path) -> list[Path]:
    """Remove the temporary entries (:class:`_EntryWriter`) of processes that are gone, e.g. a run
    stopped mid-training, and return them. A live process's (its pid answers) and the keys' lock
    files are kept."""
    removed = []
    for tmp in directory.glob(".*.*.*") if directory.is_dir() else ():
        parts = tmp.name.split(".")  # "", key, pid, id
        if not tmp.is_dir() or len(parts) != 4 or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


class _EntryWriter:
    """A temporary sibling of ``entry``, renamed to it on success; if another process stored the
    same entry first, ours is dropped (both are the same training's result)."""

    def __init__(self, entry: Path) -> None:
        self.entry = entry
        self.tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> Path:
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is None:
            try:
                self.tmp.rename(self.entry)
                return
            except OSError:  # the entry exists: another process stored it first
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def tree_digest(directory: Path) -> dict[str, str]:
    """Per file of ``directory`` (relative path), a digest of its content: what a refresh reads. A
    JSON file is read without its measured seconds (keys ending in ``_s``, e.g. a reference set's
    ``train_s``): two trainings of the same set write the same adapters and different timings."""
    return {str(p.relative_to(directory)): _content_digest(p) for p in sorted(_files(directory))}


def _content_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    if path.suffix == ".json":
        _feed(h, _untimed(json.loads(path.read_text())))
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def _untimed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not str(k).endswith("_s")}
    return [_untimed(v) for v in value] if isinstance(value, list) else value


def _files(directory: Path) -> Iterator[Path]:
    return (p for p in Path(directory).rglob("*") if p.is_file())


def timed(work: Callable[[], T]) -> tuple[T, float]:
    """``work()`` and its wall seconds."""
    t0 = time.perf_counter()
    out = work()
    return out, time.perf_counter() - t0


def _rng_states() -> list[Tensor]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return [torch.random.get_rng_state(), *cuda]


def _pure(work: Callable[[], T]) -> tuple[T, bool]:
    """``work()``, and whether it left the global torch RNGs as it found them."""
    before = _rng_states()
    out = work()
    after = _rng_states()
    same = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    return out, same


def trained_adapter(
    cache: TrainingCache,
    base: MultiTaskModel,
    data: Batch,
    tasks: Sequence[TaskSpec],
    cfg: TrainConfig,
    *,
    seed: int,
) -> tuple[PeftModel, float]:
    """:func:`~worker.unlearning.training.train_v1` (v1, or a retrain on another data set) and its
    seconds, read from ``cache`` where it trained the same before."""
    return cache.adapter(
        "v1", {"data": data, "tasks": list(tasks), "cfg": cfg, "seed": seed}, base,
        train=lambda: timed(lambda: train_v1(base, data, tasks, cfg, seed=seed)),
        fresh=lambda: fresh_adapter(base, cfg, seed=seed),
    )  # fmt: skip


def trained_references(
    cache: TrainingCache,
    base: MultiTaskModel,
    data: Batch,
    tasks: Sequence[TaskSpec],
    cfg: TrainConfig,
    *,
    directory: Path,
    **recipe: Any,
) -> float:
    """:func:`~worker.unlearning.reference_adapters.train_references` into ``directory`` (``recipe``:
    its keyword arguments), or the cache's copy of the same set; the set's training seconds."""

    def train() -> tuple[float, float]:
        made = train_references(base, data, tasks, cfg, directory=directory, **recipe)
        return made.train_s, made.train_s

    parts = {"data": data, "tasks": list(tasks), "cfg": cfg, **recipe}
    train_s, _ = cache.tree("references", parts, base, train, directory)
    return float(train_s)
