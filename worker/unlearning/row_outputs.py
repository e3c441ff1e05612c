"""A fixed model's outputs by row, each row forwarded once: the reference adapters of a round.

A round asks the same reference adapters about the same rows several times: the per-client
early-stopping target (:func:`worker.unlearning.likelihood_ratio.out_reference_targets`) forwards
the OUT references on the forget set and held-out rows, the acceptance check's allowance does it
again when a forget bound fails, and the likelihood-ratio audit forwards every reference on the
Unl split and the whole held-out split. The references do not change during a round, so a row's
outputs are computed the first time they are asked for and read back after that (scenes: one
forward of 1,500 + 1,800 rows per reference is about 0.75 s).

A row is known by its role (``"forget"``: a sample of the model's clients; ``"unseen"``: a
held-out row, which belongs to no client), its sample id, and a fingerprint of its inputs, so
that a row asked for under the same id with other inputs is forwarded, never answered from
another row's outputs. A first call without repeated rows is forwarded exactly as an uncached
:func:`~worker.unlearning.audit.model_outputs` call would be (same rows, same order, same
chunks), so the early-stopping target, the first to ask, is bit for bit what it was without the
cache; later calls forward only the rows not seen yet, in other chunks, which may round the last
bits of a row differently than a forward of every row would (never across runs: the order of the
calls is fixed).

Rows may also be known ahead, without a forward: the references' outputs on the held-out split and
on each client's samples are written when they are trained (:func:`save_outputs`, off the request
path) and seeded into the cache (:meth:`RowOutputs.seed`, :meth:`RowOutputs.seed_rows`); such a row
is read back only when the inputs asked about give the fingerprint stored with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from worker.unlearning.audit import model_outputs
from worker.unlearning.types import Batch, cat_inputs, device_of, inputs_to

#: (role, sample id, input fingerprint)
RowKey = tuple[str, str, tuple[float, ...]]


def fingerprints(inputs: Mapping[str, Tensor]) -> list[tuple[float, ...]]:
    """Per row, the sum and a position-weighted sum of each input leaf (float64): equal inputs
    give equal fingerprints; different inputs under one sample id do not pass for each other."""
    columns: list[Tensor] = []
    for key in sorted(inputs):
        flat = inputs[key].detach().reshape(int(inputs[key].shape[0]), -1).to("cpu", torch.float64)
        weights = torch.arange(1, flat.shape[1] + 1, dtype=torch.float64)
        columns += [flat.sum(1), flat @ weights]
    stacked = torch.stack(columns, dim=1)
    return [tuple(row) for row in stacked.tolist()]


class RowOutputs:
    """``model``'s outputs (eval mode, no gradients) by row key; ``model`` must not change while
    this object is used (a round's reference adapters are read only)."""

    def __init__(self, model: nn.Module, *, batch_size: int = 1024) -> None:
        self.model = model
        self.batch_size = batch_size
        self.index: dict[RowKey, int] = {}
        self.outputs: dict[str, Tensor] = {}
        self.forwarded = 0  # rows forwarded so far (for tests and the evidence of savings)

    def of(self, parts: Sequence[tuple[str, Batch]], device: str = "cpu") -> dict[str, Tensor]:
        """The outputs on the rows of ``parts`` (``(role, batch)`` pairs) one after the other."""
        inputs = cat_inputs([b.inputs for _, b in parts])
        keys: list[RowKey] = []
        for role, batch in parts:
            prints = fingerprints(batch.inputs) if len(batch) else []
            keys += [(role, sid, fp) for sid, fp in zip(batch.sample_ids, prints, strict=True)]
        if not keys:  # no rows: the heads' empty outputs, as model_outputs gives them
            return model_outputs(self.model, inputs_to(inputs, device), batch_size=self.batch_size)
        missing: list[int] = []
        seen: set[RowKey] = set()
        for i, key in enumerate(keys):
            if key not in self.index and key not in seen:
                seen.add(key)
                missing.append(i)
        if len(missing) == len(keys) and not self.index:
            # the first call without repeated rows: forwarded exactly as an uncached call
            new = model_outputs(self.model, inputs_to(inputs, device), batch_size=self.batch_size)
            self._add(keys, new)
            return {k: v.to(device) for k, v in self.outputs.items()}
        if missing:
            rows = torch.tensor(missing, dtype=torch.long)
            subset = {k: v[rows] for k, v in inputs.items()}
            new = model_outputs(self.model, inputs_to(subset, device), batch_size=self.batch_size)
            self._add([keys[i] for i in missing], new)
        where = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
        return {k: v[where].to(device) for k, v in self.outputs.items()}

    def seed(self, role: str, batch: Batch, outputs: Mapping[str, Tensor]) -> None:
        """Know ``batch``'s rows (under ``role``) as having ``outputs`` without forwarding them
        (outputs computed ahead: :func:`save_outputs` / :func:`load_outputs`)."""
        self.seed_rows(role, batch.sample_ids, fingerprints(batch.inputs), outputs)

    def seed_rows(
        self,
        role: str,
        sample_ids: Sequence[str],
        prints: Sequence[tuple[float, ...]],
        outputs: Mapping[str, Tensor],
    ) -> None:
        """Know the rows ``sample_ids`` (under ``role``, with input fingerprints ``prints``) as having
        ``outputs``, without their inputs (:func:`read_outputs`): a row asked for later is read
        back only when its inputs give the same fingerprint."""
        keys = [(role, sid, fp) for sid, fp in zip(sample_ids, prints, strict=True)]
        fresh = [i for i, k in enumerate(keys) if k not in self.index]
        if fresh:
            rows = torch.tensor(fresh, dtype=torch.long)
            before = self.forwarded
            self._add([keys[i] for i in fresh], {k: v[rows] for k, v in outputs.items()})
            self.forwarded = before  # known, not forwarded

    def _add(self, keys: Sequence[RowKey], new: Mapping[str, Tensor]) -> None:
        start = len(self.index)
        for offset, key in enumerate(keys):
            self.index[key] = start + offset
        # kept on the CPU (outputs loaded from disk are; a GPU round copies back what it reads)
        if self.outputs:
            self.outputs = {k: torch.cat([self.outputs[k], new[k].detach().cpu()]) for k in self.outputs}
        else:
            self.outputs = {k: v.detach().cpu() for k, v in new.items()}
        self.forwarded += len(keys)


def save_outputs(model: nn.Module, batch: Batch, path: Path, *, batch_size: int = 1024) -> None:
    """``model``'s outputs on ``batch`` into ``path`` (safetensors), with the rows' sample ids and
    input fingerprints: what :func:`load_outputs` checks before they are used."""
    device = device_of(model)
    out = model_outputs(model, inputs_to(batch.inputs, device), batch_size=batch_size)
    tensors = {f"output.{k}": v.detach().cpu().contiguous() for k, v in out.items()}
    tensors["fingerprints"] = torch.tensor(fingerprints(batch.inputs), dtype=torch.float64)
    save_file(tensors, str(path), metadata={"sample_ids": json.dumps(list(batch.sample_ids))})


def read_outputs(path: Path) -> tuple[list[str], list[tuple[float, ...]], dict[str, Tensor]] | None:
    """What :func:`save_outputs` wrote to ``path``: the rows' sample ids, their input fingerprints
    and the outputs; ``None`` when there is no such file."""
    if not Path(path).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        ids = json.loads((f.metadata() or {}).get("sample_ids", "null"))
    tensors = load_file(str(path))
    prints = [tuple(row) for row in tensors.pop("fingerprints").tolist()]
    return list(ids or []), prints, {k.removeprefix("output."): v for k, v in tensors.items()}


def load_outputs(path: Path, batch: Batch) -> dict[str, Tensor] | None:
    """The outputs :func:`save_outputs` wrote to ``path``, if they are ``batch``'s rows (the same
    sample ids in the same order, the same inputs); ``None`` otherwise (no file, other rows)."""
    stored = read_outputs(path)
    if stored is None:
        return None
    ids, prints, outputs = stored
    if ids != list(batch.sample_ids) or prints != fingerprints(batch.inputs):
        return None
    return outputs
