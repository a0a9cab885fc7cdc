"""LoRA weights ⇄ kohya-format safetensors that ComfyUI, A1111 and diffusers all load; apply and strip.

The file format (kohya's ``networks.lora``):

    lora_unet_<module path, "." → "_">.lora_down.weight   A, shape [r, in] (conv: [r, in, kh, kw])
    lora_unet_<module path, "." → "_">.lora_up.weight     B, shape [out, r] (conv: [out, r, 1, 1])
    lora_unet_<module path, "." → "_">.alpha              0-d; the patch is  ΔW = (alpha / r) · B A

Module paths follow the family's convention, which is what every loader expects: SD1.x / SD2.x (and our
demo model) use diffusers' UNet2DConditionModel names (``down_blocks.0.attentions.0.…``), SDXL uses the SGM /
LDM names (``input_blocks.4.1.…``) that kohya's SDXL trainer writes. A model trained under either naming (a
peft-wrapped diffusers UNet, or ComfyUI's LDM ``UNetModel``) is translated by :func:`diffusers_to_ldm` /
:func:`ldm_to_diffusers`, driven by a :class:`UNetLayout`.

Reading never unpickles anything: the safetensors header is parsed and checked here before any tensor is
read, and every inconsistency raises :class:`LoraFormatError` with the problem and the fix. Applying a file
to a model is all-or-nothing: every key must name a module of the model with the right shape.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "AppliedLora",
    "LoraFile",
    "LoraFormatError",
    "LoraModule",
    "UNetLayout",
    "add_subcommand",
    "apply_lora",
    "diffusers_to_ldm",
    "format_metadata",
    "ldm_to_diffusers",
    "load_lora",
    "lora_key",
    "match_lora",
    "model_hash",
    "peft_lora_modules",
    "save_lora",
    "strip_lora",
    "unet_family",
    "unlearn_metadata",
]

FORMAT_VERSION = "1"
LORA_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")

# Loader limits. A LoRA for every attention + feed-forward layer of SDXL has a ~0.5 MB header; kohya's
# dataset statistics (ss_tag_frequency) can add a few MB. Anything far above is a broken or hostile file.
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024 * 1024

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# A full SDXL LoRA with both text encoders has ~2,500 tensors; dims and offsets fit in 2**53 in any real file.
MAX_TENSORS = 100_000
_MAX_SIZE = 2**53


class LoraFormatError(ValueError):
    """A LoRA file (or a LoRA for a model) that cannot be used as it is. The message says why and what to do."""


# ---------------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    name: str                     # our id
    title: str                    # for people
    base_model_version: str       # kohya's ss_base_model_version
    naming: str                   # "diffusers" or "ldm": module names used in the file's keys
    context_dim: int | None       # attn2.to_k in_features, used to recognise files without metadata
    architecture: str             # modelspec.architecture


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD1.x", "sd_v1", "diffusers", 768, "stable-diffusion-v1/lora"),
    "sd2": Family("sd2", "SD2.x", "sd_v2", "diffusers", 1024, "stable-diffusion-v2-512/lora"),
    "sdxl": Family("sdxl", "SDXL", "sdxl_base_v1-0", "ldm", 2048, "stable-diffusion-xl-v1-base/lora"),
    # Any other diffusers UNet2DConditionModel — in this project, the embedded demo model.
    "demo": Family("demo", "the ComfyUI-Unlearn demo model", "unlearn_demo_v1", "diffusers", None,
                   "comfyui-unlearn-demo/lora"),
}


def _family_title(name: str | None) -> str:
    return FAMILIES[name].title if name in FAMILIES else "an unknown model"


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def unet_family(unet_or_config: Any) -> str:
    """``"sd1"``, ``"sd2"``, ``"sdxl"`` or ``"demo"`` for a diffusers UNet2DConditionModel (or its config)."""
    cfg = getattr(unet_or_config, "config", unet_or_config)
    blocks = tuple(_get(cfg, "block_out_channels", ()) or ())
    ctx = _get(cfg, "cross_attention_dim")
    if blocks == (320, 640, 1280, 1280) and _get(cfg, "in_channels") in (4, 9):
        if ctx == 768:
            return "sd1"
        if ctx == 1024:
            return "sd2"
    if blocks == (320, 640, 1280) and ctx == 2048 and _get(cfg, "addition_embed_type") == "text_time":
        return "sdxl"
    return "demo"


# ---------------------------------------------------------------------------------------------------- naming
@dataclass(frozen=True)
class UNetLayout:
    """The block structure that fixes how diffusers' and LDM module names correspond.

    ``layers`` — resnets per down level; ``down_attention`` — whether each down level has attention blocks;
    ``up_attention`` — the same for up levels in diffusers' order (up block 0 is the deepest);
    ``mid_attention`` — whether the middle block has one. Up levels have ``layers + 1`` resnets (mirrored).
    """

    layers: tuple[int, ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    mid_attention: bool = True

    def __post_init__(self) -> None:
        n = len(self.layers)
        if n == 0 or len(self.down_attention) != n or len(self.up_attention) != n:
            raise ValueError(f"UNetLayout needs one entry per level in layers/down_attention/up_attention, got {self}")

    @classmethod
    def for_family(cls, family: str) -> UNetLayout:
        if family in ("sd1", "sd2"):
            return cls((2, 2, 2, 2), (True, True, True, False), (False, True, True, True))
        if family == "sdxl":
            return cls((2, 2, 2), (False, True, True), (True, True, False))
        raise ValueError(f"no fixed UNet layout for family {family!r}; build it with UNetLayout.from_diffusers_config")

    @classmethod
    def from_diffusers_config(cls, unet_or_config: Any) -> UNetLayout:
        cfg = getattr(unet_or_config, "config", unet_or_config)
        down = tuple(_get(cfg, "down_block_types"))
        up = tuple(_get(cfg, "up_block_types"))
        lpb = _get(cfg, "layers_per_block", 2)
        layers = tuple(lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * len(down)
        mid = _get(cfg, "mid_block_type", "UNetMidBlock2DCrossAttn")
        mid_attention = mid is not None and ("CrossAttn" in mid or bool(_get(cfg, "mid_block_add_attention", True)))
        return cls(layers, tuple("Attn" in b for b in down), tuple("Attn" in b for b in up), mid_attention)

    @classmethod
    def from_ldm_config(cls, unet_config: Mapping[str, Any]) -> UNetLayout:
        """From ComfyUI's ``model.model_config.unet_config`` (``num_res_blocks``, ``transformer_depth``, …)."""
        levels = len(unet_config["channel_mult"])
        nrb = unet_config["num_res_blocks"]
        layers = tuple(nrb) if isinstance(nrb, (list, tuple)) else (int(nrb),) * levels
        depth = list(unet_config.get("transformer_depth") or [])
        depth_out = list(unet_config.get("transformer_depth_output") or [])
        down, up, i, o = [], [], 0, 0
        for lv in range(levels):
            down.append(any(d > 0 for d in depth[i:i + layers[lv]]))
            i += layers[lv]
        # output blocks are stored deepest-first in transformer_depth_output's reversed order
        for _lv, n in enumerate(reversed(layers)):
            up.append(any(d > 0 for d in list(reversed(depth_out))[o:o + n + 1]))
            o += n + 1
        mid = unet_config.get("transformer_depth_middle")
        return cls(layers, tuple(down), tuple(up), mid is None or mid >= 0)


