"""A :class:`~unlearn_core.denoiser.Denoiser` over a diffusers ``UNet2DConditionModel`` with a peft LoRA adapter.

The adapter is injected into the UNet in place (``unet.add_adapter``); the frozen model is the same UNet with
the adapter switched off, so there is never a second copy of the weights. Conditioning is the pair
``(encoder_hidden_states, encoder_attention_mask or None)`` that the UNet's cross-attention consumes (an
optional third element, a dict, is passed as ``added_cond_kwargs`` — SDXL's pooled text and size ids).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lora import LoraModule, UNetLayout, peft_lora_modules, save_lora, unet_family
from .schedule import NoiseSchedule

__all__ = ["TARGET_PRESETS", "DiffusersDenoiser", "lora_target_modules"]

Conditioning = tuple  # (encoder_hidden_states [B, L, D], encoder_attention_mask [B, L] or None[, added_cond_kwargs])

# Module-name suffixes inside the UNet's transformer blocks (identical in diffusers and LDM naming).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    # cross-attention keys/values only: what the text can reach (ESD-x, UCE-style edits)
    "xattn": ("attn2.to_k", "attn2.to_v"),
    # every attention projection, self and cross
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    # attention + feed-forward + the transformers' input/output projections
    "all": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
}


def lora_target_modules(unet: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the Linear/Conv2d modules a preset (or a list of name suffixes) selects, in model order."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(f"unknown LoRA target preset {targets!r}; one of {sorted(TARGET_PRESETS)} or a list of "
                             "module-name suffixes")
        suffixes: Sequence[str] = TARGET_PRESETS[targets]
    else:
        suffixes = tuple(targets)
    names = [n for n, m in unet.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and any(n == s or n.endswith("." + s) for s in suffixes)]
    if not names:
        raise ValueError(f"no Linear/Conv2d module of the UNet matches the LoRA targets {targets!r}")
    return names


class DiffusersDenoiser:
    """ε-prediction, frozen or adapted, from one diffusers UNet carrying one peft LoRA adapter.

    ``scheduler`` is a :class:`NoiseSchedule` or a diffusers scheduler (its ``alphas_cumprod`` and
    ``config.prediction_type`` are used: ``epsilon``, ``v_prediction`` and ``sample`` outputs are all converted to
    ε). ``encoder`` maps a list of prompts to a conditioning. A fresh adapter (B = 0) leaves the model unchanged.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        encoder: Callable[[Sequence[Any]], Conditioning] | None = None,
        *,
        targets: str | Sequence[str] = "xattn",
        rank: int = 4,
        alpha: float | None = None,
        adapter_name: str = "unlearn",
        sample_shape: Sequence[int] | None = None,
        prediction_type: str | None = None,
        max_batch: int | None = 256,
    ):
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.unet = unet
        self._encoder = encoder
        self.adapter_name = adapter_name
        self.targets = targets
        # samples per forward in the estimators' long no-grad sweeps (calibration, NELBO, final estimates): past a
        # few hundred, a UNet's attention memory grows and its per-sample time with it (None: everything at once)
        self.max_batch = max_batch
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        if isinstance(scheduler, NoiseSchedule):
            self.schedule = scheduler
            self.prediction_type = prediction_type or "epsilon"
        else:
            self.schedule = NoiseSchedule(scheduler.alphas_cumprod)
            self.prediction_type = prediction_type or getattr(scheduler.config, "prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        cfg = unet.config
        if sample_shape is None:
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
            sample_shape = (cfg.in_channels, *((size, size) if isinstance(size, int) else size))
        self.sample_shape = tuple(sample_shape)

        unet.requires_grad_(False)
        modules = lora_target_modules(unet, targets)
        # init_lora_weights=True: A ~ Kaiming, B = 0 — the adapted model starts exactly at the base model.
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=self.alpha, target_modules=modules, init_lora_weights=True),
                         adapter_name=adapter_name)
        self._layers = self._lora_layers()
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    # ------------------------------------------------------------------ adapter plumbing
    def _lora_layers(self) -> list[tuple[str, nn.Module]]:
        from peft.tuners.lora import LoraLayer

        return [(n, m) for n, m in self.unet.named_modules()
                if isinstance(m, LoraLayer) and self.adapter_name in m.lora_A]

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The frozen model: the same UNet with every LoRA layer bypassed (peft's ``disable_adapters``)."""
        # peft's public enable_adapters(False) also flips requires_grad on the LoRA weights (and back on for
        # every active adapter when re-enabled); the trainer toggles this many times per step, so set only the
        # flag LoraLayer.forward reads.
        prev = [m._disable_adapters for _, m in self._layers]
        try:
            for _, m in self._layers:
                m._disable_adapters = True
            yield
        finally:
            for (_, m), was in zip(self._layers, prev):
                m._disable_adapters = was

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in self._layers
                for p in (*m.lora_A[self.adapter_name].parameters(), *m.lora_B[self.adapter_name].parameters())]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """``{"<module>.lora_A.weight": A, "<module>.lora_B.weight": B}`` (detached copies)."""
        out = {}
        for name, m in self._layers:
            out[f"{name}.lora_A.weight"] = m.lora_A[self.adapter_name].weight.detach().clone()
            out[f"{name}.lora_B.weight"] = m.lora_B[self.adapter_name].weight.detach().clone()
        return out

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`adapter_state`; every key must be present with the same shape (all or nothing)."""
        params = {}
        for name, m in self._layers:
            params[f"{name}.lora_A.weight"] = m.lora_A[self.adapter_name].weight
            params[f"{name}.lora_B.weight"] = m.lora_B[self.adapter_name].weight
        unknown = sorted(set(state) - set(params))
        missing = sorted(set(params) - set(state))
        if unknown or missing:
            raise KeyError(f"adapter state does not fit this adapter: {len(missing)} missing (e.g. {missing[:2]}), "
                           f"{len(unknown)} unknown (e.g. {unknown[:2]})")
        for k, p in params.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise ValueError(f"adapter state {k}: shape {tuple(state[k].shape)} but the adapter has {tuple(p.shape)}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(p.device, p.dtype))

    def lora_modules(self) -> dict[str, LoraModule]:
        return peft_lora_modules(self.unet, self.adapter_name)

    def export_lora(self, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None,
                    dtype: str | torch.dtype = "fp16", overwrite: bool = False) -> Path:
        """Write the adapter as a kohya LoRA for this UNet's family (see :func:`unlearn_core.lora.save_lora`)."""
        md = {"unlearn.lora_targets": self.targets if isinstance(self.targets, str) else ",".join(self.targets)}
        md.update(metadata or {})
        return save_lora(path, self.lora_modules(), family=unet_family(self.unet),
                         layout=UNetLayout.from_diffusers_config(self.unet), naming="diffusers", metadata=md,
                         dtype=dtype, overwrite=overwrite)

    # ------------------------------------------------------------------ prediction
    def encode(self, prompts: Sequence[Any]) -> Conditioning:
        if self._encoder is None:
            raise RuntimeError("this DiffusersDenoiser was built without a text encoder; pass encoder=…")
        cond = self._encoder(prompts)
        return cond if isinstance(cond, tuple) else (cond, None)

    def _to_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return out
        a = self.schedule.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        if self.prediction_type == "v_prediction":  # v = √ᾱ ε − √(1−ᾱ) x0  ⇒  ε = √ᾱ v + √(1−ᾱ) x_t
            return a.sqrt() * out + (1 - a).sqrt() * x_t
        return (x_t - a.sqrt() * out) / (1 - a).sqrt()  # "sample": out is x0

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor | None,
                 added: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        dtype = self.unet.dtype
        out = self.unet(x_t.to(dtype), t, encoder_hidden_states=hidden.to(dtype),
                        encoder_attention_mask=mask, added_cond_kwargs=added, return_dict=False)[0]
        return self._to_eps(out.to(x_t.dtype), x_t, t)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, adapted: bool = True) -> torch.Tensor:
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).long().expand(n)
        hidden, mask, added = _expand(cond, n)
        if adapted:
            return self._forward(x_t, t, hidden, mask, added)
        with self.adapter_disabled():
            return self._forward(x_t, t, hidden, mask, added)

    def predict_many(self, x_t: torch.Tensor, t: torch.Tensor, conds: Sequence[Conditioning],
                     adapted: bool) -> list[torch.Tensor]:
        """ε under each conditioning, from one forward of batch ``len(conds) · len(x_t)``.

        Conditionings with different sequence lengths are right-padded with zeros and masked out.
        """
        return self.predict_groups([(x_t, t, c) for c in conds], adapted)

    def predict_groups(self, groups: Sequence[tuple[torch.Tensor, torch.Tensor, Conditioning]],
                       adapted: bool) -> list[torch.Tensor]:
        """ε for several ``(x_t, t, cond)`` groups from one forward (batch ``Σ len(x_t)``); padded like
        :meth:`predict_many`."""
        sizes = [x.shape[0] for x, _, _ in groups]
        parts = [_expand(c, n) for (_, _, c), n in zip(groups, sizes)]
        length = max(h.shape[1] for h, _, _ in parts)
        need_mask = any(m is not None for _, m, _ in parts) or any(h.shape[1] != length for h, _, _ in parts)
        hiddens, masks = [], []
        for h, m, _ in parts:
            pad = length - h.shape[1]
            if need_mask:
                m = torch.ones(h.shape[:2], device=h.device, dtype=torch.long) if m is None else m
                masks.append(nn.functional.pad(m, (0, pad)) if pad else m)
            hiddens.append(nn.functional.pad(h, (0, 0, 0, pad)) if pad else h)
        added = None
        if parts[0][2] is not None:
            added = {key: torch.cat([p[2][key] for p in parts]) for key in parts[0][2]}
        x = torch.cat([x for x, _, _ in groups])
        t = torch.cat([torch.as_tensor(t, device=x.device).long().reshape(-1).expand(n)
                       for (_, t, _), n in zip(groups, sizes)])
        big = (x, t, torch.cat(hiddens), torch.cat(masks) if need_mask else None, added)
        if adapted:
            out = self._forward(*big)
        else:
            with self.adapter_disabled():
                out = self._forward(*big)
        return list(out.split(sizes))


def _expand(cond: Conditioning, n: int) -> tuple[torch.Tensor, torch.Tensor | None, dict | None]:
    """Unpack a conditioning and broadcast batch 1 to ``n``."""
    if isinstance(cond, torch.Tensor):
        cond = (cond, None)
    hidden, mask = cond[0], cond[1] if len(cond) > 1 else None
    added = cond[2] if len(cond) > 2 else None
    if hidden.shape[0] == 1 and n != 1:
        hidden = hidden.expand(n, *hidden.shape[1:])
        mask = mask.expand(n, *mask.shape[1:]) if mask is not None else None
        added = {k: v.expand(n, *v.shape[1:]) for k, v in added.items()} if added else added
    return hidden, mask, added
