"""One CLI for every benchmark: ``python -m bench <command> …`` and ``lethe bench <command> …``.

Commands (each has ``--help``):

* ``quality`` (the default when the first argument is a flag): methods × settings × stages × seeds
  (:mod:`bench.quality`); writes the JSON and, beside it, the PNG plots (:mod:`bench.plots`).
* ``measure-workload``: what makes a workload worth auditing (original − retrain gaps, Val spread).
* ``latency``: POST of a forget request → new version served, over HTTP (:mod:`bench.latency`).
* ``reliability``: how often the demo's checks pass over anchor draws (:mod:`bench.reliability`).
* ``coalescing``: N queued requests of one model → rounds and wall time (:mod:`bench.coalescing`).
* ``plot``: re-render the PNG plots of a saved quality result.
* ``compare``, ``noise``, ``targets``, ``budget``: read saved quality results (JSON alone): one
  result against another (:mod:`bench.compare`), the noise floor (:mod:`bench.noise`), the targets'
  error (:mod:`bench.target_error`), the target and landing errors (:mod:`bench.error_budget`).

Each command's module is imported only when it runs (torch, httpx, matplotlib are theirs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

#: the command a bare ``lethe bench --preset quick`` runs (the flags ``lethe bench`` always had)
DEFAULT_COMMAND = "quality"
DEFAULT_WORKLOAD = "digits-clients"
WORKLOAD_OPTION_HELP = (
    "passed to the workload's constructor (repeatable; VALUE parsed as JSON, else a string)"
)


def _add_workload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload", default=DEFAULT_WORKLOAD, help="a registered lethe.workloads entry point"
    )
    parser.add_argument(
        "--workload-option", action="append", default=[], metavar="KEY=VALUE", help=WORKLOAD_OPTION_HELP
    )


def _workload_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed ``--workload-option`` pairs of a known ``--workload`` (a usage error otherwise)."""
    from service.workload_options import parse_pairs
    from worker.unlearning.workload import available_workloads

    if args.workload not in available_workloads():
        parser.error(f"unknown workload {args.workload!r}; available: {', '.join(available_workloads())}")
    try:
        return parse_pairs(args.workload_option)
    except ValueError as exc:
        parser.error(str(exc))


def _seeds(parser: argparse.ArgumentParser, text: str | None) -> int | list[int] | None:
    """``N`` (seeds 0 … N−1) or a comma-separated list (``3,4``)."""
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s] if "," in text else int(text)
    except ValueError:
        parser.error(f"--seeds takes a number N or a list like 3,4, not {text!r}")


