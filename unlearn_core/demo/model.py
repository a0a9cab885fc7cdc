"""The demo text-to-image model: a small diffusers ``UNet2DConditionModel`` on 16×16 digits.

Plain diffusers all the way down, so code written for Stable Diffusion applies unchanged: the UNet is called as
``unet(x_t, t, encoder_hidden_states=h, encoder_attention_mask=m).sample`` and predicts ε; its cross-attention
layers are named ``...attentions.N.transformer_blocks.0.attn2.to_k`` etc., so LoRA targets such as
``attn2.to_k``/``attn2.to_v`` mean what they mean in SD. ``DemoModel.scheduler`` is the training-form
``DDPMScheduler`` (β's, ᾱ's, ``add_noise``); sampling builds a DDIM scheduler from the same config.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .text import HIDDEN_SIZE, TextEncoder

__all__ = [
    "WEIGHTS_DIR",
    "SamplerSettings",
    "DemoModel",
    "default_unet_config",
    "default_scheduler_config",
    "build_unet",
    "load_demo_model",
    "save_demo_model",
]

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
UNET_FILE = "unet.safetensors"
CONFIG_FILE = "config.json"


def default_unet_config() -> dict:
    return dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def default_scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
    )


@dataclass
class SamplerSettings:
    """Defaults for ``DemoModel.sample`` (stored in the weights' config.json)."""

    steps: int = 15
    guidance: float = 3.0
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    clip_sample: bool = False


def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or default_unet_config()))


