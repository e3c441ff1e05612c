"""Adapter versions on disk, through peft: ``adapter_config.json`` + ``adapter_model.safetensors``.

The heads are part of the adapter (``modules_to_save``); the frozen base is rebuilt from
``base_dir`` (``backbone/``, ``heads.safetensors``, ``lethe-model.json``, see
:mod:`worker.unlearning.model`). ``adapter_config.json`` names the base in
``base_model_name_or_path`` (the base's ``base_name``: the workload's name unless the workload
sets another, e.g. a hub id), so that a serving stack knows which base the adapter belongs to.
``unlearning_state.json`` (:class:`~worker.unlearning.state.RoundState`) sits next to them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

from peft import PeftModel
from torch import Tensor, nn

from worker.unlearning.model import MultiTaskModel, load_base, unwrap
from worker.unlearning.state import RoundState

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def save_adapter(model: PeftModel, adapter_dir: Path, state: RoundState | None = None) -> list[Path]:
    """Write the adapter (safetensors) and, if given, the round state. Returns the files written.

    peft's model card (README.md) is not kept: a version directory holds only what it needs.
    """
    adapter_dir.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: "auto" would look the base's name up on the Hugging Face hub
    # (the adapters here never target embedding layers)
    model.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    config_path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = unwrap(model).base_name or "base"
    tmp = config_path.with_name(config_path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    tmp.replace(config_path)
    files = [adapter_dir / name for name in ADAPTER_FILES]
    if state is not None:
        files.append(state.save(adapter_dir))
    return files


def load_adapter(
    base: MultiTaskModel | Path, adapter_dir: Path, *, trainable: bool = False, device: str = "cpu"
) -> PeftModel:
    """The base (a network, or ``base_dir`` to rebuild it from) with the adapter of ``adapter_dir``.

    With ``trainable`` the adapter and heads require gradients (for unlearning updates); the base
    stays frozen either way. The model is returned in eval mode.
    """
    # peft injects the adapter into the network it is given: work on a copy, so that the caller's
    # base stays pristine (a retrain on it must not see this adapter).
    net = load_base(base) if isinstance(base, Path) else copy.deepcopy(base)
    model = PeftModel.from_pretrained(net, str(adapter_dir), is_trainable=trainable)
    model = model.to(device)
    model.eval()
    return model


def load_adapters(
    base: MultiTaskModel, adapter_dirs: Mapping[str, Path], *, device: str = "cpu"
) -> PeftModel:
    """ONE copy of ``base`` with every adapter of ``adapter_dirs`` (name -> directory) loaded under
    its name (peft multi-adapter; the heads' ``modules_to_save`` copies are per adapter too), frozen,
    in eval mode. Which adapter computes the outputs: ``model.set_adapter(name, inference_mode=True)``.
    Memory: one base and the small adapters, where :func:`load_adapter` per directory copies the base
    each time."""
    if not adapter_dirs:
        raise ValueError("load_adapters needs at least one adapter")
    (first, first_dir), *rest = adapter_dirs.items()
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(first_dir), adapter_name=first)
    for name, directory in rest:
        model.load_adapter(str(directory), adapter_name=name)
    model = model.to(device)
    model.eval()
    return model


class AdapterView(nn.Module):
    """One named adapter of a multi-adapter peft model (:func:`load_adapters`), as a model of its
    own: every forward activates its adapter first, so that views of one shared model can be used
    in any order and interleaved. ``train()`` / ``eval()`` reach the shared model."""

    def __init__(self, model: PeftModel, adapter: str) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.model.active_adapter != self.adapter:
            self.model.set_adapter(self.adapter, inference_mode=True)
        out: dict[str, Tensor] = self.model(inputs)
        return out


def load_state(adapter_dir: Path) -> RoundState:
    return RoundState.load(adapter_dir)
