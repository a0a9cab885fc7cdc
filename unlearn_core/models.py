"""Stable Diffusion models from a local diffusers folder, behind the demo model's interface (for the CLI).

    model = load_diffusers_folder("models/sd15", device="cuda")
    model.unet, model.scheduler        # diffusers UNet2DConditionModel, training-form DDPMScheduler
    model.encode(["a cat"])            # conditioning for DiffusersDenoiser: (hidden, None[, SDXL added_cond_kwargs])
    model.sample("a cat", n=4)         # decoded images [N, 3, H, W] in [0, 1]
    model.sample_latents("a cat", n=4) # the sampler's latents (the UNet's space: VAE latents × scaling_factor)
    model.images_to_model_space(px)    # [N, 3, H, W] in [-1, 1] → VAE latents × scaling_factor

The folder is what ``StableDiffusionPipeline.save_pretrained`` (or ``StableDiffusionXLPipeline``) writes:
``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (SDXL also
``text_encoder_2/``, ``tokenizer_2/``). SD1.x, SD2.x (ε- and v-prediction) and SDXL base are supported. Everything
loads with ``local_files_only=True``: nothing is ever downloaded. Single-file checkpoints are refused here (their
diffusers configs would come from the hub); the ComfyUI nodes load them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["SD_PIPELINES", "SDXL_PIPELINES", "StableDiffusionModel", "load_diffusers_folder"]

log = logging.getLogger(__name__)

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
SUPPORTED = "a diffusers Stable Diffusion folder (SD1.x, SD2.x incl. v-prediction, SDXL base)"


class StableDiffusionModel:
    """UNet + VAE + CLIP text encoder(s) + schedules, with the :class:`~unlearn_core.demo.DemoModel` interface.

    The UNet works on latents: ``unet.config.sample_size`` is the latent size, images are
    ``sample_size × vae_scale_factor`` pixels. ``sample`` decodes through the VAE; ``sample_latents`` does not
    (the retain set of data unlearning lives in the UNet's space).
    """

    def __init__(self, *, unet, vae, text_encoders: Sequence, tokenizers: Sequence, scheduler_config: dict,
                 pipeline: str, name: str, device: str | torch.device = "cpu", force_zeros_for_empty_prompt: bool = False,
                 sampler_steps: int = 50, guidance: float = 7.5) -> None:
        from diffusers import DDPMScheduler

        from .lora import unet_family

        self.unet = unet
        self.vae = vae
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.pipeline = pipeline  # "sd" or "sdxl"
        self.name = name
        self.family = unet_family(unet)  # "sd1" / "sd2" / "sdxl"; "demo" for any other architecture
        self.device = torch.device(device)
        self.scheduler_config = dict(scheduler_config)
        # the training-form schedule (β's, ᾱ's, prediction_type) of the folder's own scheduler
        self.scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.sampler_steps = sampler_steps
        self.guidance = guidance
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_channels = int(vae.config.in_channels)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def _encode_one(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hiddens, pooled = [], None
        for tok, te in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            if self.pipeline == "sdxl":  # penultimate layer of each encoder; pooled projection of the last one
                out = te(ids, output_hidden_states=True)
                hiddens.append(out.hidden_states[-2])
                pooled = out[0]
            else:  # SD1/SD2: last_hidden_state (SD2's folders already stop at the penultimate layer)
                hiddens.append(te(ids)[0])
        hidden = torch.cat(hiddens, dim=-1).float()
        pooled = pooled.float() if pooled is not None else None
        if self.force_zeros_for_empty_prompt:  # SDXL's unconditional branch is all zeros, not the encoded ""
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            if pooled is not None:
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return hidden, pooled

    def _time_ids(self, n: int) -> torch.Tensor:
        s = self.image_size  # (original size, crop top-left, target size), as the SDXL pipeline sets them
        return torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32, device=self.device).expand(n, -1)

    def encode(self, prompts: Sequence[str] | str) -> tuple:
        """``(encoder_hidden_states [B, L, D], None)``; SDXL adds ``{"text_embeds", "time_ids"}``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            h, pooled = self._encode_one(missing)
            for i, p in enumerate(missing):
                self._cache[p] = (h[i], pooled[i] if pooled is not None else None)
        hidden = torch.stack([self._cache[p][0] for p in prompts])
        if self.pipeline != "sdxl":
            return hidden, None
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return hidden, None, {"text_embeds": pooled, "time_ids": self._time_ids(len(prompts))}

    # ------------------------------------------------------------------ images ⇄ latents
    @torch.no_grad()
    def images_to_model_space(self, pixels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [-1, 1] → the UNet's latents (VAE posterior mean × scaling_factor), float32,
        on the CPU (where the trainer keeps its data)."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        dtype = self.vae.dtype
        out = []
        for i in range(0, pixels.shape[0], batch_size):
            z = self.vae.encode(pixels[i:i + batch_size].to(self.device, dtype)).latent_dist.mean
            out.append(((z.float() - shift) * cfg.scaling_factor).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """The UNet's latents → images ``[N, 3, H, W]`` in [0, 1] (CPU, float32)."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        out = []
        for i in range(0, latents.shape[0], batch_size):
            z = latents[i:i + batch_size].to(self.device, torch.float32) / cfg.scaling_factor + shift
            x = self.vae.decode(z.to(self.vae.dtype)).sample.float()
            out.append(((x + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ sampling
    def sampling_scheduler(self, steps: int | None = None):
        """DDIM (η = 0) on the folder's schedule and timestep spacing: where the rollouts start, how we sample."""
        from diffusers import DDIMScheduler

        cfg = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        cfg.update(clip_sample=False, set_alpha_to_one=False)
        sched = DDIMScheduler.from_config(cfg)
        sched.set_timesteps(steps or self.sampler_steps)
        return sched

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str] | str, n: int = 1, seed: int = 0, guidance: float | None = None,
                       steps: int | None = None, batch_size: int = 8) -> torch.Tensor:
        """``n`` latents per prompt (prompt-major), deterministic for a seed: ``[P·n, C, h, w]`` float32 on the CPU.
        Classifier-free guidance ``ε("") + w (ε(c) − ε(""))``; ``w = 1`` is the plain conditional model."""
        if isinstance(prompts, str):
            prompts = [prompts]
        guidance = self.guidance if guidance is None else float(guidance)
        all_prompts = [p for p in prompts for _ in range(n)]
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        hw = (size, size) if isinstance(size, int) else size
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(len(all_prompts), cfg.in_channels, *hw, generator=gen)
        out = []
        for i in range(0, len(all_prompts), batch_size):
            out.append(self._sample_batch(noise[i:i + batch_size], all_prompts[i:i + batch_size], guidance, steps))
        return torch.cat(out)

    def _unet(self, x: torch.Tensor, t, cond: tuple) -> torch.Tensor:
        dtype = self.unet.dtype
        added = {k: v.to(dtype) for k, v in cond[2].items()} if len(cond) > 2 else None
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        return self.unet(x.to(dtype), t, encoder_hidden_states=cond[0].to(dtype), added_cond_kwargs=added,
                         return_dict=False)[0].float()

    def _sample_batch(self, noise: torch.Tensor, prompts: list[str], guidance: float, steps: int | None):
        sched = self.sampling_scheduler(steps)
        x = noise.to(self.device) * sched.init_noise_sigma
        cond = self.encode(prompts)
        if guidance != 1.0:
            uncond = self.encode([""] * len(prompts))
            cond = tuple(torch.cat([u, c]) if isinstance(c, torch.Tensor) else
                         {k: torch.cat([u[k], c[k]]) for k in c} if isinstance(c, dict) else None
                         for u, c in zip(uncond, cond, strict=True))
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            if guidance != 1.0:
                o_u, o_c = self._unet(torch.cat([xin, xin]), t, cond).chunk(2)
                o = o_u + guidance * (o_c - o_u)
            else:
                o = self._unet(xin, t, cond)
            x = sched.step(o, t, x).prev_sample
        return x.float().cpu()

    @torch.no_grad()
    def sample(self, prompts: Sequence[str] | str, n: int = 1, seed: int = 0, guidance: float | None = None,
               steps: int | None = None, batch_size: int = 8) -> torch.Tensor:
        """``n`` decoded images per prompt (prompt-major): ``[P·n, 3, H, W]`` in [0, 1]."""
        return self.decode(self.sample_latents(prompts, n=n, seed=seed, guidance=guidance, steps=steps,
                                               batch_size=batch_size))

    def to(self, device) -> StableDiffusionModel:
        self.device = torch.device(device)
        for m in (self.unet, self.vae, *self.text_encoders):
            m.to(self.device)
        self._cache.clear()
        return self


# ---------------------------------------------------------------------------------------------------- loading
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' and diffusers' per-file "Loading weights" bars off (``--quiet`` means one JSON line)."""
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    was = (tl.is_progress_bar_enabled(), dl.is_progress_bar_enabled())
    tl.disable_progress_bar()
    dl.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            tl.enable_progress_bar()
        if was[1]:
            dl.enable_progress_bar()


def _variant(sub: Path, stem: str) -> str | None:
    """``"fp16"`` when a component folder holds only fp16-variant weights (``<stem>.fp16.safetensors``)."""
    if any((sub / f"{stem}.{ext}").exists() for ext in ("safetensors", "bin")):
        return None
    return "fp16" if any((sub / f"{stem}.fp16.{ext}").exists() for ext in ("safetensors", "bin")) else None


def _check_component(root: Path, name: str, files: Sequence[str]) -> Path:
    sub = root / name
    if not sub.is_dir():
        raise FileNotFoundError(f"--model {root}: the diffusers folder has no {name}/ component")
    if not any((sub / f).exists() for f in files):
        raise FileNotFoundError(f"--model {root}: {name}/ holds none of {', '.join(files)}")
    return sub


def check_model_path(path: str | Path) -> tuple[Path, dict, str]:
    """Cheap checks of a ``--model`` path before anything is created or loaded: (folder, model_index, "sd"|"sdxl")."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"--model {root} does not exist; give {SUPPORTED}, or leave --model out for the "
                                "demo model")
    if root.is_file():
        if root.suffix.lower() in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"--model {root}: single-file checkpoints are not supported by the CLI yet (their "
                             "diffusers configs would come from the hub); give a diffusers folder (model_index.json "
                             "with unet/, vae/, text_encoder/, tokenizer/, scheduler/), or load the checkpoint with "
                             "the ComfyUI nodes")
        raise ValueError(f"--model {root} is a file; give {SUPPORTED}")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"--model {root} has no model_index.json; give {SUPPORTED}")
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--model {root}: model_index.json is not valid JSON ({_first_line(e)})") from None
    cls = str(index.get("_class_name", ""))
    if cls in SD_PIPELINES:
        pipeline = "sd"
    elif cls in SDXL_PIPELINES:
        pipeline = "sdxl"
    else:
        raise ValueError(f"--model {root}: {cls or 'an unnamed pipeline'} is not supported; the CLI trains "
                         f"{SUPPORTED} ({', '.join(SD_PIPELINES + SDXL_PIPELINES)})")
    return root, index, pipeline


