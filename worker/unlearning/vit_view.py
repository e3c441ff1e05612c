"""A written-out forward of a peft-wrapped transformers ``ViTModel`` with CLS pooling (the
``scenes`` workload's model), for the unlearning loops' forwards (:func:`lora.fast_forward`).

``model(inputs)`` of such a model runs every token through every layer and then keeps the first
token of the last hidden state. The view computes the same function with less work:

- the last layer evaluates only the CLS token past its keys and values: its query, attention row,
  output projection and MLP of the other tokens feed nothing that the heads read (keys and values
  of every token are still needed, as is every token of the earlier layers); the unused pooler is
  skipped. On the scenes ViT (4 layers, 17 tokens) ≈ 10–12 % of a forward and of a backward;
  outputs move by ≤ 2e-6 (a matrix product over fewer rows rounds differently);
- transformers' and peft's per-module dispatch is skipped: each adapted projection is
  ``F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s``, the ops peft runs, in its order. With
  ``cls_only=False`` the view is the model bit for bit (a test); the dispatch itself measured
  negligible at this size, the saving is the CLS-only layer.

Eager attention only (the workload's ``ATTENTION``), eval mode (no dropout; the loops that use it
run in eval mode); :func:`lora.fast_forward` checks the view against ``model(inputs)`` on a random
probe before it is used, and falls back to the model.
Gradients taken through the view reach the model's live tensors (LoRA factors, heads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: a projection: (W, b, A, B, scaling); A / B ``None`` for a layer without an adapter
Projection = tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, float]


@dataclass(frozen=True)
class Block:
    """One ``ViTLayer``'s tensors."""

    ln1: tuple[Tensor, Tensor]
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    ln2: tuple[Tensor, Tensor]
    fc1: Projection
    fc2: Projection
    act: Callable[[Tensor], Tensor]


#: per adapted projection of a recorded forward: (A, B, its input x, u = x Aᵀ, y = u Bᵀ)
Record = list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]


def _linear(x: Tensor, p: Projection, record: Record | None = None) -> Tensor:
    W, b, A, B, s = p
    out = F.linear(x, W, b)
    if A is None or B is None:
        return out
    u = F.linear(x, A)
    y = F.linear(u, B)
    if record is not None:
        record.append((A, B, x, u, y))
    return out + y * s  # peft's Linear.forward, in its order


@dataclass(frozen=True)
class LoraViTView:
    """``model({"pixel_values": x})`` of a peft-wrapped ``MultiTaskModel`` over a ``ViTModel``
    with ``cls_token`` pooling (module docstring). Built by :func:`lora.fast_forward`."""

    patch: tuple[Tensor, Tensor | None, tuple[int, int]]  # conv weight, bias, stride
    cls: Tensor  # [1, 1, H]
    pos: Tensor  # [1, T, H]
    blocks: tuple[Block, ...]
    final_ln: tuple[Tensor, Tensor]
    eps: float
    heads_count: int
    head_dim: int
    heads: tuple[tuple[str, Tensor, Tensor | None], ...]
    image: tuple[int, int, int]  # channels, height, width (the probe's shape)
    #: the last layer on the CLS token only (past its keys and values); False: every token, as
    #: the model runs it (the tests compare the two)
    cls_only: bool = True
    #: the per-partition gradient path of :func:`grads.partition_task_grads` (each row is costly
    #: enough that a joint forward's extra backward work outweighs the per-call overhead)
    joint_grads = False

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._forward(inputs, None)[0]

    def _forward(
        self, inputs: Mapping[str, Tensor], record: Record | None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The outputs and the pooled embedding ``z``; ``record``: the adapted projections' inputs
        and low-rank activations are appended to it."""
        W, b, stride = self.patch
        x = inputs["pixel_values"].to(W.dtype)
        n = x.shape[0]
        h = F.conv2d(x, W, b, stride=stride).flatten(2).transpose(1, 2)
        h = torch.cat((self.cls.expand(n, -1, -1), h), dim=1) + self.pos
        width = h.shape[-1]
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            a = F.layer_norm(h, (width,), blk.ln1[0], blk.ln1[1], self.eps)
            residual = h
            # only the CLS token reaches the heads: the last layer's other rows past its keys / values
            if i == last and self.cls_only:
                a_q, residual = a[:, :1], h[:, :1]
            else:
                a_q = a
            q = _linear(a_q, blk.q, record).view(n, -1, self.heads_count, self.head_dim).transpose(1, 2)
            k = _linear(a, blk.k, record).view(n, -1, self.heads_count, self.head_dim).transpose(1, 2)
            v = _linear(a, blk.v, record).view(n, -1, self.heads_count, self.head_dim).transpose(1, 2)
            # transformers' eager_attention_forward (no mask, no dropout in eval)
            scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            att = torch.matmul(weights, v).transpose(1, 2).contiguous()
            att = att.reshape(n, a_q.shape[1], -1).contiguous()
            h = _linear(att, blk.o, record) + residual
            m = F.layer_norm(h, (width,), blk.ln2[0], blk.ln2[1], self.eps)
            h = _linear(blk.act(_linear(m, blk.fc1, record)), blk.fc2, record) + h
        z = F.layer_norm(h, (width,), self.final_ln[0], self.final_ln[1], self.eps)[:, 0]
        return {name: F.linear(z, w, b) for name, w, b in self.heads}, z

    def sample_grad_squares(
        self, inputs: Mapping[str, Tensor], per_sample_loss: Callable[[dict[str, Tensor]], Tensor]
    ) -> dict[int, Tensor]:
        """``Σ_i (∂ℓ_i/∂θ)²`` for every LoRA factor and head tensor θ (keyed by ``id(θ)``), ``ℓ``
        the per-sample losses ``per_sample_loss(outputs)``: the diagonal empirical Fisher from one
        backward pass instead of one per sample (``vmap``). Rows do not interact (eval mode), so
        the backward of ``Σ_i ℓ_i`` gives each row's ``δ = ∂ℓ_i/∂y`` at every adapted projection
        ``y = (x Aᵀ) Bᵀ``; a row's gradient sums its tokens: ``∂ℓ_i/∂B = Σ_tok δ ⊗ u`` (``u = x
        Aᵀ``), ``∂ℓ_i/∂A = Σ_tok (δ B) ⊗ x``; a head's is ``δ_i ⊗ z_i``. The same sums as the
        per-sample gradients up to float rounding (tokens summed in another order)."""
        record: Record = []
        with torch.enable_grad():
            outputs, z = self._forward(inputs, record)
            targets = [y for *_, y in record]
            deltas = torch.autograd.grad(
                per_sample_loss(outputs).sum(), [*targets, *outputs.values()], allow_unused=True
            )
        out: dict[int, Tensor] = {}
        z = z.detach()
        for (_, w, b), d in zip(self.heads, deltas[len(targets) :], strict=True):
            d2 = z.new_zeros((z.shape[0], w.shape[0])) if d is None else d.detach().pow(2)
            out[id(w)] = d2.T @ z.pow(2)
            if b is not None:
                out[id(b)] = d2.sum(0)
        for (A, B, x, u, y), d in zip(record, deltas[: len(targets)], strict=True):
            d = torch.zeros_like(y) if d is None else d.detach()
            g_b = torch.einsum("nto,ntr->nor", d, u.detach())  # per row [out, r]
            g_a = torch.einsum("ntr,nti->nri", d @ B.detach(), x.detach())  # per row [r, in]
            out[id(B)] = g_b.pow(2).sum(0)
            out[id(A)] = g_a.pow(2).sum(0)
        return out

    def probe(self, rows: int = 4) -> dict[str, Tensor]:
        """Random inputs of the model's shape (what :func:`lora.fast_forward` compares on)."""
        gen = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(rows, *self.image, generator=gen).to(self.cls)}

    def tensor_ids(self) -> set[int]:
        """``id`` of every LoRA factor and head tensor the view reads."""
        ids: set[int] = set()
        for blk in self.blocks:
            for p in (blk.q, blk.k, blk.v, blk.o, blk.fc1, blk.fc2):
                ids |= {id(t) for t in p[2:4] if t is not None}
        return ids | {id(t) for _, w, b in self.heads for t in (w, b) if t is not None}


