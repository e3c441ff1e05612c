"""The benchmark's training cache (``--training-cache``): a hit is the training's result bit for
bit, any change to what the training reads is a miss, a training that draws from the global RNG is
never stored, and a whole run read back from the cache gives the rows a run that trains gives."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from bench.quality import run_bench
from bench.training_cache import REPO_ROOT, TrainingCache, code_files, tree_digest
from worker.unlearning.audit import model_outputs
from worker.unlearning.engine import EngineInputs
from worker.unlearning.training import TrainConfig, fresh_adapter, train_v1
from worker.unlearning.workloads.toy import ToyWorkload


def _inputs(tmp_path: Path) -> EngineInputs:
    from worker.unlearning.datastore import DataStore
    from worker.unlearning.engine import ensure_base

    wl = ToyWorkload(num_clients=4, per_client=10)
    DataStore.materialise(tmp_path / "data", wl)
    ensure_base(wl, tmp_path / "base", wl.settings(), seed=0)
    return EngineInputs.load(
        wl, data_dir=tmp_path / "data", base_dir=tmp_path / "base", settings=wl.settings(), seed=0
    )


def _train(inputs: EngineInputs, cfg: TrainConfig, seed: int, calls: list[int]) -> Any:
    def train() -> tuple[Any, float]:
        calls.append(seed)
        return train_v1(inputs.base, inputs.full_train_set(), inputs.tasks, cfg, seed=seed), 1.25

    return train


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_hit_is_the_trained_model_bit_for_bit_and_keeps_its_seconds(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path / "wl")
    cfg = dataclasses.replace(TrainConfig.from_settings(inputs.settings), epochs=2)
    parts = {"data": inputs.full_train_set(), "tasks": inputs.tasks, "cfg": cfg, "seed": 5}
    cache, calls = TrainingCache(tmp_path / "cache"), list[int]()
    fresh = lambda: fresh_adapter(inputs.base, cfg, seed=5)  # noqa: E731
    trained, seconds = cache.adapter("v1", parts, inputs.base, _train(inputs, cfg, 5, calls), fresh)
    again, again_s = cache.adapter("v1", parts, inputs.base, _train(inputs, cfg, 5, calls), fresh)
    assert calls == [5]  # trained once
    assert (seconds, again_s) == (1.25, 1.25)  # the training's own seconds, not the load's
    assert cache.stats() == {"hits": 1, "misses": 1, "uncached": 0}
    a, b = _state(trained), _state(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not again.training  # as train_v1 leaves it
    x = inputs.full_train_set().inputs
    out, out_again = model_outputs(trained, x), model_outputs(again, x)
    assert all(torch.equal(out[t], out_again[t]) for t in out)


def test_what_the_training_reads_is_its_key(tmp_path: Path) -> None:
    """Another seed, recipe, data or base is another training: a miss, trained."""
    inputs = _inputs(tmp_path / "wl")
    cfg = dataclasses.replace(TrainConfig.from_settings(inputs.settings), epochs=1)
    data = inputs.full_train_set()
    cache, calls = TrainingCache(tmp_path / "cache"), list[int]()

    def run(seed: int, recipe: TrainConfig, rows: Any, base: torch.nn.Module) -> None:
        parts = {"data": rows, "tasks": inputs.tasks, "cfg": recipe, "seed": seed}
        cache.adapter("v1", parts, base, _train(inputs, recipe, seed, calls),
                      lambda: fresh_adapter(inputs.base, recipe, seed=seed))  # fmt: skip

    run(1, cfg, data, inputs.base)
    run(2, cfg, data, inputs.base)
    run(1, dataclasses.replace(cfg, lr=cfg.lr / 2), data, inputs.base)
    changed = dataclasses.replace(data, labels={k: v.clone() for k, v in data.labels.items()})
    first = next(iter(changed.labels))
    changed.labels[first][0] = (changed.labels[first][0] + 1) % 2
    run(1, cfg, changed, inputs.base)
    other_base = copy.deepcopy(inputs.base)
    with torch.no_grad():
        next(other_base.parameters()).add_(1e-6)
    run(1, cfg, data, other_base)
    assert cache.stats()["misses"] == 5
    assert cache.stats()["hits"] == 0
    run(1, cfg, data, inputs.base)
    assert cache.stats()["hits"] == 1


def test_a_second_asker_of_a_training_waits_for_it_and_reads_it(tmp_path: Path) -> None:
    """Two processes' units asking for the same training at once (``--jobs``): one trains, the other
    waits on the key's lock and hits, instead of training the same thing beside it."""
    inputs = _inputs(tmp_path / "wl")
    cfg = dataclasses.replace(TrainConfig.from_settings(inputs.settings), epochs=1)
    parts = {"data": inputs.full_train_set(), "tasks": inputs.tasks, "cfg": cfg, "seed": 3}
    fresh = lambda: fresh_adapter(inputs.base, cfg, seed=3)  # noqa: E731
    started, release, calls = threading.Event(), threading.Event(), list[str]()

    def slow() -> tuple[Any, float]:
        calls.append("first")
        started.set()
        assert release.wait(30)
        return train_v1(inputs.base, inputs.full_train_set(), inputs.tasks, cfg, seed=3), 2.5

    def quick() -> tuple[Any, float]:
        calls.append("second")
        return train_v1(inputs.base, inputs.full_train_set(), inputs.tasks, cfg, seed=3), 0.1

    first, second = TrainingCache(tmp_path / "cache"), TrainingCache(tmp_path / "cache")
    got: dict[str, float] = {}
    a = threading.Thread(target=lambda: got.update(a=first.adapter("v1", parts, inputs.base, slow, fresh)[1]))
    a.start()
    assert started.wait(30)
    b = threading.Thread(
        target=lambda: got.update(b=second.adapter("v1", parts, inputs.base, quick, fresh)[1])
    )
    b.start()
    b.join(0.5)
    assert b.is_alive()  # waiting for the first training, not running its own
    release.set()
    a.join(60)
    b.join(60)
    assert calls == ["first"]
    assert got == {"a": 2.5, "b": 2.5}  # the second reads the first's entry and its seconds
    assert (first.stats()["misses"], second.stats()["hits"]) == (1, 1)


