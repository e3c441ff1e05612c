"""``bench.evidence``: what a bench row keeps of a round's evidence."""

from __future__ import annotations

from bench.evidence import ia_steps


def test_the_update_row_keeps_the_checkpoints_and_each_return_to_the_kept_one() -> None:
    info = {
        "ia": {
            "steps": 9, "epochs_run": 3, "stopped": "patience", "best_epoch": 1, "best_steps": 3,
            "best_distance": 0.05, "held_steps": None,
            "history": [
                {"steps": s, "distance": d, "mia_auc": {"a": a}, "forget_accuracy": {"a": 1 - a}}
                for s, d, a in ((0, 0.1, 0.6), (3, 0.05, 0.5), (6, 0.15, 0.4))
            ],
            "refinements": [{"steps": 6, "from_steps": 3, "lr": 5e-4}],
        }
    }  # fmt: skip
    row = ia_steps(info)
    assert row is not None
    assert row["refinements"] == [{"steps": 6, "from_steps": 3, "lr": 5e-4}]
    assert [c["steps"] for c in row["checkpoints"]] == [0, 3, 6]
    # each checkpoint's per-task measurements, so a stop rule can be replayed on the rows
    assert [c["mia_auc"]["a"] for c in row["checkpoints"]] == [0.6, 0.5, 0.4]
    assert [c["forget_accuracy"]["a"] for c in row["checkpoints"]] == [0.4, 0.5, 0.6]
    assert all("inside_spread" not in c for c in row["checkpoints"])  # only where the stop is on
    assert (row["stopped"], row["best_steps"], row["best_distance"]) == ("patience", 3, 0.05)
    # evidence written before ia.refine_rounds existed has none; a method without the stage, no row
    del info["ia"]["refinements"]
    older = ia_steps(info)
    assert older is not None
    assert older["refinements"] == []
    assert ia_steps({"ssd": {"selected": 3}}) is None
    assert ia_steps(None) is None
