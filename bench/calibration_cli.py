"""The command line the acceptance check's calibration harnesses share (``bench.heldout_bound``,
``bench.forget_bound``): which workload, with which bench-only options, over which seeds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.quality import workload_protocol


def calibration_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A harness's parser: the workload arguments and ``--json``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_workload_arguments(parser)
    parser.add_argument("--json", type=Path)
    return parser


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="digits-clients")
    parser.add_argument(
        "--preset",
        help="the preset's bench-only workload options (quick: scenes' smaller pool, as lethe bench uses)",
    )
    parser.add_argument("--workload-option", action="append", default=[], metavar="KEY=JSON",
                        help="a workload option over the preset's, e.g. samples_per_client=1500")  # fmt: skip
    parser.add_argument("--seeds", default="0,1,2,3")


def workload_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The preset's bench-only options of the workload, with each ``--workload-option`` over them."""
    protocol = workload_protocol(args.workload, args.preset) if args.preset else None
    options = dict(protocol.workload_options) if protocol is not None else {}
    for item in args.workload_option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--workload-option {item!r}: expected KEY=JSON")
        options[key] = json.loads(value)
    return options


def seeds(args: argparse.Namespace) -> list[int]:
    return [int(s) for s in args.seeds.split(",")]


def write_json(path: Path | None, out: dict[str, Any]) -> None:
    """The harness's results as JSON at ``path`` (``None``: not written)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
