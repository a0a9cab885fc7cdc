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
loads with ``local_files_only=True``: nothing is ever downloaded.

    model = load_single_file("v1-5-pruned-emaonly.safetensors", tokenizer="ComfyUI/comfy/sd1_tokenizer")

A single-file SD1.x checkpoint (original ``model.diffusion_model.*`` / ``first_stage_model.*`` /
``cond_stage_model.transformer.*`` names) is converted with diffusers' converters against the SD1.x configs shipped
in ``sd_configs/sd15/``; CLIP's vocabulary is not in the file, so the tokenizer comes from ``tokenizer`` or, when this
package sits inside a ComfyUI tree, from ComfyUI's ``comfy/sd1_tokenizer``. SD2.x and SDXL single files are refused
with a message (their text encoders and prediction type need configs we do not ship: use a diffusers folder or the
ComfyUI nodes).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["SD_PIPELINES", "SDXL_PIPELINES", "StableDiffusionModel", "find_clip_tokenizer", "load_diffusers_folder",
           "load_model_path", "load_single_file"]

log = logging.getLogger(__name__)

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
SUPPORTED = ("a diffusers Stable Diffusion folder (SD1.x, SD2.x incl. v-prediction, SDXL base) or an SD1.x "
             "single-file checkpoint")
SD15_CONFIGS = Path(__file__).with_name("sd_configs") / "sd15"
# the parts a single-file SD1.x checkpoint must hold (original LDM names)
SD1_PREFIXES = {"model.diffusion_model.": "the UNet", "first_stage_model.": "the VAE",
                "cond_stage_model.transformer.": "the CLIP text encoder"}


def _check_resolution(pixels: int, unet_blocks: Sequence, vae_blocks: Sequence) -> None:
    vae_scale = 2 ** (len(vae_blocks) - 1)
    halvings = len(unet_blocks) - 1  # the UNet halves the latent this often
    step = vae_scale * 2 ** halvings
    if pixels <= 0 or pixels % step:
        raise ValueError(f"--resolution {pixels}: must be a positive multiple of {step} for this model (the VAE "
                         f"scales by {vae_scale}, the UNet halves its input {halvings}×)")


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

    def set_resolution(self, pixels: int) -> None:
        """Train and sample at ``pixels`` × ``pixels`` instead of the model's native size (e.g. 256 on a CPU)."""
        _check_resolution(pixels, self.unet.config.block_out_channels, self.vae.config.block_out_channels)
        self.unet.register_to_config(sample_size=pixels // self.vae_scale_factor)

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


def check_model_path(path: str | Path, tokenizer: str | Path | None = None,
                     resolution: int | None = None) -> tuple[Path, dict, str]:
    """Cheap checks of a ``--model`` path (and ``--tokenizer``, ``--resolution``) before anything is created or
    loaded: (path, model_index, "sd"|"sdxl"). A single-file checkpoint gets a stand-in index
    ``{"_class_name": "StableDiffusionPipeline", "single_file": True}`` once its names say SD1.x and a CLIP
    tokenizer is found (``tokenizer``, else ComfyUI's)."""
    root, index, pipeline = _check_model_path(path, tokenizer)
    if tokenizer is not None and not index.get("single_file"):
        raise ValueError(f"--model {root} is a folder with its own tokenizer; --tokenizer is for single-file "
                         "checkpoints")
    if resolution:
        cfg_root = SD15_CONFIGS if index.get("single_file") else root
        try:
            blocks = [json.loads((cfg_root / sub / "config.json").read_text())["block_out_channels"]
                      for sub in ("unet", "vae")]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--model {root}: cannot read the UNet/VAE configs ({_first_line(e)})") from None
        _check_resolution(int(resolution), *blocks)
    return root, index, pipeline


def _check_model_path(path: str | Path, tokenizer: str | Path | None) -> tuple[Path, dict, str]:
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"--model {root} does not exist; give {SUPPORTED}, or leave --model out for the "
                                "demo model")
    if root.is_file():
        if root.suffix.lower() in SINGLE_FILE_SUFFIXES:
            check_single_file(root, tokenizer)
            return root, {"_class_name": "StableDiffusionPipeline", "single_file": True}, "sd"
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
    root, index, pipeline = _check_model_path(path, None)
    if index.get("single_file"):
        raise ValueError(f"--model {root} is a single-file checkpoint; load it with load_single_file")
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

    return _assemble(root, cls, pipeline, unet, vae, encoders, tokenizers, sched_cfg, device,
                     force_zeros=bool(index.get("force_zeros_for_empty_prompt", pipeline == "sdxl")))