def load_diffusers_folder(path: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> StableDiffusionModel:
    """A Stable Diffusion model from a local diffusers folder (never downloads); one-line errors otherwise."""
    root, index, pipeline = check_model_path(path)
    cls = str(index.get("_class_name", ""))
    text_names = ["text_encoder"] + (["text_encoder_2"] if pipeline == "sdxl" else [])
    tok_names = ["tokenizer"] + (["tokenizer_2"] if pipeline == "sdxl" else [])
    for name in ("unet", "vae", *text_names, *tok_names):
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            what = "an SDXL refiner (no first text encoder)" if name == "text_encoder" and pipeline == "sdxl" else ""
            raise ValueError(f"--model {root}: model_index.json names no {name}"
                             + (f" — {what}; only SDXL base models are supported" if what else ""))
    weights = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
               "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin",
               "diffusion_pytorch_model.safetensors.index.json")
    te_weights = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin",
                  "model.safetensors.index.json")
    for name in ("unet", "vae"):
        _check_component(root, name, ["config.json"])
        _check_component(root, name, weights)
    for name in text_names:
        _check_component(root, name, ["config.json"])
        _check_component(root, name, te_weights)
    for name in tok_names:
        _check_component(root, name, ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
    _check_component(root, "scheduler", ["scheduler_config.json"])

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load(what: str, fn, *args, **kw):
        try:
            with _no_progress_bars():
                return fn(*args, local_files_only=True, **kw)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise ValueError(f"--model {root}: cannot load {what} ({_first_line(e)})") from None

    def model_kw(sub: Path, stem: str) -> dict:
        v = _variant(sub, stem)
        return {"torch_dtype": dtype, **({"variant": v} if v else {})}

    unet = load("unet/", UNet2DConditionModel.from_pretrained, root, subfolder="unet",
                **model_kw(root / "unet", "diffusion_pytorch_model"))
    vae = load("vae/", AutoencoderKL.from_pretrained, root, subfolder="vae",
               **model_kw(root / "vae", "diffusion_pytorch_model"))
    encoders = []
    for name, te_cls in zip(text_names, (CLIPTextModel, CLIPTextModelWithProjection)):
        sub = root / name
        v = _variant(sub, "model") or _variant(sub, "pytorch_model")
        encoders.append(load(f"{name}/", te_cls.from_pretrained, sub, dtype=dtype, **({"variant": v} if v else {})))
    tokenizers = [load(f"{name}/", CLIPTokenizer.from_pretrained, root / name) for name in tok_names]
    try:
        sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--model {root}: scheduler/scheduler_config.json is not valid JSON ({_first_line(e)})") from None

    # the pieces must fit together (a mismatch would otherwise fail deep inside the first training step)
    ucfg, vcfg = unet.config, vae.config
    if ucfg.in_channels != vcfg.latent_channels:
        raise ValueError(f"--model {root}: the UNet takes {ucfg.in_channels} input channels but the VAE makes "
                         f"{vcfg.latent_channels}-channel latents (inpainting and other conditioned UNets are not "
                         "supported)")
    width = sum(int(te.config.hidden_size) for te in encoders)
    if ucfg.cross_attention_dim != width:
        raise ValueError(f"--model {root}: the UNet's cross-attention expects {ucfg.cross_attention_dim}-wide text "
                         f"features but the text encoder(s) give {width}")
    if pipeline == "sdxl":
        pooled = int(encoders[-1].config.projection_dim)
        need = ucfg.projection_class_embeddings_input_dim
        got = pooled + 6 * int(ucfg.addition_time_embed_dim or 0)
        if ucfg.addition_embed_type != "text_time" or need != got:
            raise ValueError(f"--model {root}: not an SDXL base UNet (added conditioning {ucfg.addition_embed_type!r}, "
                             f"{need} inputs; SDXL base takes pooled text + 6 size ids = {got}); refiners are not "
                             "supported")
    elif ucfg.addition_embed_type is not None:
        raise ValueError(f"--model {root}: the UNet needs added conditioning ({ucfg.addition_embed_type!r}), which "
                         f"{cls} does not provide")
    for m in (unet, vae, *encoders):
        m.to(device).eval().requires_grad_(False)
    model = StableDiffusionModel(unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                                 scheduler_config=sched_cfg, pipeline=pipeline, name=root.name, device=device,
                                 force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt",
                                                                             pipeline == "sdxl")),
                                 guidance=5.0 if pipeline == "sdxl" else 7.5)
    log.info("loaded %s (%s, %s-prediction, UNet family %s) from %s", cls, pipeline,
             model.scheduler.config.prediction_type, model.family, root)
    return model
