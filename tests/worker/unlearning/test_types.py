"""Task types (worker/unlearning/types.py): a metric is the mean of its per-sample scores over the
labelled samples, so that the acceptance check can measure the noise of a change of it."""

from __future__ import annotations

import pytest
import torch

from worker.unlearning.types import IGNORE, ClassificationTask, RegressionTask, device_of


def test_classification_metric_is_the_mean_of_per_sample_correctness() -> None:
    task = ClassificationTask("c", 3)
    output = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    target = torch.tensor([0, 2, 2, IGNORE])
    scores = task.per_sample_metric(output, target)
    assert scores[:3].tolist() == [1.0, 0.0, 1.0]
    assert task.metric(output, target) == pytest.approx(2 / 3)


@pytest.mark.parametrize("outputs", [1, 2])
def test_regression_metric_is_the_mean_of_per_sample_minus_absolute_error(outputs: int) -> None:
    task = RegressionTask("r", num_outputs=outputs)
    gen = torch.Generator().manual_seed(0)
    output = torch.randn(50, outputs, generator=gen)
    target = torch.randn(50, outputs, generator=gen) if outputs > 1 else torch.randn(50, generator=gen)
    target[7] = float("nan")  # an unlabelled row is left out
    labelled = task.supervised(target)
    scores = task.per_sample_metric(output, target)[labelled]
    assert float(scores.mean()) == pytest.approx(task.metric(output, target), abs=1e-6)
    assert float(scores.std()) / labelled.sum().item() ** 0.5 == pytest.approx(
        task.metric_standard_error(output, target), rel=1e-5
    )


def test_device_of_is_where_the_parameters_live_and_the_cpu_without_any() -> None:
    """What the engine moves a CPU batch to before a forward (a GPU worker's rounds: the GPU tests,
    tests/worker/unlearning/test_cuda_rounds.py, run the moves themselves)."""
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")
    assert device_of(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
