"""How long one adapter retrain takes on the scenes pool (issue 7 part 4: "≥ 30 s on these 2 cores").

``python -m worker.unlearning.workloads.scenes.retrain_time --threads 1`` (and ``--threads 2``;
``--samples-per-client N`` for another pool size): ``train_v1`` with the workload's recipe on the
pool minus one client (``--client``, default ``c03``), as a retrain after a per-client request is;
prints one JSON line with the rows, threads, wall and CPU seconds. Time it on quiet cores:
docs/workloads.md, "Offline LiRA gaps and the pool size".
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.workloads.scenes.workload import ScenesWorkload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples-per-client", type=int, default=None, help="default: the workload's")
    parser.add_argument("--client", default="c03", help="the client the retrain leaves out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {} if args.samples_per_client is None else {"samples_per_client": args.samples_per_client}
    wl = ScenesWorkload(seed=args.seed, **options)
    index = wl.client_index()
    data = wl.client_data().to_batch(index)
    keep = data.subset != index[args.client]
    base, cfg = wl.pretrain(args.seed), TrainConfig.from_settings(wl.settings({}))
    wall, cpu = time.perf_counter(), time.process_time()
    train_v1(base, data.select(keep), wl.tasks(), cfg, seed=args.seed)
    row = {
        "samples_per_client": wl.options()["samples_per_client"],
        "rows": int(keep.sum()),
        "threads": args.threads,
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
