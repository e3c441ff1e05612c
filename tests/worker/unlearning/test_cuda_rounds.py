"""Rounds on a GPU (marker ``gpu``; skipped without CUDA, so CI, which has none, skips them; on a GPU
machine: ``pytest -m gpu tests/worker/unlearning/test_cuda_rounds.py``, or ``scripts/gpu-check``).

A GPU worker prepares a model on the CPU and runs its rounds on the GPU (``worker.context``:
``LETHE_WORKER_DEVICE=auto``). Here every registered method runs one round of two requests (a
client's, then another client's partial-task request) on ``digits-clients`` on CUDA, from a v1
prepared on the CPU, and what it publishes must load on the CPU with peft alone and compute there
what it computes on the GPU; certification retrains and compares a version on CUDA. The quality of
CUDA rounds is judged by the same distribution tests as the CPU's:
``LETHE_TEST_DEVICE=cuda pytest -m quality tests/worker/unlearning/test_unl_digits_round.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from worker.unlearning.adapter_io import load_adapter
from worker.unlearning.audit import ModelMetrics
from worker.unlearning.certify import CertifyRequest, certify_version, forget_sets
from worker.unlearning.datastore import DataStore
from worker.unlearning.engine import EngineInputs, ForgetSpec, prepare, run_round
from worker.unlearning.methods import available_methods
from worker.unlearning.workload import Workload, load_workload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

REQUESTS = [
    ForgetSpec("r1", "client", "c3", None, []),
    ForgetSpec("r2", "task", "c5", None, ["orientation"]),
]
# CPU and GPU kernels round differently (cuDNN's convolutions may use TF32): the same adapter's
# logits on the two devices agree to this (absolute, on logits of size ~10) and pick the same class
# on nearly every held-out sample
LOGIT_TOLERANCE = 0.05
MIN_SAME_PREDICTION = 0.99


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workload, Path]:
    """v1 on ``digits-clients``, prepared on the CPU (with its reference adapters), as a worker does."""
    root = tmp_path_factory.mktemp("cuda-digits")
    workload = load_workload("digits-clients")
    prepare(workload, data_dir=root / "data", base_dir=root / "base", adapter_dir=root / "v1",
            settings={}, seed=0, cache_dir=root / "cache", references_dir=root / "references")  # fmt: skip
    return workload, root


@pytest.mark.parametrize("method", available_methods())
def test_every_method_runs_a_round_on_cuda_and_publishes_an_adapter_the_cpu_loads(
    prepared: tuple[Workload, Path], method: str
) -> None:
    workload, root = prepared
    out = root / f"v2-{method}"
    references = root / "references"
    outcome = run_round(workload, data_dir=root / "data", base_dir=root / "base", adapter_in=root / "v1",
                        adapter_out=out, requests=REQUESTS, method=method, settings={}, seed=0,
                        device="cuda", cache_dir=root / "cache",
                        references_dir=references if references.is_dir() else None)  # fmt: skip
    for spec in REQUESTS:
        evidence = outcome.evidence[spec.request_id]
        for task, row in evidence["tasks"].items():
            for split in ("ret", "val"):
                assert math.isfinite(float(row[split])), (spec.request_id, task, split, row)
        assert evidence["acceptance"]["path"], evidence["acceptance"]

    store = DataStore.materialise(root / "data", workload)
    heldout = store.heldout().to_batch(store.client_index())
    base = workload.load_base(root / "base")
    on_cpu = load_adapter(base, out)  # PeftModel.from_pretrained on the CPU
    on_gpu = load_adapter(base, out, device="cuda")
    with torch.no_grad():
        cpu_out = on_cpu(heldout.inputs)
        gpu_out = on_gpu(heldout.to("cuda").inputs)
    for task in workload.tasks():
        a, b = cpu_out[task.name], gpu_out[task.name].cpu()
        assert float((a - b).abs().max()) <= LOGIT_TOLERANCE, (method, task.name)
        same = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        assert same >= MIN_SAME_PREDICTION, (method, task.name, same)


def test_certification_retrains_and_compares_a_version_on_cuda(prepared: tuple[Workload, Path]) -> None:
    """A certify worker on a GPU: the reference retrain and both evaluations run on CUDA and give a
    verdict with UIS for the client request (its forget set read from the store, not purged here)."""
    workload, root = prepared
    out = root / "v2-certified"
    spec = REQUESTS[0]
    outcome = run_round(workload, data_dir=root / "data", base_dir=root / "base", adapter_in=root / "v1",
                        adapter_out=out, requests=[spec], method="default", settings={}, seed=0,
                        device="cuda", cache_dir=root / "cache")  # fmt: skip
    store = DataStore(root / "data")
    original = ModelMetrics.from_json(outcome.evidence[spec.request_id]["original_metrics"])
    request = CertifyRequest(spec.request_id, ["digit", "orientation"],
                             forget_sets(store, [spec])[spec.request_id], original)  # fmt: skip
    inputs = EngineInputs.load(workload, data_dir=root / "data", base_dir=root / "base", settings={},
                               seed=0, device="cuda")  # fmt: skip
    doc = certify_version(inputs, adapter_dir=out, requests=[request]).to_json()
    assert doc["verdict"] in {"within_bounds", "out_of_bounds"}
    assert doc["retrain_wall_s"] > 0
    assert math.isfinite(float(doc["requests"][spec.request_id]["uis"]["value"]))