def _variant(text: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    """``LABEL=METHOD:JSON`` → (label, (method, overrides)); ValueError naming what is wrong."""
    label, sep, rest = text.partition("=")
    method, sep2, raw = rest.partition(":")
    if not (sep and sep2 and label and method):
        raise ValueError(f"{text!r} is not LABEL=METHOD:JSON")
    overrides = json.loads(raw)
    if not isinstance(overrides, dict):
        raise ValueError(f"{text!r}: the settings overrides must be a JSON object")
    return label, (method, overrides)


def quality_main(argv: Sequence[str], prog: str) -> int:
    from bench import quality
    from worker.unlearning.workload import WorkloadOptionsError

    parser = argparse.ArgumentParser(prog=prog, description=quality.__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--preset", default="quick", choices=sorted(quality.PRESETS))
    parser.add_argument("--json", dest="json_path", type=Path, default=None)
    parser.add_argument(
        "--seeds", default=None, help="a number N (seeds 0…N−1, as `lethe bench --seeds N`) or a list: 3,4"
    )
    parser.add_argument(
        "--settings", default=None, help='workload setting overrides (JSON), e.g. \'{"ia": {"eta2": 0.5}}\''
    )
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: the preset's)")
    parser.add_argument(
        "--tune", action="store_true", help="choose each method's main knob on the tuning seeds first"
    )
    parser.add_argument(
        "--tuning-seeds", default=None, help="comma-separated tuning seeds (default: the preset's)"
    )
    parser.add_argument("--no-plots", action="store_true", help="do not write the PNG plots beside the JSON")
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="seeds run in this many processes at once, one torch thread each (default 0: one per CPU core)",
    )
    parser.add_argument(
        "--references",
        type=int,
        default=None,
        help="K reference adapters per seed (even; 0: none), refreshed between stages; read by "
        'methods with ia.target "references" (default: the workload\'s audit.reference_adapters, '
        "as a registered model gets them)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=METHOD:JSON",
        help="an extra row: METHOD with these settings overrides, e.g. "
        """'default@refs=default:{"default": {"ia": {"target": "references"}}}' (repeatable)""",
    )
    parser.add_argument(
        "--served",
        default="",
        metavar="METHODS",
        help="comma-separated methods whose rows get a twin LABEL+served, scored on what a round "
        "publishes: the acceptance check, its continuation, or the exact path (the second retrain)",
    )
    parser.add_argument(
        "--request-settings",
        default=None,
        metavar="FU,PU:TASK",
        help="comma-separated settings to run (FU: per-client requests; PU:<task>: per-task), "
        "default: the preset's",
    )
    parser.add_argument(
        "--no-second-retrain",
        action="store_true",
        help="skip the second retrain (retrain_2, the noise floor) where an earlier run of the same "
        "seeds measured it: comparing variants costs less; not with --served",
    )
    parser.add_argument(
        "--training-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="store v1, the references, their refreshes and the retrains in DIR and read them back "
        "where an earlier run on this machine trained the same ones (bench/training_cache.py)",
    )
    # the flags of the former ``python -m worker.unlearning.bench``
    parser.add_argument("--measure-workload", action="store_true", help="as `measure-workload`")
    parser.add_argument(
        "--latency", action="store_true", help="time prepare and three rounds in process (no API) instead"
    )
    _add_workload(parser)
    args = parser.parse_args(argv)
    options = _workload_options(parser, args)
    seeds = _seeds(parser, args.seeds)
    listed = list(range(seeds)) if isinstance(seeds, int) else seeds
    missing = quality.plotting_missing()
    if args.json_path is not None and not args.no_plots and missing is not None:
        parser.error(missing)
    try:
        settings = json.loads(args.settings) if args.settings else None
        tuning = [int(s) for s in args.tuning_seeds.split(",") if s] if args.tuning_seeds else None
        variants = dict(_variant(v) for v in args.variant)
    except ValueError as exc:
        parser.error(f"--settings / --tuning-seeds / --variant: {exc}")
    if args.references is not None and (args.references < 0 or args.references % 2):
        parser.error(f"--references must be an even number >= 0, got {args.references}")
    if args.jobs < 0:
        parser.error(f"--jobs must be >= 0 (0: one per CPU core), got {args.jobs}")
    jobs = args.jobs or os.cpu_count() or 1
    try:
        if args.latency:  # one seed: the first given, else 0
            from bench.workload_figures import measure_latency

            timed = measure_latency(args.workload, seed=(listed or [0])[0], workload_options=options)
            print(json.dumps(timed, indent=2))
            return 0
        if args.measure_workload:
            return _measure(args.workload, options, listed, args.json_path)
        methods = [m for m in args.methods.split(",") if m] if args.methods else None
        quality.run_bench(
            args.preset,
            args.json_path,
            seeds,
            workload=args.workload,
            workload_options=options,
            methods=methods,
            settings_overrides=settings,
            tune_grid=args.tune,
            tuning_seeds=tuning,
            plots=not args.no_plots,
            references=args.references,
            extra_variants=variants,
            jobs=jobs,
            served=[m for m in args.served.split(",") if m],
            request_settings=[s for s in args.request_settings.split(",") if s]
            if args.request_settings
            else None,
            second_retrain=not args.no_second_retrain,
            training_cache=args.training_cache,
        )
    except WorkloadOptionsError as exc:
        parser.error(str(exc))
    return 0


def _measure(workload: str, options: dict[str, Any], seeds: list[int] | None, json_path: Path | None) -> int:
    from bench.workload_figures import measure_workload

    result = measure_workload(workload, seeds=seeds or (0, 1, 2), workload_options=options)
    print(json.dumps(result["summary"], indent=2))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def measure_workload_main(argv: Sequence[str], prog: str) -> int:
    from worker.unlearning.workload import WorkloadOptionsError

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Per client: the original − retrain gap on its forget set (accuracy, loss-MIA AUC); "
        "the retrain's Val spread over seeds (docs/workloads.md). The data follows the seeds.",
    )
    parser.add_argument("--seeds", default=None, help="a number N (seeds 0…N−1) or a list: 0,1,2 (default)")
    parser.add_argument("--json", dest="json_path", type=Path, default=None)
    _add_workload(parser)
    args = parser.parse_args(argv)
    options = _workload_options(parser, args)
    seeds = _seeds(parser, args.seeds)
    try:
        listed = list(range(seeds)) if isinstance(seeds, int) else seeds
        return _measure(args.workload, options, listed, args.json_path)
    except WorkloadOptionsError as exc:
        parser.error(str(exc))


def _latency(argv: Sequence[str], prog: str) -> int:
    from bench import latency

    return latency.main(argv, prog=prog)


def _reliability(argv: Sequence[str], prog: str) -> int:
    from bench import reliability

    return reliability.main(argv, prog=prog)


def _coalescing(argv: Sequence[str], prog: str) -> int:
    from bench import coalescing

    return coalescing.main(argv, prog=prog)


def _compare(argv: Sequence[str], prog: str) -> int:
    from bench import compare

    return compare.main(argv, prog=prog)


def _noise(argv: Sequence[str], prog: str) -> int:
    from bench import noise

    return noise.main(argv, prog=prog)


def _targets(argv: Sequence[str], prog: str) -> int:
    from bench import target_error

    return target_error.main(argv, prog=prog)


def _budget(argv: Sequence[str], prog: str) -> int:
    from bench import error_budget

    return error_budget.main(argv, prog=prog)


def _plot(argv: Sequence[str], prog: str) -> int:
    from bench import plots

    return plots.main(argv, prog=prog)


COMMANDS: dict[str, Callable[[Sequence[str], str], int]] = {
    "quality": quality_main,
    "measure-workload": measure_workload_main,
    "latency": _latency,
    "reliability": _reliability,
    "coalescing": _coalescing,
    "plot": _plot,
    "compare": _compare,
    "noise": _noise,
    "targets": _targets,
    "budget": _budget,
}


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench") -> int:
    """Run one command: ``argv`` is ``[COMMAND, *its arguments]``; a leading flag means ``quality``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(f"usage: {prog} [{'|'.join(COMMANDS)}] [--help] …\n\n{__doc__}")
        return 0
    if not args or args[0].startswith("-"):
        args = [DEFAULT_COMMAND, *args]
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"{prog}: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[name](rest, f"{prog} {name}")


@click.command(
    "bench",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(args: tuple[str, ...]) -> None:
    """Benchmarks: quality (default), measure-workload, latency, reliability, coalescing, plot, compare,
    noise, targets, budget.

    The same as ``python -m bench``; ``lethe bench --help`` lists the commands, ``lethe bench
    COMMAND --help`` their flags."""
    code = main(list(args), prog="lethe bench")  # argparse's usage errors exit 2 themselves
    if code:
        sys.exit(code)
