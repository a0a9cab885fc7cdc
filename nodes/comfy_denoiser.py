"""The Denoiser protocol over a ComfyUI ``ModelPatcher`` — ComfyUI's own machinery, no second copy of the UNet.

* The incoming MODEL is never touched: everything happens on ``model.clone()``.
* Trainable LoRA deltas are weight wrappers (``ModelPatcher.add_weight_wrapper``), as in ComfyUI's
  ``nodes_train.py``: at load time ComfyUI makes every wrapped layer compute with ``wrapper(W)``. Our wrapper
  returns ``W + (α/r)·B A`` when enabled and ``W`` itself when disabled, so the frozen model is the same
  weights with the adapter switched off (bit-identical to the base model).
* Noise levels come from ``model_sampling``: for a discrete ε- or v-model ComfyUI works in the variance-
  exploding scale ``x = x0 + σ ε`` with ``σ_t² = (1 − ᾱ_t)/ᾱ_t``. The trainer's variance-preserving
  ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε`` is that ``x`` times ``√ᾱ_t``, so the model input is ``x_t · √(1 + σ_t²)``.
  ``BaseModel.apply_model`` returns the denoised ``x̂0`` whatever the parameterisation (ε or v), and
  ``ε = (x − x̂0) / σ`` — one path for SD1.x (ε), SD2-v and SDXL.
* Conditioning goes through ``comfy.samplers.process_conds`` (the guider's own preparation: SDXL's pooled
  output and size embedding are built by the model's ``extra_conds``) and every prediction through
  ``comfy.samplers.calc_cond_batch``, so model patches other nodes added (attention patches, wrappers) apply.
* ComfyUI loads checkpoints under ``torch.inference_mode()``, and autograd cannot save such tensors for backward
  (every layer between the loss and a LoRA saves its weight). :meth:`ComfyDenoiser.session` replaces them, once,
  by ordinary tensors with the same values — no value of the shared model changes and memory stays the same.
  A per-layer weight wrapper that copies on every forward does the same job at one full copy of the UNet per
  call: measured on SD1.5 on one CPU core, 2.5–4.5× slower forwards and training steps.
* ``num_timesteps`` < 1000 trains and estimates on that many evenly spaced noise levels of the model's schedule
  (the respaced DDPM of Nichol & Dhariwal): the NELBO of data unlearning visits every level, 1000 UNet calls per
  image and draw.
* Large batches (a NELBO over 1000 levels) are split by ComfyUI's own memory estimate; each call checks Cancel.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from torch import nn

from ..unlearn_core.lora import LoraModule, UNetLayout
from ..unlearn_core.schedule import NoiseSchedule

log = logging.getLogger(__name__)

__all__ = ["ComfyDenoiser", "TARGET_PRESETS", "UnsupportedModelError", "check_model", "model_family"]

# Module-name suffixes inside the UNet's transformer blocks (the same in LDM and diffusers naming).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "xattn": ("attn2.to_k", "attn2.to_v"),
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "all": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
}

_SUPPORTED_TYPES = (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION)


class UnsupportedModelError(ValueError):
    """The MODEL is not a UNet diffusion model with a discrete ε/v schedule (SD1.x, SD2.x, SDXL)."""


def check_model(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` with what to connect instead, unless ``model`` is a usable MODEL."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(model, "clone"):
        raise UnsupportedModelError(f"expected a MODEL (from a checkpoint loader), got {type(model).__name__}")
    name = type(base).__name__
    if not isinstance(getattr(base, "diffusion_model", None), UNetModel):
        raise UnsupportedModelError(
            f"this {name} model is not a UNet; unlearning supports SD1.x, SD2.x and SDXL checkpoints — "
            "load one of those with a checkpoint loader")
    ms = getattr(base, "model_sampling", None)
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) or base.model_type not in _SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"this {name} model samples with {type(ms).__mro__[1].__name__} / {base.model_type.name}; unlearning "
            "needs a discrete ε- or v-prediction schedule (SD1.x, SD2.x, SDXL) — remove model-sampling patches "
            "(ModelSamplingDiscrete, ModelSamplingSD3, …) or use a supported checkpoint")


def model_family(model: Any) -> str:
    """Our LoRA family id (``sd1``, ``sd2``, ``sdxl``, else ``demo``) for a checked MODEL."""
    base = model.model
    cfg = base.model_config.unet_config
    ctx, chans, mult = cfg.get("context_dim"), cfg.get("model_channels"), tuple(cfg.get("channel_mult", ()))
    if isinstance(base, comfy.model_base.SDXL):
        return "sdxl"
    if chans == 320 and mult == (1, 2, 4, 4) and cfg.get("in_channels") == 4:
        if ctx == 768:
            return "sd1"
        if ctx == 1024:
            return "sd2"
    return "demo"


class _TrainableLoRA(nn.Module):
    """A weight wrapper ``W ↦ W + (alpha/rank)·up @ down``; ``up`` starts at zero (the model is unchanged)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        out_f, in_f = weight.shape[0], int(math.prod(weight.shape[1:]))
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform(a=√5), as peft and kohya initialise lora_down
        self.down = nn.Parameter((torch.rand(rank, in_f, generator=generator) * 2 - 1) * bound)
        self.up = nn.Parameter(torch.zeros(out_f, rank))
        self.alpha = float(alpha)
        self.shape = tuple(weight.shape)
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        delta = (self.alpha / self.down.shape[0]) * (self.up @ self.down)
        return w + delta.reshape(self.shape).to(w.dtype)

    def move_to(self, device: torch.device) -> int:  # called by ComfyUI when the model moves
        self.to(device=device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


@dataclass
class ComfyCond:
    """Conditioning prepared by ComfyUI (``process_conds``) for one prompt; batch 1, expanded per call."""

    conds: list[dict]
    prompt: Any = None


class ComfyDenoiser:
    """:class:`unlearn_core.denoiser.Denoiser` for a ComfyUI MODEL (see the module docstring)."""

    def __init__(self, model: Any, *, clip: Any = None, targets: str | Sequence[str] = "xattn", rank: int = 4,
                 alpha: float | None = None, latent_hw: tuple[int, int] = (64, 64), seed: int = 0,
                 num_timesteps: int | None = None):
        check_model(model)
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        self.patcher = model.clone()
        self.clip = clip
        base = self.patcher.model
        self.family = model_family(model)
        self.layout = UNetLayout.from_ldm_config(base.model_config.unet_config)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.targets = targets
        self.max_batch = 64  # samples per forward in the estimators' no-grad sweeps (SD latents: memory-bound)
        ms = base.model_sampling
        sigmas = ms.sigmas.detach().float().cpu()
        if num_timesteps is not None and num_timesteps != len(sigmas):
            if not (isinstance(num_timesteps, int) and 2 <= num_timesteps <= len(sigmas)):
                raise ValueError(f"num_timesteps must be an integer in [2, {len(sigmas)}], got {num_timesteps!r}")
            # evenly spaced levels, the least and the most noisy included (indices unique since spacing ≥ 1)
            sigmas = sigmas[torch.linspace(0, len(sigmas) - 1, num_timesteps).round().long()]
        self._sigmas = sigmas
        # σ_t² = (1 − ᾱ_t)/ᾱ_t  ⇔  ᾱ_t = 1/(1 + σ_t²): the same discrete schedule the model was trained on
        self.schedule = NoiseSchedule(1.0 / (1.0 + self._sigmas.double() ** 2))
        channels = base.latent_format.latent_channels
        self.sample_shape = (channels, int(latent_hw[0]), int(latent_hw[1]))
        self.device = self.patcher.load_device

        names = _target_names(base.diffusion_model, targets)
        g = torch.Generator().manual_seed(seed)
        self.adapters: dict[str, _TrainableLoRA] = {}
        with torch.inference_mode(False):
            for name in names:
                w = base.diffusion_model.get_submodule(name).weight
                ad = _TrainableLoRA(w, rank, self.alpha, g).to(self.device)
                self.adapters[name] = ad
                self.patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", ad)
        self._loaded = False

    # ------------------------------------------------------------------ ComfyUI session
    @contextlib.contextmanager
    def session(self) -> Iterator[ComfyDenoiser]:
        """Load the clone (weights + wrappers) like a sampler does, and release it afterwards."""
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        _normalise_inference_parameters(self.patcher.model.diffusion_model)
        self.patcher.pre_run()
        self._loaded = True
        try:
            yield self
        finally:
            self._loaded = False
            self.patcher.cleanup()

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            raise RuntimeError("use the denoiser inside `with denoiser.session():` (it loads the model)")

    # ------------------------------------------------------------------ conditioning
    def encode(self, prompts: Sequence[Any]) -> ComfyCond:
        """One prompt: a string (needs ``clip``) or a ComfyUI CONDITIONING (a list of ``[tensor, dict]``)."""
        if len(prompts) != 1:
            raise ValueError(f"ComfyDenoiser encodes one prompt at a time, got {len(prompts)}")
        p = prompts[0]
        if isinstance(p, str):
            if self.clip is None:
                raise ValueError("a text prompt needs a CLIP: connect the checkpoint's CLIP output")
            conditioning = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(p))
        elif isinstance(p, list) and p and isinstance(p[0], (list, tuple)) and len(p[0]) == 2:
            conditioning = p
        else:
            raise TypeError(f"cannot encode {type(p).__name__}; give a string or a CONDITIONING")
        base = self.patcher.model
        noise = torch.zeros((1, *self.sample_shape), device=self.device)
        conds = comfy.sampler_helpers.convert_cond(conditioning)
        prepared = comfy.samplers.process_conds(base, noise, {"positive": conds}, self.device,
                                                latent_image=noise, seed=0)
        return ComfyCond(prepared["positive"], p if isinstance(p, str) else None)

    # ------------------------------------------------------------------ predictions
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self._sigmas[torch.as_tensor(t).long().cpu()]

    @contextlib.contextmanager
    def _adapter(self, enabled: bool) -> Iterator[None]:
        prev = [a.enabled for a in self.adapters.values()]
        try:
            for a in self.adapters.values():
                a.enabled = enabled
            yield
        finally:
            for a, e in zip(self.adapters.values(), prev):
                a.enabled = e

    def predict_many(self, x_t: torch.Tensor, t: torch.Tensor, conds: Sequence[ComfyCond], adapted: bool) -> list[torch.Tensor]:
        self._ensure_loaded()
        n = x_t.shape[0]
        t = torch.as_tensor(t).long().reshape(-1).expand(n)
        sigma = self.sigma(t).to(x_t.device, torch.float32)
        scale = (1.0 + sigma**2).sqrt().reshape(-1, *([1] * (x_t.dim() - 1)))
        x = (x_t.float() * scale).to(self.device)
        s = sigma.to(self.device)
        parts: list[list[torch.Tensor]] = [[] for _ in conds]
        with self._adapter(adapted):
            for idx in torch.split(torch.arange(n), self._chunk_size(x.shape, len(conds))):
                comfy.model_management.throw_exception_if_processing_interrupted()
                outs = comfy.samplers.calc_cond_batch(self.patcher.model, [c.conds for c in conds], x[idx], s[idx],
                                                      self.patcher.model_options)
                for part, x0 in zip(parts, outs):
                    part.append(x0)
        sig = s.reshape(scale.shape)
        return [((x - torch.cat(p)) / sig).to(x_t.device) for p in parts]

    def _chunk_size(self, shape: Sequence[int], n_conds: int) -> int:
        """Samples per UNet call: ComfyUI's memory estimate for this model, with its sampler's 1.5× margin."""
        per_sample = self.patcher.model.memory_required([n_conds, *shape[1:]])
        free = comfy.model_management.get_free_memory(self.device)
        return max(1, int(free / (1.5 * max(per_sample, 1.0))))

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: ComfyCond, adapted: bool = True) -> torch.Tensor:
        return self.predict_many(x_t, t, [cond], adapted)[0]

    # ------------------------------------------------------------------ adapter
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters.values() for p in a.parameters()]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v.detach().clone() for n, a in self.adapters.items() for k, v in a.state_dict().items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, a in self.adapters.items():
            with torch.no_grad():
                a.down.copy_(state[f"{n}.down"])
                a.up.copy_(state[f"{n}.up"])

    def lora_modules(self) -> dict[str, LoraModule]:
        """The trained adapter as LoRA modules keyed by LDM module name (``input_blocks.1.1.…attn2.to_k``)."""
        return {n: LoraModule(down=a.down.detach().float().cpu().clone(), up=a.up.detach().float().cpu().clone(),
                              alpha=a.alpha) for n, a in self.adapters.items()}


def _normalise_inference_parameters(module: nn.Module) -> int:
    """Replace inference-mode parameters by ordinary tensors with the same values (see the module docstring)."""
    n = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
                    n += 1
    return n


def _target_names(unet: nn.Module, targets: str | Sequence[str]) -> list[str]:
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(f"unknown LoRA targets {targets!r}; choose one of {', '.join(TARGET_PRESETS)}")
        suffixes: Sequence[str] = TARGET_PRESETS[targets]
    else:
        suffixes = tuple(targets)
    names = [n for n, m in unet.named_modules()
             if isinstance(m, nn.Linear) and any(n == s or n.endswith("." + s) for s in suffixes)]
    if not names:
        raise ValueError(f"no linear layer of this UNet matches the LoRA targets {targets!r}")
    return names

