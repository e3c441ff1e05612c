"""Helpers on a peft-wrapped model of the core: LoRA factor pairs, trainable heads, parameter groups.

Model convention (``worker/unlearning/model.py``): LoRA on the backbone's target modules (any
names, found through peft's ``lora_A`` / ``lora_B`` parameters) (peft stores
``lora_A.<adapter>.weight`` with shape ``r × in`` and ``lora_B.<adapter>.weight`` with shape
``out × r``: the rank space is A's first and B's second dimension), heads in ``model.heads`` saved
through ``modules_to_save`` (after wrapping, ``heads[name]`` is a ``ModulesToSaveWrapper`` whose
trainable copy is ``modules_to_save[active_adapter]``).

Parameters are always addressed by their names in ``model.named_parameters()``, the names
``torch.func.functional_call`` expects.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.unlearning.vit_view import LoraViTView, lora_vit_view


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


# ----------------------------------------------------------------------------------------------
# a functional view of an MLP model (the same outputs as ``model(inputs)``, fewer Python layers)
# ----------------------------------------------------------------------------------------------

Forward = Callable[[dict[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class LoraMLPView:
    """``model({"x": x})`` of a peft-wrapped MLP :class:`~worker.unlearning.model.MultiTaskModel`
    (backbone ``forward(x)`` = ``fc0 … fcK`` with ReLU, pooling ``identity``) written out: per
    layer ``h ← relu(h Wᵀ + b + s·(h Aᵀ) Bᵀ)``, then one linear map per head.

    It reads the model's live tensors (a gradient taken through it reaches the same parameters),
    and skips peft's per-layer bookkeeping, which costs about as much as the arithmetic on the
    small networks here (measured ≈ 1.5–2× faster forward and backward). Built by :func:`fast_forward`,
    which checks it against ``model(x)`` first.
    """

    layers: tuple[tuple[Tensor, Tensor | None, Tensor, Tensor, float], ...]  # W, b, A, B, scaling
    heads: tuple[tuple[str, Tensor, Tensor | None], ...]

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        h = inputs["x"]
        for W, b, A, B, s in self.layers:
            h = torch.relu(F.linear(h, W, b) + s * F.linear(F.linear(h, A), B))
        return {name: F.linear(h, w, b) for name, w, b in self.heads}

    def tensor_ids(self) -> set[int]:
        """``id`` of every LoRA factor and head tensor the view reads."""
        ids = {id(t) for _, _, A, B, _ in self.layers for t in (A, B)}
        return ids | {id(t) for _, w, b in self.heads for t in (w, b) if t is not None}

    def sample_grad_squares(
        self, inputs: Mapping[str, Tensor], per_sample_loss: Callable[[dict[str, Tensor]], Tensor]
    ) -> dict[int, Tensor]:
        """``Σ_i (∂ℓ_i/∂θ)²`` for every LoRA factor and head tensor θ (keyed by ``id(θ)``), ``ℓ`` the
        per-sample losses ``per_sample_loss(outputs)`` of the rows of ``x``: the diagonal empirical
        Fisher without per-sample gradients. Rows do not interact, so one backward pass gives each
        row's ``δ = ∂ℓ_i/∂pre`` at every layer, and a linear map's per-sample gradient is the outer
        product ``δ_i ⊗ a_i`` (its input ``a``): the sum of its squares is ``(δ²)ᵀ (a²)``. For
        ``h Aᵀ Bᵀ·s``: ``∂ℓ_i/∂B = s·δ_i ⊗ u_i`` (``u = h Aᵀ``), ``∂ℓ_i/∂A = s·(δ_i B) ⊗ h_i``."""
        layer_inputs, lowrank, pre_acts = [], [], []
        h = inputs["x"]
        with torch.enable_grad():
            for W, b, A, B, s in self.layers:
                u = F.linear(h, A)
                pre = F.linear(h, W, b) + s * F.linear(u, B)
                layer_inputs.append(h.detach())
                lowrank.append(u.detach())
                pre_acts.append(pre)
                h = torch.relu(pre)
            logits = {name: F.linear(h, w, b) for name, w, b in self.heads}
            deltas = torch.autograd.grad(
                per_sample_loss(logits).sum(), [*pre_acts, *logits.values()], allow_unused=True
            )
        z = h.detach()
        out: dict[int, Tensor] = {}
        for (_, w, b), d in zip(self.heads, deltas[len(pre_acts) :], strict=True):
            d2 = z.new_zeros((z.shape[0], w.shape[0])) if d is None else d.detach().pow(2)
            out[id(w)] = d2.T @ z.pow(2)
            if b is not None:
                out[id(b)] = d2.sum(0)
        for (_, _, A, B, s), h_in, u, d in zip(
            self.layers, layer_inputs, lowrank, deltas[: len(pre_acts)], strict=True
        ):
            d = u.new_zeros((u.shape[0], B.shape[0])) if d is None else d.detach()
            out[id(B)] = (s * s) * (d.pow(2).T @ u.pow(2))
            out[id(A)] = (s * s) * ((d @ B.detach()).pow(2).T @ h_in.pow(2))
        return out


def _mlp_layers(backbone: nn.Module) -> list[nn.Module] | None:
    """The layers ``fc0 … fcK`` of an MLP backbone, found by structure: ``forward(x)``, children
    exactly ``fc0 … fcK`` (linear, LoRA-wrapped or not) and one ReLU ``act``; else None."""
    try:
        if list(inspect.signature(backbone.forward).parameters) != ["x"]:
            return None
    except (TypeError, ValueError):
        return None
    children = dict(backbone.named_children())
    if not isinstance(children.pop("act", None), nn.ReLU):
        return None
    names = [f"fc{i}" for i in range(len(children))]
    if not names or sorted(children) != sorted(names):
        return None
    return [children[n] for n in names]


def _lora_mlp_view(model: nn.Module) -> LoraMLPView | None:
    from worker.unlearning.model import unwrap

    adapter = active_adapter(model)
    try:
        net = unwrap(model)
    except TypeError:
        return None
    if net.pooling != "identity":
        return None
    mlp = _mlp_layers(net.backbone)
    if mlp is None:
        return None
    layers = []
    for layer in mlp:
        base = getattr(layer, "base_layer", None)
        scaling: dict[str, float] = getattr(layer, "scaling", {})
        lora_a, lora_b = getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})
        if not isinstance(base, nn.Linear) or adapter not in lora_a or adapter not in lora_b:
            return None
        layers.append((base.weight, base.bias, lora_a[adapter].weight, lora_b[adapter].weight,
                       float(scaling[adapter])))  # fmt: skip
    heads = tuple(
        (n, trainable_head(model, n).weight, trainable_head(model, n).bias) for n in head_names(model)
    )
    return LoraMLPView(layers=tuple(layers), heads=heads)


def fast_forward(model: nn.Module) -> Forward:
    """A written-out forward of ``model`` when one fits it and reproduces ``model(inputs)`` on a
    random probe (eval mode, to 1e-5): a :class:`LoraMLPView` when the backbone is an MLP (by
    structure), a :class:`~worker.unlearning.vit_view.LoraViTView` for a transformers ViT with CLS
    pooling; else ``model`` itself (any other backbone, a merged or disabled adapter, …). Build it
    once per loop: it is tied to the model's current structure."""
    view: LoraMLPView | LoraViTView | None = _lora_mlp_view(model)
    if isinstance(view, LoraMLPView):
        in_dim = int(view.layers[0][0].shape[1])
        gen = torch.Generator().manual_seed(0)
        probe = {"x": torch.randn(4, in_dim, generator=gen).to(view.layers[0][0])}
    else:
        view = _lora_vit_view(model)
        if view is None:
            return model
        probe = view.probe()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want, got = model(probe), view(probe)
    finally:
        model.train(was_training)
    same = set(want) == set(got) and all(torch.allclose(want[k], got[k], atol=1e-5, rtol=1e-5) for k in want)
    return view if same else model


def _lora_vit_view(model: nn.Module) -> LoraViTView | None:
    try:
        adapter = active_adapter(model)
        heads = tuple(
            (n, trainable_head(model, n).weight, trainable_head(model, n).bias) for n in head_names(model)
        )
    except (TypeError, KeyError, AttributeError):
        return None
    return lora_vit_view(model, adapter, heads)


def joint_grads(forward: Callable[..., Mapping[str, Tensor]], model: nn.Module) -> bool:
    """Whether :func:`worker.unlearning.grads.partition_task_grads` should run one joint forward
    over every partition (a cheap view, whose per-call overhead dominates) rather than one per
    partition (the model, or a view whose rows are costly)."""
    return forward is not model and bool(getattr(forward, "joint_grads", True))