class DemoModel:
    """UNet + scheduler + frozen MiniLM, with prompt encoding and CFG sampling.

    ``sample`` returns images ``[N, 16, 16]`` in [0, 1]; images are ``[N, 1, 16, 16]`` in [-1, 1] inside the UNet.
    """

    def __init__(
        self,
        unet,
        scheduler,
        sampler: SamplerSettings | None = None,
        info: dict | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.sampler = sampler or SamplerSettings()
        self.info = info or {}
        self.device = torch.device(device)
        self._text: TextEncoder | None = None
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ text
    @property
    def text_encoder(self) -> TextEncoder:
        if self._text is None:
            self._text = TextEncoder(self.device)
        return self._text

    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [B, T, 384], attention_mask [B, T])`` for the UNet's cross-attention; ``""`` is unconditional."""
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            h, m = self.text_encoder.encode(missing)
            for p, hp, mp in zip(missing, h, m, strict=True):
                self._cache[p] = (hp, mp)
        return (torch.stack([self._cache[p][0] for p in prompts]), torch.stack([self._cache[p][1] for p in prompts]))

    # ------------------------------------------------------------------ sampling
    def sampling_scheduler(self, steps: int | None = None):
        from diffusers import DDIMScheduler

        s = self.sampler
        sched = DDIMScheduler.from_config(
            self.scheduler.config,
            clip_sample=s.clip_sample,
            timestep_spacing=s.timestep_spacing,
            steps_offset=s.steps_offset,
            set_alpha_to_one=False,
        )
        sched.set_timesteps(steps or s.steps)
        return sched

    def eps(self, x: torch.Tensor, t: torch.Tensor | int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ε-prediction, the plain diffusers call (what a LoRA wrapper around ``self.unet`` also sees)."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str] | str,
        n: int = 1,
        seed: int = 0,
        guidance: float | None = None,
        steps: int | None = None,
        batch_size: int = 256,
        progress=None,
        seeds: list[int] | None = None,
    ) -> torch.Tensor:
        """``n`` images per prompt (prompt-major order), deterministic for a given seed: ``[P·n, 16, 16]`` in [0, 1].

        Classifier-free guidance ``ε = ε("") + w (ε(c) − ε(""))``; ``w = 1`` is the plain conditional model.
        DDIM with η = 0, no x0 clipping (clipping the hugely amplified early x0 estimates of an ε-model distorts
        the trajectory; see MODEL_CARD.md). ``seeds`` (one per prompt) draws each prompt's noise from its own
        seed, as ``sample([p], n, seed=s)`` would, while all prompts share the batched forwards.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        guidance = self.sampler.guidance if guidance is None else float(guidance)
        all_prompts = [p for p in prompts for _ in range(n)]
        size = self.unet.config.sample_size
        if seeds is None:
            gen = torch.Generator().manual_seed(int(seed))
            noise = torch.randn(len(all_prompts), 1, size, size, generator=gen).to(self.device)
        else:
            if len(seeds) != len(prompts):
                raise ValueError(f"seeds: one per prompt expected ({len(prompts)}), got {len(seeds)}")
            noise = torch.cat([torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(int(s)))
                               for s in seeds]).to(self.device)
        hid, mask = self.encode(all_prompts)
        uhid, umask = self.encode([""])
        out = []
        for i in range(0, len(all_prompts), batch_size):
            out.append(
                self._sample_batch(
                    noise[i : i + batch_size],
                    hid[i : i + batch_size],
                    mask[i : i + batch_size],
                    uhid,
                    umask,
                    guidance,
                    steps,
                )
            )
            if progress is not None:
                progress(min(i + batch_size, len(all_prompts)), len(all_prompts))
        x = torch.cat(out)
        return ((x.squeeze(1).float() + 1) / 2).clamp(0, 1).cpu()

    def _sample_batch(self, x, hid, mask, uhid, umask, guidance, steps):
        sched = self.sampling_scheduler(steps)
        b = x.shape[0]
        dtype = next(self.unet.parameters()).dtype
        x = x.to(dtype)
        if guidance != 1.0:
            hid_in = torch.cat([uhid.expand(b, -1, -1), hid]).to(dtype)
            mask_in = torch.cat([umask.expand(b, -1), mask])
        else:
            hid_in, mask_in = hid.to(dtype), mask
        for t in sched.timesteps:
            if guidance != 1.0:
                e_u, e_c = self.eps(torch.cat([x, x]), t, hid_in, mask_in).chunk(2)
                e = e_u + guidance * (e_c - e_u)
            else:
                e = self.eps(x, t, hid_in, mask_in)
            x = sched.step(e, t, x).prev_sample
        return x

    def to(self, device) -> DemoModel:
        self.device = torch.device(device)
        self.unet.to(self.device)
        if self._text is not None:
            self._text.model.to(self.device)
            self._text.device = self.device
        self._cache.clear()
        return self


def save_demo_model(
    unet, info: dict, sampler: SamplerSettings, directory: Path = WEIGHTS_DIR, dtype: torch.dtype = torch.float16
) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(directory / UNET_FILE), metadata={"format": "pt", "dtype": str(dtype)})
    config = {
        "unet": {
            k: list(v) if isinstance(v, tuple) else v for k, v in dict(unet.config).items() if not k.startswith("_")
        },
        "scheduler": default_scheduler_config(),
        "sampler": sampler.__dict__,
        "info": info,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_demo_model(
    device: str | torch.device = "cpu", directory: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> DemoModel:
    """The shipped demo model (or one saved by ``save_demo_model`` in ``directory``); never touches the network."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    cfg_path, w_path = directory / CONFIG_FILE, directory / UNET_FILE
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(
            f"no demo model in {directory} (need {CONFIG_FILE} and {UNET_FILE}); "
            "rebuild it with `python -m unlearn_core.demo.build`"
        )
    config = json.loads(cfg_path.read_text())
    unet_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config["unet"].items()}
    unet = UNet2DConditionModel.from_config(unet_cfg)
    state = load_file(str(w_path))
    unet.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    unet.to(device).eval().requires_grad_(False)
    if dtype != torch.float32:
        unet.to(dtype)
    scheduler = DDPMScheduler.from_config(config["scheduler"])
    sampler = SamplerSettings(**config.get("sampler", {}))
    return DemoModel(unet, scheduler, sampler, config.get("info", {}), device)