def _projection(layer: nn.Module, adapter: str) -> Projection | None:
    base = getattr(layer, "base_layer", layer)
    if not isinstance(base, nn.Linear):
        return None
    if base is layer:
        return (base.weight, base.bias, None, None, 0.0)
    lora_a, lora_b = getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})
    if adapter not in lora_a or adapter not in lora_b:
        return None
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    if getattr(layer, "lora_variant", {}).get(adapter) is not None:  # DoRA etc.: not written out
        return None
    scaling: dict[str, float] = getattr(layer, "scaling", {})
    return (base.weight, base.bias, lora_a[adapter].weight, lora_b[adapter].weight, float(scaling[adapter]))


def lora_vit_view(
    model: nn.Module, adapter: str, heads: tuple[tuple[str, Tensor, Tensor | None], ...]
) -> LoraViTView | None:
    """The view of ``model`` (its unwrapped ``MultiTaskModel`` with a ``ViTModel`` backbone and CLS
    pooling, eager attention), else ``None``. ``heads``: (name, weight, bias) of every head."""
    from transformers.models.vit.modeling_vit import ViTLayer, ViTModel

    from worker.unlearning.model import unwrap

    try:
        net = unwrap(model)
    except TypeError:
        return None
    vit = net.backbone
    if net.pooling != "cls_token" or type(vit) is not ViTModel:
        return None
    cfg = vit.config
    if cfg._attn_implementation != "eager" or vit.embeddings.mask_token is not None:
        return None
    conv = vit.embeddings.patch_embeddings.projection
    if not isinstance(conv, nn.Conv2d) or conv.stride != conv.kernel_size:
        return None
    blocks = []
    for layer in vit.layers:
        if type(layer) is not ViTLayer:
            return None
        att, mlp = layer.attention, layer.mlp
        modules = (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.fc1, mlp.fc2)
        projs = [_projection(m, adapter) for m in modules]
        if any(p is None for p in projs):
            return None
        q, k, v, o, fc1, fc2 = (p for p in projs if p is not None)
        blocks.append(Block((layer.layernorm_before.weight, layer.layernorm_before.bias), q, k, v, o,
                            (layer.layernorm_after.weight, layer.layernorm_after.bias), fc1, fc2,
                            mlp.activation_fn))  # fmt: skip
    size = vit.embeddings.patch_embeddings.image_size
    return LoraViTView(
        patch=(conv.weight, conv.bias, (int(conv.stride[0]), int(conv.stride[1]))),
        cls=vit.embeddings.cls_token,
        pos=vit.embeddings.position_embeddings,
        blocks=tuple(blocks),
        final_ln=(vit.layernorm.weight, vit.layernorm.bias),
        eps=float(cfg.layer_norm_eps),
        heads_count=int(cfg.num_attention_heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        heads=heads,
        image=(int(conv.in_channels), int(size[0]), int(size[1])),
    )
