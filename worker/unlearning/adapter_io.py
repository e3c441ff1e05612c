"""Adapter versions on disk, through peft: ``adapter_config.json`` + ``adapter_model.safetensors``.

The heads are part of the adapter (``modules_to_save``); the frozen base is rebuilt from
``base_dir`` (``config.json`` + ``model.safetensors``, see :mod:`worker.unlearning.model`).
``unlearning_state.json`` (:class:`~worker.unlearning.state.RoundState`) sits next to them.
"""

from __future__ import annotations

import copy
from pathlib import Path

from peft import PeftModel

from worker.unlearning.model import MultiHeadNet, load_base
from worker.unlearning.state import RoundState

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def save_adapter(model: PeftModel, adapter_dir: Path, state: RoundState | None = None) -> list[Path]:
    """Write the adapter (safetensors) and, if given, the round state. Returns the files written.

    peft's model card (README.md) is not kept: a version directory holds only what it needs.
    """
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    files = [adapter_dir / name for name in ADAPTER_FILES]
    if state is not None:
        files.append(state.save(adapter_dir))
    return files


def load_adapter(
    base: MultiHeadNet | Path, adapter_dir: Path, *, trainable: bool = False, device: str = "cpu"
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


def load_state(adapter_dir: Path) -> RoundState:
    return RoundState.load(adapter_dir)
