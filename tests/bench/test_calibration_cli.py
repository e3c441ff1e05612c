"""``bench.calibration_cli``: the calibration harnesses' workload, options and seeds."""

from __future__ import annotations

import argparse

import pytest

from bench import calibration_cli


def parse(*argv: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    calibration_cli.add_workload_arguments(parser)
    return parser, parser.parse_args(list(argv))


def test_a_workload_option_goes_over_the_preset_s() -> None:
    from worker.unlearning.workloads.scenes.bench_protocol import QUICK

    argv = ["--workload", "scenes", "--preset", "quick", "--workload-option", "samples_per_client=1500"]
    parser, args = parse(*argv)
    options = calibration_cli.workload_options(parser, args)
    assert options == {**QUICK.workload_options, "samples_per_client": 1500}
    parser, args = parse()
    assert calibration_cli.workload_options(parser, args) == {}
    assert calibration_cli.seeds(args) == [0, 1, 2, 3]
    assert calibration_cli.seeds(parse("--seeds", "5,7")[1]) == [5, 7]


def test_a_workload_option_without_a_value_is_refused() -> None:
    parser, args = parse("--workload-option", "samples_per_client")
    with pytest.raises(SystemExit):
        calibration_cli.workload_options(parser, args)