def _assemble(root: Path, cls: str, pipeline: str, unet, vae, encoders: list, tokenizers: list, sched_cfg: dict,
              device, force_zeros: bool) -> StableDiffusionModel:
    """Check that the loaded pieces fit together, freeze them, wrap them."""
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
                                 force_zeros_for_empty_prompt=force_zeros, guidance=5.0 if pipeline == "sdxl" else 7.5)
    log.info("loaded %s (%s, %s-prediction, UNet family %s) from %s", cls, pipeline,
             model.scheduler.config.prediction_type, model.family, root)
    return model


# ------------------------------------------------------------------------------------------- single files
def find_clip_tokenizer(explicit: str | Path | None = None, search_from: str | Path | None = None) -> Path:
    """The folder with CLIP ViT-L/14's ``vocab.json`` and ``merges.txt``: ``explicit`` (that folder, or a diffusers
    model folder with ``tokenizer/``), else ComfyUI's ``comfy/sd1_tokenizer`` in a tree above ``search_from`` (this
    package: ``ComfyUI/custom_nodes/ComfyUI-Unlearn/unlearn_core``)."""
    files = ("vocab.json", "merges.txt")
    if explicit is not None:
        d = Path(explicit).expanduser()
        for cand in (d, d / "tokenizer"):
            if all((cand / f).is_file() for f in files):
                return cand
        raise FileNotFoundError(f"--tokenizer {d}: holds no {' and '.join(files)} (nor does {d / 'tokenizer'})")
    for parent in Path(search_from or __file__).resolve().parents:
        cand = parent / "comfy" / "sd1_tokenizer"
        if all((cand / f).is_file() for f in files):
            return cand
    raise FileNotFoundError("no CLIP tokenizer: a single-file checkpoint holds no vocabulary; give --tokenizer DIR "
                            "(a folder with vocab.json and merges.txt, e.g. ComfyUI/comfy/sd1_tokenizer or a diffusers "
                            "SD1.5 folder's tokenizer/)")


def _single_file_shapes(root: Path) -> dict[str, tuple[int, ...]]:
    try:
        if root.suffix.lower() in (".safetensors", ".sft"):
            from safetensors import safe_open

            with safe_open(str(root), "pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        return {k: tuple(v.shape) for k, v in _read_state_dict(root).items()}
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"--model {root}: cannot read the checkpoint ({_first_line(e)})") from None


def _read_state_dict(root: Path) -> dict[str, torch.Tensor]:
    try:
        if root.suffix.lower() in (".safetensors", ".sft"):
            from safetensors.torch import load_file

            return load_file(str(root))
        obj = torch.load(root, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--model {root}: cannot read the checkpoint ({_first_line(e)}); pickled checkpoints "
                         "load with weights_only=True only — convert it to .safetensors") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"--model {root}: not a state dict of tensors")
    return obj


def check_single_file(root: Path, tokenizer: str | Path | None = None) -> Path:
    """Cheap checks (a .safetensors header's names and shapes) that ``root`` is a complete SD1.x checkpoint; returns
    the tokenizer folder to use."""
    _check_sd1_names(root, _single_file_shapes(root))
    return find_clip_tokenizer(tokenizer)


