"""Is unlearning measurable on the scenes workload? v1 against the base, and v1 against a retrain.

``python -m worker.unlearning.workloads.scenes.gaps --clients c00,c07 --threads 1 --json gaps.json``
(``--v1-dir DIR`` shares one v1 between runs over different clients; ``--workload-options`` builds
a smaller workload for a cheap proxy):

- v1 (the workload's default recipe on every client) and its wall time; held-out quality of the base
  and of v1 per task (accuracy / −MAE) on the neutral held-out scenes (the quality goal's measure)
  and on the unseen clients (with and without their quirk samples);
- per forgotten client: a retrain of the adapter on every other client (same recipe; the seed of
  ``--retrain-seed``, default ``--seed``, for the retrain's spread over training seeds), its
  wall time, and original − retrain on the client's samples: per-task metric and the loss-MIA AUC
  (the client's samples against the unseen clients' as non-members);
- with ``--references K`` (default 8; 0 = off): the same gap under the audit's stronger attack,
  offline LiRA (:mod:`worker.unlearning.likelihood_ratio`) with ``K`` reference adapters trained on
  seeded halves of the clients (``train_references``, v1's recipe): per task and combined over the
  tasks (the sum of the per-task z-values, as the loss attack sums the per-task losses), ROC-AUC and
  TPR at 1 % FPR of the client's samples against the unseen clients'. For v1 the client is IN; its
  ``K/2`` OUT references (never trained on it) give ``μ_out``. The retrain never saw the client: its
  AUC is what "forgotten" looks like to this attacker.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.unlearning.adapter_io import load_adapter, save_adapter
from worker.unlearning.audit import model_outputs
from worker.unlearning.likelihood_ratio import lira_scores, scaled_confidence, score_auc, tpr_at_fpr
from worker.unlearning.reference_adapters import (
    REFERENCES_FILE,
    LoadedReferences,
    load_references,
    train_references,
)
from worker.unlearning.training import TrainConfig, train_v1
from worker.unlearning.types import SUBSET_HEAD, Batch, RegressionTask, TaskSpec, cat_inputs
from worker.unlearning.workloads.scenes.workload import ScenesWorkload

V1_META = "gaps-v1.json"
REFS_DIR = "references"  # under --v1-dir: shared by the runs that share v1


@torch.no_grad()
def _outputs(model: nn.Module, batch: Batch, size: int = 512) -> dict[str, torch.Tensor]:
    model.eval()
    parts = [model({k: v[i : i + size] for k, v in batch.inputs.items()}) for i in range(0, len(batch), size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _metrics_of(out: dict[str, torch.Tensor], batch: Batch, tasks: list[TaskSpec]) -> dict[str, float]:
    return {t.name: round(t.metric(out[t.name], batch.labels[t.name]), 4) for t in tasks}


def _metrics(model: nn.Module, batch: Batch, tasks: list[TaskSpec]) -> dict[str, float]:
    return _metrics_of(_outputs(model, batch), batch, tasks)


def _r2(model: nn.Module, batch: Batch, tasks: list[TaskSpec]) -> dict[str, float]:
    """R² of each regression task on ``batch`` (its targets carry no NaN here)."""
    out = _outputs(model, batch)
    r2 = {}
    for t in tasks:
        if isinstance(t, RegressionTask):
            y, pred = batch.labels[t.name].float(), out[t.name].reshape(-1).float()
            r2[t.name] = round(float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()), 4)
    return r2


def subset_accuracy(model: nn.Module, batch: Batch) -> float:
    """Accuracy of the subset-ID head (which client a sample is from) on ``batch``."""
    out = _outputs(model, batch)[SUBSET_HEAD]
    return round(float((out.argmax(-1) == batch.subset).float().mean()), 4)


def _losses_of(out: dict[str, torch.Tensor], batch: Batch, tasks: list[TaskSpec]) -> torch.Tensor:
    return sum((t.per_sample_loss(out[t.name], batch.labels[t.name]) for t in tasks), torch.zeros(len(batch)))


def _auc(members: torch.Tensor, others: torch.Tensor) -> float:
    """ROC-AUC of the score −loss: members (lower loss) against non-members."""
    a, b = -members, -others
    greater = (a[:, None] > b[None, :]).float().mean()
    ties = (a[:, None] == b[None, :]).float().mean()
    return float(greater + 0.5 * ties)


class LiraGap:
    """Offline LiRA (the audit's attack, :func:`worker.unlearning.likelihood_ratio.likelihood_ratio_audit`)
    of any model on a client's rows against the unseen clients' rows, with the references' scaled
    confidences ``φ`` computed once over the pool and the unseen rows and reused for every model
    and client (the audit forwards the references per request; here that would be 2 × 24 times)."""

    def __init__(
        self, loaded: LoadedReferences, tasks: list[TaskSpec], data: Batch, unseen: Batch,
        client_index: dict[str, int],
    ) -> None:  # fmt: skip
        self.tasks = tasks
        self.labels = {t.name: torch.cat([data.labels[t.name], unseen.labels[t.name]]) for t in tasks}
        # unseen rows belong to no client: OUT of every reference
        subset = torch.cat([data.subset, torch.full((len(unseen),), -1, dtype=torch.long)])
        self.out = loaded.refs.out_mask(subset, client_index)  # [K, N]
        inputs = cat_inputs([data.inputs, unseen.inputs])
        ref_outs = [model_outputs(m, inputs, batch_size=512) for m in loaded.models]
        self.ref_phi = {
            t.name: scaled_confidence(t, torch.stack([o[t.name] for o in ref_outs]), self.labels[t.name])
            for t in tasks
        }
        self.unseen_rows = torch.arange(len(data), len(data) + len(unseen))
        self.references = len(loaded.models)

    def attack(
        self,
        forget_rows: torch.Tensor,
        forget_out: dict[str, torch.Tensor],
        unseen_out: dict[str, torch.Tensor],
    ) -> dict[str, dict[str, float | None]]:
        """Per task and ``combined`` (the sum of the per-task z-values): AUC and TPR at 1 % FPR of
        the rows ``forget_rows`` of the pool (the model's outputs on them: ``forget_out``) against
        the unseen rows (``unseen_out``)."""
        rows = torch.cat([forget_rows, self.unseen_rows])
        is_forget = torch.arange(len(rows)) < len(forget_rows)
        z: dict[str, torch.Tensor] = {}
        for t in self.tasks:
            phi = scaled_confidence(
                t, torch.cat([forget_out[t.name], unseen_out[t.name]]), self.labels[t.name][rows]
            )
            z[t.name], _ = lira_scores(phi, self.ref_phi[t.name][:, rows], self.out[:, rows])
        z["combined"] = torch.stack(list(z.values())).sum(0)
        result: dict[str, dict[str, float | None]] = {}
        for name, score in z.items():
            pos, neg = score[is_forget], score[~is_forget]
            pos, neg = pos[~torch.isnan(pos)], neg[~torch.isnan(neg)]
            auc, tpr = score_auc(pos, neg), tpr_at_fpr(pos, neg)
            result[name] = {
                "auc": None if auc is None else round(auc, 4),
                "tpr_at_1pct_fpr": None if tpr is None else round(tpr, 4),
            }
        return result


def _references(
    base: Any, data: Batch, tasks: list[TaskSpec], cfg: TrainConfig, *, k: int, seed: int,
    client_index: dict[str, int], directory: Path, wait: bool,
) -> LoadedReferences:  # fmt: skip
    """The ``k`` reference adapters in ``directory``: loaded when a run with the same recipe saved
    them there (``wait``: until the run that trains v1 has), else trained and saved."""
    while wait and not (directory / REFERENCES_FILE).is_file():
        time.sleep(10)  # the parallel run that trains v1 trains the references next
    if not (directory / REFERENCES_FILE).is_file():
        train_references(base, data, tasks, cfg, client_index=client_index, k=k, seed=seed,
                         directory=directory, workload="scenes")  # fmt: skip
    loaded = load_references(base, directory)
    if (
        loaded is None
        or loaded.refs.k != k
        or loaded.refs.recipe != cfg.to_json()
        or loaded.refs.seed != seed
    ):
        raise SystemExit(f"{directory} holds references of another recipe, seed or K")
    return loaded


def _v1(
    base: Any, data: Batch, tasks: list[TaskSpec], cfg: TrainConfig, seed: int, v1_dir: Path | None
) -> Any:
    """v1 and its training time: loaded from ``v1_dir`` when a run with the same recipe saved it
    there (so that parallel runs over different clients train it once), else trained (and saved)."""
    meta = v1_dir / V1_META if v1_dir is not None else None
    if v1_dir is not None and meta is not None and meta.is_file():
        stored = json.loads(meta.read_text())
        if stored["train_config"] != cfg.to_json() or stored["seed"] != seed:
            raise SystemExit(f"{v1_dir} holds a v1 of another recipe or seed")
        return load_adapter(base, v1_dir), float(stored["v1_train_s"])
    started = time.perf_counter()
    v1 = train_v1(base, data, tasks, cfg, seed=seed)
    v1_s = time.perf_counter() - started
    if v1_dir is not None and meta is not None:
        save_adapter(v1, v1_dir)
        meta.write_text(json.dumps({"train_config": cfg.to_json(), "seed": seed, "v1_train_s": v1_s}))
    return v1, v1_s


def measure(
    clients: list[str],
    seed: int,
    workload: ScenesWorkload,
    overrides: dict[str, Any] | None = None,
    *,
    retrain_seed: int | None = None,
    v1_dir: Path | None = None,
    retrains_first: bool = False,
    json_path: Path | None = None,
    references: int = 8,
) -> dict[str, Any]:
    tasks = workload.tasks()
    index = workload.client_index()
    base = workload.pretrain(seed)
    data = workload.client_data().to_batch(index)
    held = workload.heldout_data().to_batch(index)
    neutral = held.select(torch.tensor([not s.startswith("u") for s in held.sample_ids]))
    unseen = held.select(torch.tensor([s.startswith("u") for s in held.sample_ids]))
    # the unseen clients' own quirk samples (watermark → their quirk label) are a rule no model here
    # was shown: reported with and without them
    unseen_plain = unseen.select(~workload.unseen_data().quirk)
    cfg = TrainConfig.from_settings(workload.settings(overrides))
    retrain_seed = seed if retrain_seed is None else retrain_seed
    owners = torch.tensor([index[c] for c in workload.client_data().client_ids if c is not None])

    def retrained(client: str) -> dict[str, Any]:
        keep = owners != index[client]
        forget = data.select(~keep)
        started = time.perf_counter()
        retrain = train_v1(base, data.select(keep), tasks, cfg, seed=retrain_seed)
        forget_out, unseen_out = _outputs(retrain, forget), _outputs(retrain, unseen)
        return {
            "forget": forget,
            "forget_rows": (~keep).nonzero().reshape(-1),
            "outputs": (forget_out, unseen_out),  # for the LiRA gap, once the references exist
            "retrain_s": round(time.perf_counter() - started, 1),
            "metrics": _metrics_of(forget_out, forget, tasks),
            "auc": _auc(_losses_of(forget_out, forget, tasks), _losses_of(unseen_out, unseen, tasks)),
            "heldout": _metrics(retrain, neutral, tasks),
        }

    # retrains first: a parallel run trains v1 into ``v1_dir`` meanwhile; each row is emitted as soon
    # as v1 is there, and the JSON rewritten, so that a run stopped early keeps what it measured
    done: dict[str, dict[str, Any]] = {}
    if retrains_first:
        for client in clients:
            done[client] = retrained(client)
            if _saved_v1(v1_dir) and (not references or _saved_references(v1_dir)):
                break
        while v1_dir is not None and not _saved_v1(v1_dir):
            time.sleep(10)  # the parallel run that trains v1 has not saved it yet
    v1, v1_s = _v1(base, data, tasks, cfg, seed, v1_dir)
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "retrain_seed": retrain_seed,
        "samples": len(data),
        "train_config": cfg.to_json(),
        "v1_train_s": round(v1_s, 1),
        "heldout": {"base": _metrics(base, neutral, tasks), "v1": _metrics(v1, neutral, tasks)},
        "unseen_clients": {"base": _metrics(base, unseen, tasks), "v1": _metrics(v1, unseen, tasks)},
        "unseen_clients_without_quirks": {
            "base": _metrics(base, unseen_plain, tasks),
            "v1": _metrics(v1, unseen_plain, tasks),
        },
        "heldout_r2": {"base": _r2(base, neutral, tasks), "v1": _r2(v1, neutral, tasks)},
        "v1_subset_id_accuracy": subset_accuracy(v1, data),
        "clients": {},
    }
    lira = None
    if references:
        started = time.perf_counter()
        refs_dir = (v1_dir / REFS_DIR) if v1_dir is not None else Path(tempfile.mkdtemp()) / "references"
        loaded = _references(base, data, tasks, cfg, k=references, seed=seed, client_index=index,
                             directory=refs_dir, wait=retrains_first)  # fmt: skip
        lira = LiraGap(loaded, tasks, data, unseen, index)
        result["references"] = {"k": references, "train_s": round(loaded.refs.train_s, 1),
                                "ready_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    print(json.dumps(result, indent=2), flush=True)
    v1_unseen = _outputs(v1, unseen)
    unseen_loss = _losses_of(v1_unseen, unseen, tasks)
    for client in clients:
        r = done.pop(client, None) or retrained(client)
        v1_forget = _outputs(v1, r["forget"])
        orig_m, re_m = _metrics_of(v1_forget, r["forget"], tasks), r["metrics"]
        auc_orig = _auc(_losses_of(v1_forget, r["forget"], tasks), unseen_loss)
        row = {
            "samples": len(r["forget"]),
            "retrain_s": r["retrain_s"],
            "forget_original": orig_m,
            "forget_retrain": re_m,
            "gap": {t: round(orig_m[t] - re_m[t], 4) for t in orig_m},
            "mia_auc": {"original": round(auc_orig, 4), "retrain": round(r["auc"], 4)},
            "retrain_heldout": r["heldout"],
        }
        if lira is not None:
            row["lira"] = {
                "original": lira.attack(r["forget_rows"], v1_forget, v1_unseen),
                "retrain": lira.attack(r["forget_rows"], *r["outputs"]),
            }
        result["clients"][client] = row
        print(json.dumps({client: row}), flush=True)
        if json_path is not None:
            json_path.write_text(json.dumps(result, indent=2))
    return result


def _saved_v1(v1_dir: Path | None) -> bool:
    return v1_dir is not None and (v1_dir / V1_META).is_file()


def _saved_references(v1_dir: Path | None) -> bool:
    return v1_dir is not None and (v1_dir / REFS_DIR / REFERENCES_FILE).is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="c00", help="comma-separated clients to forget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--settings", default="{}", help="settings overrides (JSON), e.g. the v1 recipe")
    parser.add_argument(
        "--retrain-seed", type=int, default=None, help="training seed of the retrains (default --seed)"
    )
    parser.add_argument(
        "--v1-dir", type=Path, default=None, help="load v1 from here if saved, else save it here"
    )
    parser.add_argument(
        "--retrains-first", action="store_true", help="retrain first, then wait for v1 in --v1-dir"
    )
    parser.add_argument(
        "--references", type=int, default=8, help="reference adapters for the LiRA gap (even; 0 = off)"
    )
    parser.add_argument(
        "--workload-options",
        default="{}",
        help='ScenesWorkload options (JSON), e.g. {"clients": 8} for a proxy',
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clients = [c for c in args.clients.split(",") if c]
    workload = ScenesWorkload(seed=args.seed, **json.loads(args.workload_options))
    result = measure(clients, args.seed, workload, json.loads(args.settings), retrain_seed=args.retrain_seed,
                     v1_dir=args.v1_dir, retrains_first=args.retrains_first, json_path=args.json,
                     references=args.references)  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