def test_a_stopped_run_s_temporary_entry_is_removed_and_a_live_one_s_kept(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid answers no more
    cache_dir = tmp_path / "cache"
    key = "ab" * 20
    abandoned = cache_dir / f".{key}.{gone.pid}.0123abcd"
    live = cache_dir / f".{key}.{os.getpid()}.89abcdef"
    lock, entry = cache_dir / f".{key}.lock", cache_dir / key
    for d in (abandoned, live, entry):
        (d / "tree").mkdir(parents=True)
    lock.touch()
    TrainingCache(cache_dir)
    assert not abandoned.exists()
    assert live.is_dir()
    assert entry.is_dir()
    assert lock.is_file()


def test_a_training_that_draws_from_the_global_rng_is_never_stored(tmp_path: Path) -> None:
    cache = TrainingCache(tmp_path / "cache")
    model = torch.nn.Linear(2, 2)

    def noisy() -> tuple[Any, float]:
        torch.rand(1)  # as dropout would: the result depends on what ran before
        return model, 0.5

    for _ in range(2):
        cache.adapter("v1", {"seed": 1}, model, noisy, lambda: model)
    assert cache.stats() == {"hits": 0, "misses": 0, "uncached": 2}
    left = list((tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else []
    assert all(p.name.endswith(".lock") and p.is_file() for p in left)  # no entry, only the key's lock


def test_a_tree_hit_restores_the_directory_and_its_value(tmp_path: Path) -> None:
    cache, target, calls = TrainingCache(tmp_path / "cache"), tmp_path / "refs", []
    model = torch.nn.Linear(2, 2)

    def produce() -> tuple[Any, float]:
        calls.append(1)
        (target / "r0").mkdir(parents=True, exist_ok=True)
        (target / "r0" / "w.bin").write_bytes(b"weights")
        (target / "references.json").write_text('{"k": 2}')
        return [0], 3.0

    first = cache.tree("refresh", {"before": {}}, model, produce, target)
    written = tree_digest(target)
    (target / "references.json").write_text("something else")
    second = cache.tree("refresh", {"before": {}}, model, produce, target)
    assert calls == [1]
    assert first == second == ([0], 3.0)
    assert tree_digest(target) == written
    # a set trained twice writes the same adapters and other seconds: the same content for a refresh
    (target / "references.json").write_text('{"k": 2, "train_s": 99.5}')
    timed = tree_digest(target)
    (target / "references.json").write_text('{"k": 2, "train_s": 12.25}')
    assert tree_digest(target) == timed
    (target / "references.json").write_text('{"k": 4, "train_s": 12.25}')
    assert tree_digest(target) != timed


def test_the_code_key_follows_what_trains_and_not_the_methods() -> None:
    """A change to a method (the candidates a comparison is about) keeps the cache; a change to
    v1's recipe, LoRA, the model or the references' training does not."""
    files = {str(p.relative_to(REPO_ROOT)) for p in code_files()}
    for trains in ("training.py", "lora.py", "model.py", "reference_adapters.py", "pruning.py", "types.py"):
        assert f"worker/unlearning/{trains}" in files
    methods = ("worker/unlearning/methods/", "worker/unlearning/interference/")
    assert not any(f.startswith(methods) for f in files)


def test_a_run_read_back_from_the_cache_gives_the_rows_of_a_run_that_trains(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {
        "seeds": [3], "workload": ToyWorkload(num_clients=4, per_client=10),
        "methods": ["retrain", "default"], "references": 2, "echo": None,
        "settings_overrides": {"ia": {"epochs": 2}},
    }  # fmt: skip
    plain = run_bench("smoke", None, **kwargs)
    stored = run_bench("smoke", None, training_cache=tmp_path / "cache", **kwargs)
    read = run_bench("smoke", None, training_cache=tmp_path / "cache", **kwargs)
    assert plain["meta"]["training_cache"]["hits"] == 0
    assert stored["meta"]["training_cache"]["hits"] == 0
    assert stored["meta"]["training_cache"]["misses"] > 0
    assert read["meta"]["training_cache"]["misses"] == 0
    assert read["meta"]["training_cache"]["hits"] == stored["meta"]["training_cache"]["misses"]

    def untimed(value: Any) -> Any:  # every measured second left out (``…_s``), at any depth
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if not k.endswith("_s")}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    def scored(result: dict[str, Any]) -> list[dict[str, Any]]:
        return [untimed(r) for r in result["runs"]]

    assert scored(plain) == scored(stored) == scored(read)
    # the retrain's wall is its training's, as measured when it was trained
    walls = [r["wall_s"] for r in stored["runs"] if r["method"] == "retrain"]
    assert walls == [r["wall_s"] for r in read["runs"] if r["method"] == "retrain"]
