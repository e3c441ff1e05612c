"""Helpers on a peft-wrapped model of the core: LoRA factor pairs, trainable heads, parameter groups.

Model convention (``worker/unlearning/model.py``): LoRA on the base's linear layers (peft stores
``lora_A.<adapter>.weight`` with shape ``r × in`` and ``lora_B.<adapter>.weight`` with shape
``out × r``: the rank space is A's first and B's second dimension), heads in ``model.heads`` saved
through ``modules_to_save`` (after wrapping, ``heads[name]`` is a ``ModulesToSaveWrapper`` whose
trainable copy is ``modules_to_save[active_adapter]``).

Parameters are always addressed by their names in ``model.named_parameters()``, the names
``torch.func.functional_call`` expects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear layer: the names of its A (``r × in``) and B (``out × r``) factors."""

    layer: str
    a: str
    b: str
    rank: int


@dataclass(frozen=True)
class ParamGroups:
    """The trainable parameters of a peft model of the core, by role (names of ``named_parameters``)."""

    lora: list[LoraPair]
    heads: dict[str, list[str]]  # head name (task or SUBSET_HEAD) -> trainable parameter names
    other: list[str] = field(default_factory=list)  # trainable, neither LoRA nor a known head

    @property
    def lora_a(self) -> list[str]:
        return [p.a for p in self.lora]

    @property
    def lora_b(self) -> list[str]:
        return [p.b for p in self.lora]

    def head_params(self, names: Iterable[str]) -> list[str]:
        out: list[str] = []
        for name in names:
            out.extend(self.heads.get(name, []))
        return out

    def all(self) -> list[str]:
        return [*self.lora_a, *self.lora_b, *self.head_params(self.heads), *self.other]

    @property
    def rank(self) -> int:
        ranks = {p.rank for p in self.lora}
        if len(ranks) != 1:
            raise ValueError(f"LoRA layers with different ranks: {sorted(ranks)}")
        return ranks.pop()


def active_adapter(model: nn.Module) -> str:
    """The name of ``model``'s active peft adapter (``"default"`` when it cannot be told)."""
    name = getattr(model, "active_adapter", "default")
    if isinstance(name, (list, tuple)):
        name = name[0]
    return str(name)


def lora_pairs(model: nn.Module, adapter: str | None = None) -> list[LoraPair]:
    """The (A, B) factor pairs of the active (or given) adapter, in module order."""
    adapter = adapter if adapter is not None else active_adapter(model)
    suffix_a = f".lora_A.{adapter}.weight"
    pairs: list[LoraPair] = []
    names = dict(model.named_parameters())
    for name, param in names.items():
        if not name.endswith(suffix_a):
            continue
        layer = name[: -len(suffix_a)]
        b_name = f"{layer}.lora_B.{adapter}.weight"
        if b_name not in names:
            raise ValueError(f"LoRA factor {name} has no B factor {b_name}")
        rank = int(param.shape[0])
        if int(names[b_name].shape[1]) != rank:
            raise ValueError(f"LoRA factors of {layer} disagree on the rank")
        pairs.append(LoraPair(layer=layer, a=name, b=b_name, rank=rank))
    return pairs


def trainable_head(model: nn.Module, name: str) -> nn.Linear:
    """The linear layer that computes head ``name`` (the trainable copy under peft)."""
    heads = _heads(model)
    if name not in heads:
        raise KeyError(f"model has no head {name!r}")
    head = heads[name]
    copies = getattr(head, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict):
        adapter = active_adapter(model)
        key = adapter if adapter in copies else next(iter(copies.keys()))
        head = copies[key]
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head {name!r} is a {type(head).__name__}, not nn.Linear")
    return head


def head_names(model: nn.Module) -> list[str]:
    """The names of the model's heads (tasks and the subset-ID head), in module order."""
    return list(_heads(model).keys())


def _heads(model: nn.Module) -> nn.ModuleDict:
    inner: object = model
    for _ in range(6):
        heads = getattr(inner, "heads", None)
        if isinstance(heads, nn.ModuleDict):
            return heads
        nxt = None
        for attr in ("base_model", "model"):
            candidate = getattr(inner, attr, None)
            if isinstance(candidate, nn.Module) and candidate is not inner:
                nxt = candidate
                break
        if nxt is None:
            break
        inner = nxt
    raise TypeError(f"{type(model).__name__} has no `heads` ModuleDict")


def param_groups(model: nn.Module) -> ParamGroups:
    """Trainable parameters of ``model`` by role: LoRA pairs, per-head parameters, the rest."""
    pairs = lora_pairs(model)
    lora_names = {n for p in pairs for n in (p.a, p.b)}
    ids = {id(p): n for n, p in model.named_parameters()}
    heads: dict[str, list[str]] = {}
    for name in head_names(model):
        linear = trainable_head(model, name)
        heads[name] = [ids[id(p)] for p in linear.parameters() if p.requires_grad and id(p) in ids]
    head_set = {n for names in heads.values() for n in names}
    other = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and n not in lora_names and n not in head_set
    ]
    return ParamGroups(lora=pairs, heads=heads, other=other)


def named_params(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` for ``names`` (KeyError for an unknown name)."""
    all_params = dict(model.named_parameters())
    return {n: all_params[n] for n in names}


def detached(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies (the inputs of ``torch.func`` transforms)."""
    return {n: p.detach().clone() for n, p in params.items()}


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every trainable parameter (to restore a checkpoint with :func:`restore`)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` (from :func:`snapshot`) back into ``model``'s parameters, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
