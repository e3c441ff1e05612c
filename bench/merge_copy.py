"""What building SSD's full data D costs: the three calls it took (concatenate, merge by sample id,
sort by sample id, each copying every input row) against ``audit.merge_rows_in_id_order`` (one
copy). docs/benchmarks.md, "Reference outputs on clients' samples computed ahead".

``python -m bench.merge_copy --retain 34500 --forget 1500 --repeat 7`` (scenes' shape: 3×32×32
images, one classification label, ids in random order). Both ways must give the same rows in the
same order (checked first); then each runs ``--repeat`` times, one torch thread, and the medians
and their ratio are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from worker.unlearning.audit import merge_rows, merge_rows_in_id_order
from worker.unlearning.ssd import canonical_order
from worker.unlearning.types import Batch, concat_batches


def synthetic_parts(
    retain: int, forget: int, *, image: tuple[int, ...] = (3, 32, 32), seed: int = 0
) -> list[Batch]:
    """A retain set and a forget set with distinct sample ids, shuffled across both."""
    gen = torch.Generator().manual_seed(seed)
    ids = [f"s{i:07d}" for i in torch.randperm(retain + forget, generator=gen).tolist()]

    def part(rows: int, part_ids: list[str]) -> Batch:
        return Batch(
            inputs={"pixel_values": torch.randn(rows, *image, generator=gen)},
            labels={"shape": torch.randint(0, 3, (rows,), generator=gen)},
            subset=torch.randint(0, 24, (rows,), generator=gen),
            sample_ids=part_ids,
        )

    return [part(retain, ids[:retain]), part(forget, ids[retain:])]


def _seconds(build: Callable[[], Batch], repeat: int) -> list[float]:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        build()
        runs.append(time.perf_counter() - started)
    return runs


def measure(parts: Sequence[Batch], repeat: int) -> dict[str, Any]:
    ways: dict[str, Callable[[], Batch]] = {
        "three_calls": lambda: canonical_order(merge_rows(concat_batches(parts))),
        "one_copy": lambda: merge_rows_in_id_order(parts),
    }
    a, b = (build() for build in ways.values())
    if a.sample_ids != b.sample_ids or not all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs):
        raise AssertionError("the two ways built different data")
    out: dict[str, Any] = {"rows": sum(len(p) for p in parts), "repeat": repeat}
    for name, build in ways.items():
        runs = _seconds(build, repeat)
        out[name] = {"median_s": statistics.median(runs), "runs_s": runs}
    out["ratio"] = out["one_copy"]["median_s"] / out["three_calls"]["median_s"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_copy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--retain", type=int, default=34_500)
    parser.add_argument("--forget", type=int, default=1_500)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    if args.retain < 1 or args.forget < 0 or args.repeat < 1:
        parser.error("--retain and --repeat must be >= 1, --forget >= 0")
    torch.set_num_threads(1)
    result = measure(synthetic_parts(args.retain, args.forget), args.repeat)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