# resnet sub-modules: diffusers name → LDM name
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_INV = {v: k for k, v in _RESNET.items()}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "class_embedding.linear_1": "label_emb.0.0",
        "class_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _block_pairs(layout: UNetLayout) -> list[tuple[str, str, str]]:
    """(diffusers prefix, LDM prefix, kind) for every block; kind ∈ resnet | attn | plain."""
    pairs: list[tuple[str, str, str]] = [(d, l_, "plain") for d, l_ in _TOP.items()]
    n = 1
    levels = len(layout.layers)
    for lv, nl in enumerate(layout.layers):
        for j in range(nl):
            pairs.append((f"down_blocks.{lv}.resnets.{j}", f"input_blocks.{n}.0", "resnet"))
            if layout.down_attention[lv]:
                pairs.append((f"down_blocks.{lv}.attentions.{j}", f"input_blocks.{n}.1", "attn"))
            n += 1
        if lv < levels - 1:
            pairs.append((f"down_blocks.{lv}.downsamplers.0.conv", f"input_blocks.{n}.0.op", "plain"))
            n += 1
    pairs.append(("mid_block.resnets.0", "middle_block.0", "resnet"))
    if layout.mid_attention:
        pairs.append(("mid_block.attentions.0", "middle_block.1", "attn"))
        pairs.append(("mid_block.resnets.1", "middle_block.2", "resnet"))
    else:
        pairs.append(("mid_block.resnets.1", "middle_block.1", "resnet"))
    n = 0
    for lv, nl in enumerate(reversed(layout.layers)):
        for j in range(nl + 1):
            pairs.append((f"up_blocks.{lv}.resnets.{j}", f"output_blocks.{n}.0", "resnet"))
            if layout.up_attention[lv]:
                pairs.append((f"up_blocks.{lv}.attentions.{j}", f"output_blocks.{n}.1", "attn"))
            if j == nl and lv < levels - 1:
                c = 2 if layout.up_attention[lv] else 1
                pairs.append((f"up_blocks.{lv}.upsamplers.0.conv", f"output_blocks.{n}.{c}.conv", "plain"))
            n += 1
    return pairs


_PAIR_CACHE: dict[UNetLayout, tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]] = {}


def _pair_maps(layout: UNetLayout):
    if layout not in _PAIR_CACHE:
        d2l, l2d = {}, {}
        for d, l_, kind in _block_pairs(layout):
            d2l[d] = (l_, kind)
            if l_ not in l2d or d.startswith("add_embedding"):  # label_emb maps back to SDXL's add_embedding
                l2d[l_] = (d, kind)
        _PAIR_CACHE[layout] = (d2l, l2d)
    return _PAIR_CACHE[layout]


def _translate(name: str, table: Mapping[str, tuple[str, str]], resnet: Mapping[str, str], what: str) -> str:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            target, kind = table[prefix]
            rest = parts[cut:]
            if kind == "resnet" and rest:
                for k in (2, 1):  # LDM resnet parts are two components ("in_layers.0"), diffusers' one
                    sub = ".".join(rest[:k])
                    if sub in resnet:
                        rest = resnet[sub].split(".") + rest[k:]
                        break
                else:
                    raise ValueError(f"{name!r}: {'.'.join(rest)!r} is not a resnet part")
            elif kind == "plain" and rest and rest[-1] not in ("weight", "bias"):
                raise ValueError(f"{name!r} is not a module of a UNet with this layout")
            return ".".join([target, *rest])
    raise ValueError(f"{name!r} is not a {what} module name of a UNet with this layout")


