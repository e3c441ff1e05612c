"""The scenes workload's protocol for ``lethe bench --preset quick`` (docs/benchmarks.md, "Scenes:
quick preset").

The digits-sized quick preset (4 settings × 3 stages × 5 seeds, two adapter retrains per stage at
≈ 60 s CPU each on the full 24-client pool, v1 ≈ 100 s CPU) takes hours on 2 CPU cores. This
protocol keeps what makes the benchmark fair — 5 evaluation seeds, 3 sequential stages, FU and a
partial-task setting, the same anchor fraction for every method, the reference retrain and the
second retrain (the noise floor) at every stage — and shrinks the work instead:

- a smaller pool for the benchmark: the first ``CLIENTS`` clients with ``SAMPLES_PER_CLIENT`` samples
  each (the full pool has 1,500 since 2 Dec 2026; the bench keeps the 400 its committed results were
  measured on), a smaller held-out split and fewer unseen clients, so every retrain and every
  evaluation touches a fraction of the rows. The workload's
  part-4 figures (gaps, Val spread, retrain time) are measured at full size with
  ``python -m bench measure-workload --workload scenes`` / ``scenes.gaps``, not here;
- settings ``FU`` and ``PU:shape`` (the classification task; the regression tasks are not run);
- the core methods; no tuned value: every method runs with the workload's own settings, and the
  JSON names them untuned (the committed tuned values were chosen on digits-clients).
"""

from __future__ import annotations

from worker.unlearning.workload import BenchProtocol

CLIENTS = 8
SAMPLES_PER_CLIENT = 400
HELDOUT = 500
UNSEEN_CLIENTS = 4

QUICK = BenchProtocol(
    seeds=(0, 1, 2, 3, 4),
    stages=3,
    settings=("FU", "PU:shape"),
    methods=("original", "retrain", "ssd", "ia", "default"),
    workload_options={
        "clients": CLIENTS,
        "samples_per_client": SAMPLES_PER_CLIENT,
        "heldout": HELDOUT,
        "unseen_clients": UNSEEN_CLIENTS,
    },
    tuned={},
    note=(
        f"a bench-only pool of the first {CLIENTS} of the 24 clients ({SAMPLES_PER_CLIENT} samples each), "
        f"{HELDOUT} held-out scenes and "
        f"{UNSEEN_CLIENTS} unseen clients (the part-4 figures are measured at full size by "
        "measure-workload); FU and PU:shape; every method untuned (the workload's settings)"
    ),
)
