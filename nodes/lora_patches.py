"""Unlearning LoRAs as ComfyUI weight patches: the UNLEARN_LORA value, apply (tagged patches), strip.

Applied LoRAs are ordinary ``ModelPatcher`` patches computed by ComfyUI's own LoRA code
(``comfy.weight_adapter.LoRAAdapter``), through a marker subclass so that Strip can find ours among the patches of
other nodes. Every operation works on ``model.clone()``: a patcher other nodes hold is never mutated.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import comfy.lora
from comfy.weight_adapter.lora import LoRAAdapter

from ..unlearn_core.lora import FAMILIES, LoraFile, LoraFormatError, LoraModule, UNetLayout
from .comfy_denoiser import _TrainableLoRA, check_model, model_family

__all__ = ["UnlearnLora", "UnlearnLoRAAdapter", "apply_lora_file", "apply_unlearn_lora", "strip_unlearn_patches"]


@dataclass
class UnlearnLora:
    """What Unlearn Concept produced: LoRA modules keyed by LDM module name, for one model family."""

    modules: dict[str, LoraModule]
    family: str
    layout: UNetLayout
    metadata: dict[str, str] = field(default_factory=dict)
    summary: str = ""


class UnlearnLoRAAdapter(LoRAAdapter):
    """ComfyUI's LoRA patch, marked as ours (Strip removes exactly these)."""

    name = "unlearn_lora"


def _title(family: str | None) -> str:
    return FAMILIES[family].title if family in FAMILIES else "an unknown model"


def _patch(model: Any, patches: dict[str, LoraModule], strength: float) -> Any:
    sd = model.model.state_dict()
    for key, m in patches.items():
        w = sd[key]
        if m.up.shape[0] * math.prod(m.down.shape[1:]) != w.numel():
            raise LoraFormatError(f"LoRA module for {key} has shape {list(m.up.shape[:1]) + list(m.down.shape[1:])} "
                                  f"but the model's weight is {list(w.shape)} — use a LoRA trained on this model")
    n = model.clone()
    n.add_patches({k: UnlearnLoRAAdapter(set(), (m.up, m.down, float(m.alpha), None, None, None))
                   for k, m in patches.items()}, strength)
    return n


def _check_family(lora_family: str | None, model: Any, what: str) -> None:
    fam = model_family(model)
    if lora_family is not None and lora_family != fam:
        raise LoraFormatError(f"{what} was trained for {_title(lora_family)} but the model is {_title(fam)} — use a "
                              "LoRA trained on this model family")


def apply_unlearn_lora(model: Any, lora: UnlearnLora, strength: float) -> Any:
    """A clone of ``model`` with ``lora`` patched in at ``strength``."""
    check_model(model)
    _check_family(lora.family, model, "this unlearning LoRA")
    sd = model.model.state_dict()
    patches = {}
    for name, m in lora.modules.items():
        key = f"diffusion_model.{name}.weight"
        if key not in sd:
            raise LoraFormatError(f"this unlearning LoRA patches {name}, which the model does not have — it was made "
                                  "for another architecture; use a LoRA trained on this model")
        patches[key] = m
    return _patch(model, patches, strength)


def apply_lora_file(model: Any, lora: LoraFile, strength: float) -> Any:
    """A clone of ``model`` with a kohya LoRA file (as read by ``load_lora``) patched in; all keys must match."""
    check_model(model)
    _check_family(lora.family, model, lora.describe())
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    missing = [k for k in lora.modules if k not in key_map]
    if missing:
        raise LoraFormatError(f"{lora.describe()}: {len(missing)} of {len(lora.modules)} LoRA keys name no layer of "
                              f"this {_title(model_family(model))} model, e.g. {missing[:2]} — use a LoRA trained on "
                              "this model family")
    return _patch(model, {key_map[k]: m for k, m in lora.modules.items()}, strength)


def strip_unlearn_patches(model: Any) -> tuple[Any, int]:
    """A clone of ``model`` without our LoRA patches and training wrappers; returns it and how many were removed."""
    n = model.clone()
    removed = 0
    patches = {}
    for k, lst in n.patches.items():
        kept = [p for p in lst if not isinstance(p[1], UnlearnLoRAAdapter)]
        removed += len(lst) - len(kept)
        if kept:
            patches[k] = kept
    wrappers = {}
    for k, lst in n.weight_wrapper_patches.items():
        kept = [f for f in lst if not isinstance(f, _TrainableLoRA)]
        removed += len(lst) - len(kept)
        if kept:
            wrappers[k] = kept
    n.patches, n.weight_wrapper_patches = patches, wrappers
    if removed:  # new weights: ComfyUI must not reuse a loaded copy patched with ours
        n.patches_uuid = uuid.uuid4()
    return n, removed