def diffusers_to_ldm(name: str, layout: UNetLayout) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` → ``input_blocks.4.1.transformer_blocks.0.attn2.to_k``.

    Works for module names and for parameter names (a trailing ``.weight`` / ``.bias`` is kept).
    """
    return _translate(name, _pair_maps(layout)[0], _RESNET, "diffusers")


def ldm_to_diffusers(name: str, layout: UNetLayout) -> str:
    """The inverse of :func:`diffusers_to_ldm` (``label_emb`` maps to SDXL's ``add_embedding``)."""
    return _translate(name, _pair_maps(layout)[1], _RESNET_INV, "LDM")


def lora_key(module_name: str, family: str, layout: UNetLayout | None = None, naming: str = "diffusers") -> str:
    """The file key (without suffix) for a module named ``module_name`` in ``naming`` ("diffusers" or "ldm")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; one of {sorted(FAMILIES)}")
    if naming not in ("diffusers", "ldm"):
        raise ValueError(f"naming must be 'diffusers' or 'ldm', got {naming!r}")
    want = FAMILIES[family].naming
    name = _clean_module_name(module_name)
    if naming != want:
        if layout is None:
            layout = UNetLayout.for_family(family)
        name = diffusers_to_ldm(name, layout) if want == "ldm" else ldm_to_diffusers(name, layout)
    return LORA_PREFIX + name.replace(".", "_")


def _clean_module_name(name: str) -> str:
    """Drop peft's wrapper components (``base_model.model.`` prefix, ``.base_layer``) and ComfyUI's prefix."""
    for p in ("base_model.model.", "diffusion_model.", "unet."):
        name = name.removeprefix(p)
    return name.replace(".base_layer", "")


# ---------------------------------------------------------------------------------------------------- weights
@dataclass
class LoraModule:
    """One LoRA pair: ``ΔW = (alpha / rank) · up @ down`` (conv kernels flattened, then reshaped to W)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, weight_shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        d = self.scale * (self.up.to(dtype).flatten(1) @ self.down.to(dtype).flatten(1))
        if weight_shape is None:
            if self.down.dim() == 4:
                return d.reshape(self.up.shape[0], *self.down.shape[1:])
            return d
        return d.reshape(tuple(weight_shape))


@dataclass
class LoraFile:
    """What :func:`load_lora` read: UNet modules keyed by file key (``lora_unet_…``), metadata, and provenance."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    text_encoder_keys: list[str] = field(default_factory=list)

    @property
    def family(self) -> str | None:
        """The model family the file was made for: from its metadata, else recognised from its keys and shapes."""
        return _file_family(self.modules, self.metadata)

    @property
    def dtype(self) -> torch.dtype | None:
        m = next(iter(self.modules.values()), None)
        return None if m is None else m.down.dtype

    def describe(self) -> str:
        return str(self.path) if self.path else "LoRA"


def _file_family(modules: Mapping[str, LoraModule], metadata: Mapping[str, str]) -> str | None:
    fam = metadata.get("unlearn.family")
    if fam in FAMILIES:
        return fam
    ver = (metadata.get("ss_base_model_version") or "").lower()
    if ver.startswith("sdxl"):
        return "sdxl"
    if ver.startswith("sd_v2"):
        return "sd2"
    if ver.startswith("sd_v1"):
        return "sd1"
    if ver.startswith("unlearn_demo"):
        return "demo"
    if any(k.startswith(LORA_PREFIX + p) for k in modules for p in ("input_blocks_", "middle_block_", "output_blocks_")):
        return "sdxl"
    for k, m in modules.items():
        if k.endswith("attn2_to_k"):
            for fam in FAMILIES.values():
                if fam.context_dim == m.down.shape[1]:
                    return fam.name
            return None
    return None


def peft_lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraModule]:
    """The LoRA pairs of one peft adapter, keyed by the wrapped module's plain name (diffusers naming).

    The kohya alpha is ``scaling · r``, which covers both peft's ``alpha / r`` and rsLoRA's ``alpha / √r``.
    """
    from peft.tuners.lora import LoraLayer

    out: dict[str, LoraModule] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in getattr(mod, "lora_A", {}):
            r = mod.r[adapter_name]
            out[_clean_module_name(name)] = LoraModule(
                down=mod.lora_A[adapter_name].weight.detach(),
                up=mod.lora_B[adapter_name].weight.detach(),
                alpha=float(mod.scaling[adapter_name] * r),
            )
    if not out:
        raise ValueError(f"the model has no peft LoRA layers for adapter {adapter_name!r}")
    return out


# ---------------------------------------------------------------------------------------------------- metadata
def _project_version() -> str:
    try:
        from . import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        return version("comfyui-unlearn")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _num(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def unlearn_metadata(
    *,
    method: str,
    concepts: Sequence[str] = (),
    anchors: Sequence[str] = (),
    constraints: Sequence[Mapping[str, Any]] = (),
    steps: int | None = None,
    seed: int | None = None,
    targets: str | Sequence[str] | None = None,
    base_model_hash: str | None = None,
    evaluation: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Our namespaced ``unlearn.*`` metadata, all strings (lists and tables as JSON).

    ``constraints``: one mapping per constraint with ``name``, ``requested``, ``achieved``, ``lambda`` (final λ),
    optionally ``units``. Non-finite numbers are written as strings ("nan", "inf") so the JSON stays valid.
    """
    md: dict[str, str] = {
        "unlearn.format_version": FORMAT_VERSION,
        "unlearn.version": _project_version(),
        "unlearn.method": str(method),
        "unlearn.concepts": json.dumps(list(concepts)),
        "unlearn.anchors": json.dumps(list(anchors)),
    }
    if constraints:
        rows = []
        for c in constraints:
            rows.append({k: _num(v) for k, v in dict(c).items()})
        md["unlearn.constraints"] = json.dumps(rows)
        md["unlearn.final_lambda"] = json.dumps({str(r.get("name", i)): r.get("lambda") for i, r in enumerate(rows)})
    if steps is not None:
        md["unlearn.steps"] = str(int(steps))
    if seed is not None:
        md["unlearn.seed"] = str(int(seed))
    if targets is not None:
        md["unlearn.lora_targets"] = targets if isinstance(targets, str) else json.dumps(list(targets))
    if base_model_hash is not None:
        md["unlearn.base_model_hash"] = str(base_model_hash)
    if evaluation is not None:
        md["unlearn.evaluation"] = json.dumps({k: _num(v) for k, v in dict(evaluation).items()})
    for k, v in (extra or {}).items():
        key = k if k.startswith("unlearn.") else f"unlearn.{k}"
        md[key] = v if isinstance(v, str) else json.dumps(v)
    return md


def model_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, shapes, dtypes and bytes of a state dict (``"sha256:<hex>"``)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _kohya_metadata(modules: Mapping[str, LoraModule], family: str, output_name: str) -> dict[str, str]:
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    fam = FAMILIES[family]
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": _fmt_alpha(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_network_args": "{}",
        "ss_base_model_version": fam.base_model_version,
        "ss_v2": str(family == "sd2"),
        "ss_output_name": output_name,
        "ss_network_train_unet_only": "True",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": fam.architecture,
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": output_name,
        "unlearn.family": family,
    }


def _fmt_alpha(a: float) -> str:
    return str(int(a)) if float(a).is_integer() else repr(float(a))


# ---------------------------------------------------------------------------------------------------- writing
def save_lora(
    path: str | os.PathLike,
    modules: Mapping[str, LoraModule],
    *,
    family: str,
    layout: UNetLayout | None = None,
    naming: str = "diffusers",
    metadata: Mapping[str, str] | None = None,
    dtype: str | torch.dtype = "fp16",
    output_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``modules`` (keyed by module name in ``naming``) as a kohya LoRA for ``family``; returns the path.

    The write is atomic (temp file in the same folder, fsync, rename); an existing file is kept unless
    ``overwrite=True``. ``metadata`` (e.g. from :func:`unlearn_metadata`) is merged over the kohya keys, which
    are derived from the tensors themselves. Alphas are stored as fp32 scalars whatever ``dtype``.
    """
    path = Path(path)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {dtype}")
    if not modules:
        raise ValueError("no LoRA modules to save")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True")

    tensors: dict[str, torch.Tensor] = {}
    by_key: dict[str, LoraModule] = {}
    for name, m in modules.items():
        key = lora_key(name, family, layout, naming)
        if key in by_key:
            raise ValueError(f"two modules map to the same file key {key!r}")
        if m.down.shape[0] != m.up.shape[1]:
            raise ValueError(f"{name}: down has rank {m.down.shape[0]} but up has {m.up.shape[1]}")
        if not (math.isfinite(m.alpha) and m.alpha > 0):
            raise ValueError(f"{name}: alpha must be a positive finite number, got {m.alpha}")
        by_key[key] = m
        tensors[f"{key}.lora_down.weight"] = m.down.detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = m.up.detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    for k, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{k} holds NaN or inf (in {dtype}); refusing to write a LoRA that would break models")

    md = _kohya_metadata(by_key, family, output_name or path.stem)
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map strings to strings; {k!r} → {type(v).__name__}")
        md[k] = v
    from safetensors.torch import save

    # A1111/kohya's model hash: sha256 of everything after the header. The data section does not depend on
    # the metadata, so hash a metadata-free serialisation, then write the final one.
    data = save(tensors)
    n = int.from_bytes(data[:8], "little")
    md["sshs_model_hash"] = hashlib.sha256(data[8 + n:]).hexdigest()
    blob = save(tensors, metadata=md)
    _atomic_write(path, blob, overwrite)
    log.info("wrote LoRA %s (%d modules, %s)", path, len(by_key), dtype)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, blob: bytes, overwrite: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with contextlib.suppress(OSError, AttributeError):  # mkstemp makes 0600; give the usual 0666 & ~umask
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:  # link() fails if the name exists: no window in which another writer's file is replaced
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True") from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True") from None
                os.replace(tmp, path)
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------------- reading
def _read_header(path: Path, max_header_bytes: int) -> tuple[dict[str, Any], int, int]:
    """Parse and check a safetensors header without trusting it. Returns (header, header_len, file_size)."""
    if not path.is_file():
        if path.is_dir():
            raise LoraFormatError(f"{path}: is a folder, not a LoRA file — pick the .safetensors file inside it")
        if path.exists():
            raise LoraFormatError(f"{path}: is not a regular file — pick a .safetensors LoRA file")
        raise LoraFormatError(f"{path}: no such file")
    try:
        header, n, size = _read_header_bytes(path, max_header_bytes)
    except OSError as e:
        raise LoraFormatError(f"{path}: cannot read the file ({e.strerror or e})") from None
    return header, n, size


def _read_header_bytes(path: Path, max_header_bytes: int) -> tuple[dict[str, Any], int, int]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(9)
        n = int.from_bytes(head[:8], "little")
        looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 8 + n <= size
        if not looks_safetensors and head[:2] == b"PK":
            raise LoraFormatError(
                f"{path}: this is a PyTorch zip checkpoint (.pt/.ckpt), not safetensors. Pickled files can run code "
                "when loaded, so they are never opened here — convert it to .safetensors with a tool you trust")
        if not looks_safetensors and head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise LoraFormatError(
                f"{path}: this is a Python pickle, not safetensors. Pickled files can run code when loaded, so they "
                "are never opened here — convert it to .safetensors with a tool you trust")
        if size < 8:
            raise LoraFormatError(f"{path}: file is {size} bytes, too short to be safetensors — it is truncated or "
                                  "not a LoRA; download or export it again")
        if n > max_header_bytes:
            if n > size - 8:
                raise LoraFormatError(
                    f"{path}: not a safetensors file (its first 8 bytes declare a {n}-byte header in a {size}-byte "
                    "file) — pick the .safetensors LoRA, or download it again if it was cut short")
            raise LoraFormatError(f"{path}: safetensors header is {n} bytes, above the {max_header_bytes}-byte limit "
                                  "for a LoRA — the file is corrupted or not a LoRA")
        if 8 + n > size:
            raise LoraFormatError(f"{path}: file is truncated: its header alone needs {8 + n} bytes but the file has "
                                  f"{size} — download or export it again")
        f.seek(8)
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_header_object)
        if _SURROGATE_ESCAPE.search(text):  # rare: only then look at every string
            json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise LoraFormatError(f"{path}: corrupted safetensors header: a string holds a lone UTF-16 surrogate "
                              "(\\udXXX), which is not text — download or export it again") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFormatError(f"{path}: not a safetensors file, or a corrupted one: its header is not valid JSON ({e})"
                              " — pick the .safetensors LoRA, or download it again") from None
    except RecursionError:
        raise LoraFormatError(f"{path}: corrupted safetensors header (JSON nested too deeply to be a safetensors "
                              "header) — download or export it again") from None
    except _HeaderError as e:
        raise LoraFormatError(f"{path}: corrupted safetensors header: {e} — download or export it again") from None
    if not isinstance(header, dict):
        raise LoraFormatError(f"{path}: corrupted safetensors header (not a JSON object) — download or export it again")
    return header, n, size


class _HeaderError(Exception):
    """Raised inside ``json.loads`` by :func:`_header_object`."""


def _header_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A header object, refusing duplicate keys: Python keeps the last, another reader may keep the first, so
    the header checked here could differ from the one a loader uses."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _HeaderError(f"the key {_brief(dup)} appears twice")
    return out


# A JSON escape of a UTF-16 surrogate: fine in pairs, but a lone one decodes to a str that is not text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _brief(x: Any, n: int = 80) -> str:
    """``repr(x)`` cut to ``n`` characters: header values quoted in messages may be megabytes long."""
    r = repr(x)
    return r if len(r) <= n else f"{r[:n]}… ({len(r)} chars)"


def _one_line(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"


def _check_metadata(path: Path, header: Mapping[str, Any], max_metadata_bytes: int) -> dict[str, str]:
    md = header.get("__metadata__", {}) or {}
    if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise LoraFormatError(f"{path}: corrupted metadata (safetensors metadata must map strings to strings)")
    total = sum(len(k.encode()) + len(v.encode()) for k, v in md.items())
    if total > max_metadata_bytes:
        raise LoraFormatError(f"{path}: metadata is {total} bytes, above the {max_metadata_bytes}-byte limit — the file "
                              "is corrupted or carries something that is not LoRA metadata; refusing to load it")
    return dict(md)


def _is_size(x: Any) -> bool:
    return type(x) is int and 0 <= x < _MAX_SIZE  # not bool, not float, not negative, not absurd


def _check_layout(path: Path, header: Mapping[str, Any], n: int, size: int) -> None:
    """Every tensor entry well-formed, and together they tile the data section exactly (no gap, no overlap)."""
    data_len = size - 8 - n
    entries = [(k, info) for k, info in header.items() if k != "__metadata__"]
    if len(entries) > MAX_TENSORS:
        raise LoraFormatError(f"{path}: the header lists {len(entries)} tensors, above the {MAX_TENSORS} of any LoRA "
                              "— the file is corrupted or not a LoRA")
    spans: list[tuple[int, int, str]] = []
    for k, info in entries:
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise LoraFormatError(f"{path}: corrupted header entry for {_brief(k)} — download or export the file again")
        dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in _ST_ITEMSIZE:
            raise LoraFormatError(f"{path}: corrupted header entry for {_brief(k)}: {_brief(dt)} is not a safetensors "
                                  "dtype — download or export the file again")
        if not isinstance(shape, list) or not all(_is_size(s) for s in shape):
            raise LoraFormatError(f"{path}: corrupted header entry for {_brief(k)}: shape {_brief(shape)} is not a "
                                  "list of sizes — download or export the file again")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(s) for s in offsets):
            raise LoraFormatError(f"{path}: corrupted header entry for {_brief(k)}: data_offsets {_brief(offsets)} "
                                  "is not a [begin, end] pair of byte offsets — download or export the file again")
        b, e = offsets
        if e < b:
            raise LoraFormatError(f"{path}: corrupted header entry for {_brief(k)}: data_offsets [{b}, {e}] end before "
                                  "they begin — download or export the file again")
        if e - b != math.prod(shape) * _ST_ITEMSIZE[dt]:
            raise LoraFormatError(f"{path}: corrupted header: {_brief(k)} declares {e - b} bytes for shape "
                                  f"{_brief(shape)} {dt}")
        if e > data_len:
            raise LoraFormatError(f"{path}: file is truncated: tensor {_brief(k)} ends at byte {8 + n + e} but the file "
                                  f"has {size} bytes — download or export it again")
        spans.append((b, e, k))
    end = 0
    for b, e, k in sorted(spans):
        if b != end:
            raise LoraFormatError(f"{path}: corrupted header: tensor {_brief(k)} starts at data byte {b} but the tensor "
                                  f"before it ends at {end} (tensors {'overlap' if b < end else 'leave a gap'}) — "
                                  "download or export the file again")
        end = e
    if end != data_len:
        raise LoraFormatError(f"{path}: corrupted safetensors file: {data_len - end} bytes after the last tensor "
                              "— download or export it again")


def load_lora(
    path: str | os.PathLike,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_metadata_bytes: int = MAX_METADATA_BYTES,
) -> LoraFile:
    """Read a kohya LoRA safetensors file, checking everything a loader could trip on (never unpickles).

    Raises :class:`LoraFormatError` for: not safetensors (pickles are refused unopened), truncated or corrupted
    files (bad header JSON, duplicate keys, tensors that overlap or leave gaps), oversized headers/metadata, keys
    that are not kohya LoRA keys, missing halves of a pair, rank mismatches, non-finite values. The message is
    one line naming the file. Text-encoder keys are kept aside in ``text_encoder_keys``.
    """
    path = Path(path)
    header, n, size = _read_header(path, max_header_bytes)
    metadata = _check_metadata(path, header, max_metadata_bytes)
    _check_layout(path, header, n, size)

    # Keys are judged from the header, before any tensor is read: a file that is not a LoRA costs nothing more.
    groups: dict[str, dict[str, str]] = {}
    te_keys: list[str] = []
    unknown: list[str] = []
    for k in header:
        if k == "__metadata__":
            continue
        if k.startswith(TEXT_ENCODER_PREFIXES):
            te_keys.append(k)
            continue
        m = re.fullmatch(r"(lora_unet_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)", k)
        if m is None:
            unknown.append(k)
            continue
        groups.setdefault(m.group(1), {})[m.group(2)] = k
    if unknown:
        lyco = any(s in k for k in unknown for s in ("hada_", "lokr_", "dora_scale", ".diff", "lora_mid"))
        hint = (" — this looks like a LyCORIS (LoHa/LoKr/DoRA) file; only plain LoRA is supported"
                if lyco else " — this is not a kohya-format LoRA (keys like lora_unet_<module>.lora_down.weight)")
        raise LoraFormatError(f"{path}: {len(unknown)} keys are not kohya LoRA keys, e.g. "
                              f"{', '.join(_brief(k) for k in sorted(unknown)[:3])}{hint}")
    if not groups:
        raise LoraFormatError(f"{path}: no UNet LoRA keys (lora_unet_…) in the file — it is empty, a text-encoder-only "
                              "LoRA, or not a LoRA")

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, KeyError) as e:
        # The header was checked above; what is left is the reader's own view (a dtype this torch lacks, a
        # file changed on disk meanwhile).
        raise LoraFormatError(f"{path}: could not read the tensors ({_one_line(str(e))}) — download or export the "
                              "file again") from None
    if tensors.keys() != header.keys() - {"__metadata__"}:
        raise LoraFormatError(f"{path}: the tensors read differ from the header checked (was the file changed while "
                              "it was read?) — try again")

    modules: dict[str, LoraModule] = {}
    for full_key, parts in sorted(groups.items()):
        key = full_key if len(full_key) <= 120 else full_key[:120] + "…"  # for messages
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            have = "lora_up" if "lora_up.weight" in parts else "lora_down" if "lora_down.weight" in parts else "alpha"
            raise LoraFormatError(f"{path}: {key} has only {have}; a LoRA module needs both lora_down and lora_up "
                                  "— the file is incomplete, export it again")
        down, up = tensors[parts["lora_down.weight"]], tensors[parts["lora_up.weight"]]
        for name, t in (("lora_down", down), ("lora_up", up)):
            if t.dtype not in _ST_DTYPES.values():
                raise LoraFormatError(f"{path}: {key}.{name} has dtype {t.dtype}; LoRA weights must be floating point")
            if t.dim() not in (2, 4):
                raise LoraFormatError(f"{path}: {key}.{name} has shape {list(t.shape)}; expected 2-D (linear) or "
                                      "4-D (conv) weights")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoraFormatError(f"{path}: {key}.lora_up has shape {list(up.shape)}; a conv LoRA's lora_up must be "
                                  "[out, rank, 1, 1] — the file is corrupted or not a plain LoRA")
        if down.shape[0] != up.shape[1] or down.shape[0] == 0:
            raise LoraFormatError(f"{path}: {key}: shape mismatch — lora_down {list(down.shape)} has rank "
                                  f"{down.shape[0]} but lora_up {list(up.shape)} has rank {up.shape[1]}; the file is "
                                  "corrupted")
        alpha_t = tensors[parts["alpha"]] if "alpha" in parts else None
        if alpha_t is None:
            alpha = float(down.shape[0])  # kohya convention: no alpha means scale 1
        else:
            if alpha_t.numel() != 1:
                raise LoraFormatError(f"{path}: {key}.alpha has shape {list(alpha_t.shape)}; it must be a scalar")
            alpha = float(alpha_t.float().item())
        if not math.isfinite(alpha) or alpha <= 0:
            raise LoraFormatError(f"{path}: {key}.alpha is {alpha}; it must be positive and finite — the file is "
                                  "corrupted")
        for name, t in (("lora_down", down), ("lora_up", up)):
            if not bool(torch.isfinite(t).all()):
                raise LoraFormatError(f"{path}: {key}.{name} holds NaN or inf values — the LoRA is broken (training "
                                      "diverged or the file is corrupted); do not use it")
        modules[full_key] = LoraModule(down=down, up=up, alpha=alpha)
    return LoraFile(modules=modules, metadata=metadata, path=path, text_encoder_keys=sorted(te_keys))


# ---------------------------------------------------------------------------------------------------- applying
def _weight_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv2d modules by clean diffusers name (a peft layer stands for its base layer)."""
    out: dict[str, nn.Module] = {}
    for name, mod in unet.named_modules():
        base = getattr(mod, "base_layer", None)
        if isinstance(base, (nn.Linear, nn.Conv2d)):
            out[_clean_module_name(name)] = base
        elif isinstance(mod, (nn.Linear, nn.Conv2d)) and ".base_layer" not in name and not re.search(
                r"\.lora_[AB]\.|\.lora_(embedding|magnitude)", name):
            out.setdefault(_clean_module_name(name), mod)
    return out


def match_lora(lora: LoraFile, unet: nn.Module) -> dict[str, tuple[nn.Module, LoraModule]]:
    """Pair every module of ``lora`` with the module of a diffusers ``unet`` it patches — all or nothing.

    File keys may use diffusers or (for SD-like layouts) LDM names. Raises :class:`LoraFormatError` naming the
    file's family and the model's when keys do not match, and the key and both shapes when a shape differs.
    """
    where = lora.describe()
    model_family = unet_family(unet)
    mods = _weight_modules(unet)
    lookup: dict[str, str] = {}
    try:
        layout = UNetLayout.from_diffusers_config(unet)
    except Exception:  # noqa: BLE001 - not a UNet2DConditionModel: diffusers names only
        layout = None
    for name in mods:
        lookup[LORA_PREFIX + name.replace(".", "_")] = name
        if layout is not None:
            with contextlib.suppress(ValueError):
                lookup.setdefault(LORA_PREFIX + diffusers_to_ldm(name, layout).replace(".", "_"), name)
    if lora.text_encoder_keys:
        raise LoraFormatError(
            f"{where}: the file also patches the text encoder ({len(lora.text_encoder_keys)} keys); this loader patches "
            "the UNet only and will not silently drop them — load it with ComfyUI's LoraLoader or diffusers' "
            "load_lora_weights")
    matched = {k: lookup[k] for k in lora.modules if k in lookup}
    missing = [k for k in lora.modules if k not in lookup]
    if missing:
        ff = lora.family
        total = len(lora.modules)
        if ff is not None and ff != model_family:
            msg = (f"{where}: LoRA has {total} keys made for {_family_title(ff)} but the model is "
                   f"{_family_title(model_family)}; {len(matched)} of {total} keys match a module of this model — "
                   "use a LoRA trained on this model family")
        else:
            msg = (f"{where}: {len(missing)} of {total} LoRA keys name no module of this UNet "
                   f"({_family_title(model_family)}), e.g. {', '.join(_brief(k) for k in missing[:3])}; "
                   f"{len(matched)} match — the LoRA was made "
                   "for a different architecture; use one trained on this model")
        raise LoraFormatError(msg)
    patched_by: dict[str, str] = {}
    for key, name in matched.items():
        if name in patched_by:  # e.g. one key under the diffusers name, one under the LDM name
            raise LoraFormatError(f"{where}: {patched_by[name]} and {key} both patch {name}; a LoRA patches each module "
                                  "once — the file is corrupted or two LoRAs were merged wrongly; export it again")
        patched_by[name] = key
    out: dict[str, tuple[nn.Module, LoraModule]] = {}
    for key, name in matched.items():
        mod, lm = mods[name], lora.modules[key]
        w = mod.weight
        out_f, in_f = w.shape[0], math.prod(w.shape[1:])
        if lm.up.shape[0] != out_f or math.prod(lm.down.shape[1:]) != in_f:
            ff = lora.family
            fam_note = (f" (the file was made for {_family_title(ff)}, the model is {_family_title(model_family)})"
                        if ff != model_family else "")
            raise LoraFormatError(
                f"{where}: shape mismatch at {key}: the LoRA's delta is [{lm.up.shape[0]}, "
                f"{list(lm.down.shape[1:])}] but the model's weight is {list(w.shape)}{fam_note} — use a LoRA "
                "trained on this model")
        out[name] = (mod, lm)
    return out


@dataclass
class AppliedLora:
    """A LoRA merged into a model's weights; :meth:`strip` restores the exact original weights."""

    originals: dict[str, tuple[nn.Module, torch.Tensor]]
    strength: float
    stripped: bool = False

    def strip(self) -> None:
        if self.stripped:
            return
        with torch.no_grad():
            for mod, w in self.originals.values():
                mod.weight.copy_(w)
        self.stripped = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.strip()


def apply_lora(unet: nn.Module, lora: LoraFile | str | os.PathLike, strength: float = 1.0) -> AppliedLora:
    """Merge ``strength · ΔW`` into every patched weight of a diffusers ``unet`` (in place).

    Each weight becomes ``W + strength · (alpha/r) · B A`` — linear in ``strength``. The original weights are
    kept so :meth:`AppliedLora.strip` (or :func:`strip_lora`) gives back the base model bit for bit; strip
    stacked LoRAs in reverse order. All or nothing: keys and shapes are checked before any weight changes, and
    if a patched weight would become non-finite (a finite but absurd alpha or weight overflows the model's
    dtype) or anything else fails midway, the weights already changed are restored before the error is raised.
    """
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number, got {strength}")
    if not isinstance(lora, LoraFile):
        lora = load_lora(lora)
    pairs = match_lora(lora, unet)
    originals: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for name, (mod, lm) in pairs.items():
                w = mod.weight
                delta = lm.delta(w.shape, dtype=torch.float32).to(w.device)
                new = (w.float() + strength * delta).to(w.dtype)
                if not bool(torch.isfinite(new).all()) and bool(torch.isfinite(w).all()):
                    raise LoraFormatError(
                        f"{lora.describe()}: at strength {strength:g} the LoRA makes {name} NaN or inf (its ΔW "
                        f"overflows {w.dtype}) — the LoRA is broken (absurd alpha or weights); do not use it")
                originals[name] = (mod, w.detach().clone())
                w.copy_(new)
    except BaseException:
        AppliedLora(originals, strength).strip()
        raise
    log.info("applied LoRA %s to %d modules at strength %g", lora.describe(), len(pairs), strength)
    return AppliedLora(originals, float(strength))


def strip_lora(applied: AppliedLora) -> None:
    """Give back the exact base weights that :func:`apply_lora` changed."""
    applied.strip()


# ---------------------------------------------------------------------------------------------------- inspect
_KOHYA_SHOWN = ("ss_output_name", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args", "sshs_model_hash")


def format_metadata(lora: LoraFile) -> str:
    """A person-readable summary of a LoRA file: what it is for, how it was made, what it achieved."""
    md = lora.metadata
    lines = [f"file:        {lora.path}" if lora.path else "LoRA"]
    ranks = sorted({m.rank for m in lora.modules.values()})
    lines.append(f"made for:    {_family_title(lora.family)}")
    lines.append(f"modules:     {len(lora.modules)} UNet modules, rank {'/'.join(map(str, ranks))}, {lora.dtype}"
                 + (f", plus {len(lora.text_encoder_keys)} text-encoder keys" if lora.text_encoder_keys else ""))
    if "unlearn.method" in md:
        lines.append("")
        lines.append("unlearning")
        lines.append(f"  {'method:':<12}{md['unlearn.method']}")
        for key, label in (("unlearn.concepts", "concepts"), ("unlearn.anchors", "anchors")):
            names = _json_field(md, key, list)
            if names is not None:
                lines.append(f"  {label + ':':<12}{', '.join(map(str, names)) or '-'}")
        for key, label in (("unlearn.steps", "steps"), ("unlearn.seed", "seed"), ("unlearn.lora_targets", "targets"),
                           ("unlearn.base_model_hash", "base model"), ("unlearn.version", "made with")):
            if key in md:
                lines.append(f"  {label + ':':<12}{md[key]}")
        rows = [r for r in _json_field(md, "unlearn.constraints", list) or [] if isinstance(r, dict)]
        if rows:
            lines.append("  constraints:")
            lines.append(f"    {'name':<20} {'requested':>12} {'achieved':>12} {'final λ':>10}")
            for r in rows:
                lines.append(f"    {r.get('name', '?')!s:<20} {_cell(r.get('requested')):>12} "
                             f"{_cell(r.get('achieved')):>12} {_cell(r.get('lambda')):>10}"
                             + (f"  {r['units']}" if r.get("units") else ""))
        ev = _json_field(md, "unlearn.evaluation", dict)
        if ev is not None:
            lines.append("  evaluation:")
            lines.extend(f"    {k}: {_cell(v)}" for k, v in ev.items())
    lines.append("")
    lines.append("kohya")
    lines.extend(f"  {k}: {md[k]}" for k in _KOHYA_SHOWN if k in md)
    shown = set(_KOHYA_SHOWN)
    rest = sorted(k for k in md if k not in shown and not k.startswith("unlearn."))
    if rest:
        lines.append("")
        lines.append("other metadata")
        lines.extend(f"  {k}: {_short(md[k])}" for k in rest)
    # Metadata comes from whoever made the file: escape control characters (ANSI sequences, newlines, bidi
    # overrides) so it cannot rewrite the terminal or fake lines of this summary.
    return "\n".join(_printable(line) for line in lines)


def _json_field(md: Mapping[str, str], key: str, kind: type) -> Any:
    """``md[key]`` parsed as JSON if it is a ``kind``, else None (metadata is the file's word, not ours)."""
    if key not in md:
        return None
    try:
        value = json.loads(md[key])
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, kind) else None


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _short(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[:n] + f"… ({len(s)} chars)"


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``inspect FILE [--json]``; the parser's default ``func(args) -> int`` runs it."""
    p = subparsers.add_parser("inspect", help="show what a LoRA file is for and how it was made",
                              description="Print a LoRA file's metadata for people (or as JSON).")
    p.add_argument("file", help="a .safetensors LoRA")
    p.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    p.set_defaults(func=_inspect_main)
    return p


def _inspect_main(args: argparse.Namespace) -> int:
    import sys

    try:
        lora = load_lora(args.file)
    except LoraFormatError as e:
        print(f"error: {_printable(str(e))}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(lora.metadata, indent=2, sort_keys=True))
    else:
        print(format_metadata(lora))
    return 0
