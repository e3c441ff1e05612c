"""The model convention of the ML core: any frozen backbone, a pooling, one linear head per task and
the subset-ID head.

:class:`MultiTaskModel` ``forward(inputs)`` takes the model's inputs as a ``dict[str, Tensor]``
(``{"x": …}`` for an MLP, ``{"pixel_values": …}`` for a ViT, ``{"input_ids": …, "attention_mask":
…}`` for a BERT), calls ``backbone(**inputs)``, pools the output into an embedding ``z`` (a named,
module-level function of :data:`POOLINGS`) and returns ``dict[str, Tensor]`` keyed by task name plus
``types.SUBSET_HEAD``. The heads live in ``self.heads`` (an ``nn.ModuleDict`` of ``nn.Linear``).

LoRA: the workload's peft ``LoraConfig`` (target modules, rank, alpha) travels with the model
(``MultiTaskModel.lora_template``); the heads are trained and saved with the adapter through
``modules_to_save``, so that after wrapping ``model.heads[name]`` is a peft ``ModulesToSaveWrapper``.

The base on disk (:func:`save_base` / :func:`load_base`)::

    base/backbone/            the backbone in its library's own format: ``save_pretrained`` output
                              for a transformers ``PreTrainedModel``, else ``model.safetensors`` +
                              ``config.json`` (``{"class": "module:Name", "init": {…}}``)
    base/heads.safetensors    the heads (task heads and the subset-ID head)
    base/lethe-model.json     tasks and head widths, subset count, pooling, LoRA template, name
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from worker.unlearning.types import SUBSET_HEAD

BACKBONE_DIR = "backbone"
HEADS_FILE = "heads.safetensors"
MODEL_FILE = "lethe-model.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_RANK = 16
FORMAT_VERSION = 1


def identity(output: Any) -> Tensor:
    """Pooling of a backbone that already returns the embedding ``[N, d]`` (an MLP trunk)."""
    return cast(Tensor, output)


def cls_token(output: Any) -> Tensor:
    """Pooling of a transformers encoder: the first token of ``last_hidden_state`` ``[N, L, d]``."""
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return cast(Tensor, hidden[:, 0])


def mean_tokens(output: Any) -> Tensor:
    """Pooling of a transformers encoder: the mean of ``last_hidden_state`` over tokens."""
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return cast(Tensor, hidden.mean(dim=1))


#: Poolings by name (the name is stored in ``lethe-model.json``).
POOLINGS: dict[str, Callable[[Any], Tensor]] = {
    "identity": identity,
    "cls_token": cls_token,
    "mean_tokens": mean_tokens,
}


def make_heads(embed_dim: int, task_outputs: Mapping[str, int], num_subsets: int) -> dict[str, nn.Module]:
    """One ``nn.Linear`` per task (in order), then the subset-ID head (seeded by the caller's RNG)."""
    heads: dict[str, nn.Module] = {name: nn.Linear(embed_dim, n) for name, n in task_outputs.items()}
    heads[SUBSET_HEAD] = nn.Linear(embed_dim, num_subsets)
    return heads


def default_lora_config(
    target_modules: list[str] | str, heads: Mapping[str, nn.Module] | list[str], *, rank: int = DEFAULT_RANK,
    alpha: int | None = None,
) -> LoraConfig:  # fmt: skip
    """LoRA on ``target_modules`` (names or a regex, as peft matches them); every head trained and
    saved with the adapter (``modules_to_save``)."""
    return LoraConfig(
        r=rank,
        lora_alpha=int(alpha if alpha is not None else rank),
        lora_dropout=0.0,
        target_modules=target_modules,
        modules_to_save=[f"heads.{name}" for name in heads],
        bias="none",
    )


class MultiTaskModel(nn.Module):
    """A frozen ``backbone`` (any ``nn.Module`` called as ``backbone(**inputs)``), a pooling (a name
    of :data:`POOLINGS`) and linear ``heads`` (one per task + the subset-ID head)."""

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        *,
        pooling: str = "identity",
        lora_template: LoraConfig | None = None,
        base_name: str = "",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
        if SUBSET_HEAD not in heads:
            raise ValueError(f"a MultiTaskModel needs the {SUBSET_HEAD!r} head")
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.pooling = pooling
        self.lora_template = lora_template or default_lora_config(
            _linear_names(backbone, prefix="backbone."), list(heads)
        )
        self.base_name = base_name  # what adapter_config.json's base_model_name_or_path names

    @property
    def task_names(self) -> list[str]:
        return [name for name in self.heads if name != SUBSET_HEAD]

    def embed(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The pooled backbone output ``z`` (what the disentanglement loss acts on)."""
        return POOLINGS[self.pooling](self.backbone(**inputs))

    def forward_with_embedding(self, inputs: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        z = self.embed(inputs)
        return {name: head(z) for name, head in self.heads.items()}, z

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.forward_with_embedding(inputs)[0]

    def head_module_names(self) -> list[str]:
        return [f"heads.{name}" for name in self.heads]

    def describe(self) -> dict[str, Any]:
        """The contents of ``lethe-model.json``."""
        tpl = self.lora_template
        target = tpl.target_modules
        return {
            "format": FORMAT_VERSION,
            "base_name": self.base_name,
            "pooling": self.pooling,
            "tasks": {n: _out_features(self.heads[n]) for n in self.task_names},
            "num_subsets": _out_features(self.heads[SUBSET_HEAD]),
            "embed_dim": _in_features(self.heads[SUBSET_HEAD]),
            "lora": {
                "r": tpl.r,
                "lora_alpha": tpl.lora_alpha,
                "lora_dropout": tpl.lora_dropout,
                "target_modules": target if isinstance(target, str) else sorted(target or []),
                "modules_to_save": list(tpl.modules_to_save or []),
                "bias": tpl.bias,
            },
        }


def _linear_names(module: nn.Module, prefix: str) -> list[str]:
    return [prefix + n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _out_features(head: nn.Module) -> int:
    return int(cast(nn.Linear, head).out_features)


def _in_features(head: nn.Module) -> int:
    return int(cast(nn.Linear, head).in_features)


def unwrap(model: nn.Module) -> MultiTaskModel:
    """The :class:`MultiTaskModel` inside a peft wrapper (or the module itself)."""
    inner: nn.Module = model
    for _ in range(4):
        if isinstance(inner, MultiTaskModel):
            return inner
        if isinstance(inner, PeftModel):
            inner = inner.get_base_model()
            continue
        nested = getattr(inner, "model", None)
        if isinstance(nested, nn.Module):
            inner = nested
            continue
        break
    raise TypeError(f"not a MultiTaskModel (or a peft wrapper of one): {type(model).__name__}")


def forward_with_embedding(
    model: nn.Module, inputs: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    """Outputs and pooled embedding of ``model`` (plain or peft-wrapped); adapters stay active."""
    return unwrap(model).forward_with_embedding(inputs)


def lora_config(net: MultiTaskModel, rank: int | None = None, alpha: int | None = None) -> LoraConfig:
    """The model's LoRA template, with ``rank`` / ``alpha`` where given (``alpha`` defaults to
    ``rank`` when only the rank is given)."""
    cfg = copy.deepcopy(net.lora_template)
    if rank is not None:
        cfg.r = int(rank)
        cfg.lora_alpha = int(alpha if alpha is not None else rank)
    elif alpha is not None:
        cfg.lora_alpha = int(alpha)
    if not cfg.modules_to_save:
        cfg.modules_to_save = net.head_module_names()
    return cfg


def wrap_lora(
    net: MultiTaskModel, *, rank: int | None = None, alpha: int | None = None, seed: int = 0
) -> PeftModel:
    """A fresh adapter (seeded LoRA A init, B = 0) on a copy of ``net`` (``net`` is left untouched).

    Only the adapter and the heads are trainable; the backbone stays frozen.
    """
    net = copy.deepcopy(net)
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(net, lora_config(net, rank, alpha))
    return cast(PeftModel, model)


def _is_transformers(backbone: nn.Module) -> bool:
    return hasattr(backbone, "save_pretrained") and hasattr(backbone, "config")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _atomic_safetensors(path: Path, state: Mapping[str, Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def save_base(net: MultiTaskModel, base_dir: Path) -> None:
    """Write the base layout (module docstring); ``lethe-model.json`` last, so that its presence
    means a complete base. A non-transformers backbone must be rebuildable as
    ``type(backbone)(**backbone.init_kwargs())`` (``init_kwargs`` JSON-serialisable; none = no
    arguments)."""
    if any("lora_" in k or "modules_to_save" in k for k in net.state_dict()):
        raise ValueError("save_base needs the plain base network, not a peft-wrapped one")
    base_dir.mkdir(parents=True, exist_ok=True)
    bb_dir = base_dir / BACKBONE_DIR
    bb_dir.mkdir(exist_ok=True)
    backbone = net.backbone
    describe = net.describe()
    if _is_transformers(backbone):
        cast(Any, backbone).save_pretrained(str(bb_dir), safe_serialization=True)
        # not in config.json, and another attention kernel differs in the last bits
        attn = getattr(cast(Any, backbone).config, "_attn_implementation", None)
        describe["backbone"] = {"format": "transformers", "attn_implementation": attn}
    else:
        init = cast(Callable[[], dict[str, Any]], getattr(backbone, "init_kwargs", dict))()
        cls = type(backbone)
        config = {"class": f"{cls.__module__}:{cls.__qualname__}", "init": init}
        _atomic_safetensors(bb_dir / WEIGHTS_FILE, backbone.state_dict())
        _atomic_write(bb_dir / CONFIG_FILE, json.dumps(config, indent=2))
        describe["backbone"] = {"format": "safetensors"}
    _atomic_safetensors(base_dir / HEADS_FILE, net.heads.state_dict())
    _atomic_write(base_dir / MODEL_FILE, json.dumps(describe, indent=2))


def has_base(base_dir: Path) -> bool:
    return (base_dir / MODEL_FILE).is_file()


def _load_backbone(bb_dir: Path, fmt: str, attn_implementation: str | None = None) -> nn.Module:
    if fmt == "transformers":
        from transformers import AutoModel  # heavy import: only for transformers backbones

        # typed Any: transformers' stubs type from_pretrained's keywords differently per release
        kwargs: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return cast(nn.Module, AutoModel.from_pretrained(str(bb_dir), **kwargs))
    if fmt != "safetensors":
        raise ValueError(f"unknown backbone format {fmt!r} in {bb_dir}")
    config = json.loads((bb_dir / CONFIG_FILE).read_text())
    module_name, _, qualname = str(config["class"]).partition(":")
    cls: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    backbone = cast(nn.Module, cls(**dict(config.get("init", {}))))
    backbone.load_state_dict(load_file(str(bb_dir / WEIGHTS_FILE)), strict=True)
    return backbone


def load_base(base_dir: Path) -> MultiTaskModel:
    """Rebuild the frozen base from the layout of :func:`save_base` (eval mode, no gradients)."""
    data = json.loads((base_dir / MODEL_FILE).read_text())
    if int(data.get("format", 0)) != FORMAT_VERSION:
        raise ValueError(f"unknown base format {data.get('format')!r} in {base_dir}")
    stored = dict(data["backbone"])
    backbone = _load_backbone(
        base_dir / BACKBONE_DIR, str(stored["format"]), stored.get("attn_implementation")
    )
    heads = make_heads(int(data["embed_dim"]), dict(data["tasks"]), int(data["num_subsets"]))
    lora = dict(data["lora"])
    template = LoraConfig(
        r=int(lora["r"]),
        lora_alpha=int(lora["lora_alpha"]),
        lora_dropout=float(lora["lora_dropout"]),
        target_modules=lora["target_modules"],
        modules_to_save=list(lora["modules_to_save"]),
        bias=lora["bias"],
    )
    net = MultiTaskModel(
        backbone, heads, pooling=str(data["pooling"]), lora_template=template,
        base_name=str(data.get("base_name", "")),
    )  # fmt: skip
    net.heads.load_state_dict(load_file(str(base_dir / HEADS_FILE)), strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