def _check_sd1_names(root: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    names = list(shapes)
    if any(k.startswith("conditioner.embedders.") for k in names):
        other = "an SDXL checkpoint"
    elif any(k.startswith("cond_stage_model.model.") for k in names):
        other = "an SD2.x checkpoint (OpenCLIP text encoder)"
    else:
        other = ""
    if other:
        raise ValueError(f"--model {root}: {other}; single files are supported for SD1.x only — give the model as a "
                         "diffusers folder, or use the ComfyUI nodes")
    missing = [what for prefix, what in SD1_PREFIXES.items() if not any(k.startswith(prefix) for k in names)]
    if missing:
        raise ValueError(f"--model {root}: not a complete SD1.x checkpoint (no {', no '.join(missing)}"
                         f"{'; the names look like a LoRA' if any('lora' in k for k in names[:50]) else ''})")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and tuple(conv_in[:2]) != (320, 4):
        raise ValueError(f"--model {root}: the UNet takes {conv_in[1]} input channels with {conv_in[0]} features; "
                         "SD1.x text-to-image takes 4 (inpainting and other conditioned UNets are not supported)")
    k_proj = shapes.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if k_proj is not None and k_proj[-1] != 768:
        raise ValueError(f"--model {root}: the UNet's cross-attention reads {k_proj[-1]}-wide text features, not "
                         "SD1.x's 768")


def _clip_state_dict(sd: dict[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    """``cond_stage_model.transformer.*`` → the names of this transformers version's ``CLIPTextModel`` (with or
    without ``text_model.``; older checkpoints lack it too)."""
    prefix = "cond_stage_model.transformer."
    wants = any(k.startswith("text_model.") for k in model_keys)
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            name = k[len(prefix):].removeprefix("text_model.")
            # position_ids: a buffer (0…76), rebuilt by the model; text_projection (ComfyUI writes one): SD1.x's
            # conditioning is the last hidden state, the projection is never used
            if not name.endswith("position_ids") and not name.startswith("text_projection"):
                out["text_model." + name if wants else name] = v
    return out


def load_single_file(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     tokenizer: str | Path | None = None) -> StableDiffusionModel:
    """An SD1.x model from a single-file checkpoint, converted offline against ``sd_configs/sd15`` (never downloads);
    one-line errors otherwise."""
    root = Path(path).expanduser()
    if not root.is_file():
        raise FileNotFoundError(f"--model {root} does not exist")
    tok_dir = find_clip_tokenizer(tokenizer)
    if root.suffix.lower() in (".safetensors", ".sft"):
        _check_sd1_names(root, _single_file_shapes(root))  # from the header, before reading gigabytes
        sd = _read_state_dict(root)
    else:  # a pickle is read whole either way
        sd = _read_state_dict(root)
        _check_sd1_names(root, {k: tuple(v.shape) for k, v in sd.items()})
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def convert(what: str, cls, subfolder: str):
        from diffusers.utils import logging as dl

        level = dl.get_verbosity()
        dl.set_verbosity_error()  # not "modules … should be kept in float32: []" on every load
        try:
            with _no_progress_bars():
                return cls.from_single_file(sd, config=str(SD15_CONFIGS), subfolder=subfolder, torch_dtype=dtype,
                                            local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise ValueError(f"--model {root}: cannot convert {what} as SD1.x ({_first_line(e)})") from None
        finally:
            dl.set_verbosity(level)

    unet = convert("the UNet", UNet2DConditionModel, "unet")
    vae = convert("the VAE", AutoencoderKL, "vae")
    te_cfg = CLIPTextConfig.from_json_file(str(SD15_CONFIGS / "text_encoder" / "config.json"))
    text_encoder = CLIPTextModel(te_cfg)
    result = text_encoder.load_state_dict(_clip_state_dict(sd, text_encoder.state_dict()), strict=False)
    wrong = [k for k in result.missing_keys if not k.endswith("position_ids")] + list(result.unexpected_keys)
    if wrong:
        raise ValueError(f"--model {root}: the text encoder is not SD1.x's CLIP ViT-L/14 ({len(wrong)} mismatched "
                         f"names, e.g. {wrong[0]})")
    sd.clear()  # the converted copies are all that is kept
    text_encoder.to(dtype)
    try:  # 77 tokens: ComfyUI's tokenizer_config.json says 8192, the position table has 77
        tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                            model_max_length=int(te_cfg.max_position_embeddings))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--tokenizer {tok_dir}: cannot load the CLIP tokenizer ({_first_line(e)})") from None
    sched_cfg = json.loads((SD15_CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    return _assemble(root, "StableDiffusionPipeline (single file)", "sd", unet, vae, [text_encoder], [tok], sched_cfg,
                     device, force_zeros=False)


def load_model_path(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    tokenizer: str | Path | None = None, resolution: int | None = None) -> StableDiffusionModel:
    """``--model``: a diffusers folder or a single-file SD1.x checkpoint; ``resolution`` px overrides the native size."""
    root = Path(path).expanduser()
    if root.is_file() and root.suffix.lower() in SINGLE_FILE_SUFFIXES:
        model = load_single_file(root, device=device, dtype=dtype, tokenizer=tokenizer)
    else:
        check_model_path(root, tokenizer, resolution)  # a --tokenizer given for a folder, a bad --resolution
        model = load_diffusers_folder(root, device=device, dtype=dtype)
    if resolution:
        model.set_resolution(int(resolution))
    return model
