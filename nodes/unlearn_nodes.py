"""The node classes (ComfyUI V3 API): Unlearn Concept, Unlearn Data, Save / Apply / Strip Unlearning LoRA."""

from __future__ import annotations

import hashlib
import io as _bytes_io
import logging
import re
import struct
import weakref
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..unlearn_core.denoiser import rollout
from ..unlearn_core.lora import load_lora, save_lora, unlearn_metadata
from ..unlearn_core.trainer import ConceptSpec, DataSpec, Problem, TrainConfig, Trainer, TrainResult
from .comfy_denoiser import TARGET_PRESETS, ComfyDenoiser, check_model, model_family
from .lora_patches import UnlearnLora, apply_lora_file, apply_unlearn_lora, strip_unlearn_patches
from .progress import progress_reporter

log = logging.getLogger(__name__)

CATEGORY = "unlearning"
UnlearnLoraType = io.Custom("UNLEARN_LORA")
METHODS = {"RU": "ru", "LU": "lu", "ESD": "esd"}
DATA_METHODS = {"FU": "fu", "NegGrad": "neggrad", "SISS": "siss"}
NO_FILE = "(none)"
FU_LAM_MAX = 0.5  # as the CLI: λ ≤ 0.5 keeps the retain term at least as heavy as the forget term
RETAIN_SAMPLE_STEPS = 30  # reverse jumps when the retain set is drawn from the model itself


def _lines(text: str) -> list[str]:
    return [s.strip() for s in (text or "").splitlines() if s.strip()]


def parse_concepts(text: str) -> list[list[str]]:
    """One concept per line; wordings of the same concept separated by ``|`` ("Van Gogh | van gogh style")."""
    out = []
    for line in _lines(text):
        words = [w.strip() for w in line.split("|") if w.strip()]
        if words:
            out.append(words)
    return out


def curves_image(result: TrainResult, width: int = 640, height: int = 320) -> torch.Tensor:
    """Loss and λ per step as an IMAGE tensor [1, H, W, 3] in [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    steps = [h["step"] for h in result.history]
    ax1.plot(steps, [h["loss"] for h in result.history], lw=1)
    ax1.set_title("loss")
    ax1.set_xlabel("step")
    duals = [h for h in result.history if "lambda" in h]
    if duals:
        lam = np.array([h["lambda"] for h in duals], dtype=float).reshape(len(duals), -1)
        for i in range(lam.shape[1]):
            ax2.plot([h["step"] for h in duals], lam[:, i], lw=1)
    ax2.set_title("λ")
    ax2.set_xlabel("step")
    fig.tight_layout()
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png")
    from PIL import Image

    img = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(img)[None]


def summary_text(result: TrainResult, concepts: list[list[str]]) -> str:
    lines = [f"method {result.method.upper()}: {result.steps_done} steps in {result.seconds:.1f} s"
             + (" (cancelled)" if result.cancelled else "")]
    for i, words in enumerate(concepts):
        lines.append(f"'{words[0]}': λ = {result.lambdas[i]:.4g}, threshold {result.thresholds[i]:.4g}, "
                     f"achieved {result.final_estimates[i]:.4g} (frozen model {result.calibration[i]:.4g})")
    return "\n".join(lines)


def _cancel() -> bool:
    """The trainer's stop poll: raise ComfyUI's interrupt at once (a returned True would still run the final
    constraint estimates, minutes on a CPU, before the node could give up)."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def _node_id(cls) -> str | None:
    """The running node's id (ComfyUI's hidden UNIQUE_ID; None when a node is called outside an executor)."""
    return getattr(getattr(cls, "hidden", None), "unique_id", None)


def _previewer(den: ComfyDenoiser):
    """ComfyUI's latent previewer for this model (None when previews are off or the format has none)."""
    try:
        import latent_preview

        return latent_preview.get_previewer(den.patcher.load_device, den.patcher.model.latent_format)
    except Exception as e:  # noqa: BLE001 - no previews rather than no training
        log.debug("no latent previewer: %s", e)
        return None


def _train(den: ComfyDenoiser, problem: Problem, config: TrainConfig, node_id: str | None = None,
           names: list[str] | None = None) -> TrainResult:
    """Run the trainer with one progress-bar update per step and live "unlearn.progress" events for the front
    end's chart; Cancel raises out of the step, the rollouts and the estimates (the denoiser checks it on every
    UNet call), so nothing is returned or saved after a Cancel."""
    pbar = comfy.utils.ProgressBar(config.steps)
    previewer = _previewer(den)

    def on_event(ev: dict) -> None:
        if ev["type"] == "step":
            pbar.update(1)
        elif ev["type"] == "samples" and previewer is not None:
            # at every trajectory refresh: what the concept's prompt makes now, shown on the node like a KSampler's
            # preview (ComfyUI's own previewer: TAESD or its latent-to-RGB factors, as --preview-method says)
            try:
                preview = previewer.decode_latent_to_preview_image("JPEG", ev["samples"].float())
                pbar.update_absolute(pbar.current, config.steps, preview)
            except Exception as e:  # a preview must never stop the training
                log.debug("preview not sent: %s", e)

    live = progress_reporter(node_id, names or [])
    return Trainer(den, problem, config, callbacks=[on_event, live], should_stop=_cancel).run()


# Inputs and outputs the two training nodes share (each schema keeps its own order: saved workflows fill
# widgets_values by position).
def _model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip="The SD1.x / SD2.x / SDXL model to unlearn from.")


def _steps_rank_inputs() -> list:
    return [io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Training steps."),
            io.Int.Input("rank", default=4, min=1, max=128, tooltip="LoRA rank.")]


def _lr_input() -> io.Float.Input:
    return io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                          tooltip="Adam learning rate of the LoRA.")


def _micro_batch_input() -> io.Int.Input:
    return io.Int.Input("micro_batch", default=0, min=0, max=4096, optional=True,
                        tooltip="Samples per trained forward + backward; 0 = a whole step at once. Lower it when "
                                "training runs out of memory (large images, SDXL): the same training, the "
                                "activations of this many samples at a time, a little slower.")


def _train_outputs(summary: str) -> list:
    return [io.Model.Output(display_name="model", tooltip="The model with the unlearning LoRA applied."),
            UnlearnLoraType.Output(display_name="unlearn_lora", tooltip="The trained LoRA, for Save / Apply Unlearning LoRA."),
            io.Image.Output(display_name="curves", tooltip="Loss and λ per step."),
            io.String.Output(display_name="summary", tooltip=summary)]


class UnlearnConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Unlearn_UnlearnConcept",
            display_name="Unlearn Concept",
            category=f"{CATEGORY}/train",
            description="Trains a LoRA that makes the model stop producing a concept while staying as close as "
                        "possible to the original (constrained unlearning: RU / LU, or the ESD baseline). Returns the "
                        "model with the LoRA applied; the input MODEL is not changed.",
            inputs=[
                _model_input(),
                io.Clip.Input("clip", tooltip="The model's text encoder, used to encode the prompts."),
                io.String.Input("concept", multiline=True, default="",
                                tooltip="What to unlearn: one concept per line; several wordings of one concept "
                                        "separated by '|' (e.g. 'Van Gogh | painting by van gogh')."),
                io.String.Input("anchor", default="",
                                tooltip="What the model should produce instead (e.g. 'a painting'); empty = the "
                                        "unconditional model."),
                io.Combo.Input("method", options=list(METHODS), default="RU",
                               tooltip="RU: reverse-KL constrained (stay closest to the original); LU: likelihood "
                                       "constrained; ESD: the ESD baseline with a fixed guidance η."),
                io.Float.Input("threshold", default=1.0, min=0.001, max=1000.0, step=0.01,
                               tooltip="How far to move away from the concept: the required increase of the path KL "
                                       "(RU) or decrease of the log-ratio (LU). Ignored by ESD (it uses esd_eta)."),
                *_steps_rank_inputs(),
                io.Combo.Input("targets", options=list(TARGET_PRESETS), default="xattn",
                               tooltip="Layers that get a LoRA: xattn = cross-attention keys/values (what the text "
                                       "reaches); attn = all attention projections; all = attention + feed-forward."),
                _lr_input(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for the LoRA initialisation and the sampled trajectories. The same "
                                     "inputs and seed train the same LoRA, so re-queuing reuses the cached one; "
                                     "'randomize' / 'increment' train a new one on every queue."),
                io.Int.Input("width", default=512, min=64, max=4096, step=64,
                             tooltip="Image width the trajectories are sampled at (SDXL: 1024)."),
                io.Int.Input("height", default=512, min=64, max=4096, step=64,
                             tooltip="Image height the trajectories are sampled at (SDXL: 1024)."),
                io.Int.Input("batch", default=4, min=1, max=256,
                             tooltip="Noisy samples per concept wording and step."),
                io.Float.Input("esd_eta", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="ESD only: the negative-guidance strength η."),
                io.String.Input("keep_prompts", multiline=True, default="", optional=True,
                                tooltip="Optional: prompts whose outputs must stay unchanged, one per line."),
                io.Int.Input("trajectory_steps", default=20, min=2, max=1000, optional=True,
                             tooltip="Denoising steps of the sampled trajectories that training and the constraint "
                                     "estimates run on: more = finer estimates, proportionally slower."),
                _micro_batch_input(),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=_train_outputs("λ, thresholds and achieved constraint values."),
        )

    @classmethod
    def execute(cls, model, clip, concept: str, anchor: str, method: str, threshold: float, steps: int, rank: int,
                targets: str, learning_rate: float, seed: int, width: int, height: int, batch: int, esd_eta: float,
                keep_prompts: str = "", trajectory_steps: int = 20, micro_batch: int = 0) -> io.NodeOutput:
        concepts = parse_concepts(concept)
        if not concepts:
            raise ValueError("Unlearn Concept: 'concept' is empty — type what to unlearn, e.g. 'Van Gogh'")
        if method not in METHODS:
            raise ValueError(f"Unlearn Concept: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if width % 8 or height % 8:
            raise ValueError(f"Unlearn Concept: width and height must be multiples of 8, got {width}×{height}")
        check_model(model)
        if clip is None:
            raise ValueError("Unlearn Concept: connect the checkpoint's CLIP output to 'clip'")
        key = METHODS[method]
        problem = Problem(method=key, concepts=[ConceptSpec(concept=w, anchor=anchor) for w in concepts],
                          keep=_lines(keep_prompts), threshold=threshold,
                          fixed_weight=esd_eta if key == "esd" else None)
        config = TrainConfig(steps=steps, lr=learning_rate, batch=batch, dual_every=min(10, steps),
                             rollouts=max(2, batch // 2), rollout_jumps=trajectory_steps, refresh_every=10,
                             estimate_samples=max(4, batch), seed=seed, micro_batch=micro_batch or None)
        # ComfyUI runs nodes under inference mode; autograd needs it off (as in comfy_extras/nodes_train.py).
        with torch.inference_mode(False), torch.enable_grad():
            den = ComfyDenoiser(model, clip=clip, targets=targets, rank=rank, latent_hw=(height // 8, width // 8),
                                seed=seed)
            with den.session():
                result = _train(den, problem, config, _node_id(cls), [w[0] for w in concepts])
        md = unlearn_metadata(
            method=key, concepts=[" | ".join(w) for w in concepts], anchors=[anchor] * len(concepts),
            constraints=[{"name": w[0], "requested": result.thresholds[i], "achieved": result.final_estimates[i],
                          "lambda": result.lambdas[i]} for i, w in enumerate(concepts)],
            steps=result.steps_done, seed=seed, targets=targets)
        summary = summary_text(result, concepts)
        lora = UnlearnLora(modules=den.lora_modules(), family=den.family, layout=den.layout, metadata=md,
                           summary=summary)
        log.info("Unlearn Concept: %s", summary.replace("\n", "; "))
        return io.NodeOutput(apply_unlearn_lora(model, lora, 1.0), lora, curves_image(result), summary)


def encode_images(vae, model, images: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] in [0, 1] → the model's latent space (``vae.encode``, then the latent format's
    ``process_in``, as a sampler sees latents), float32 on the CPU where the trainer keeps its data."""
    latent = vae.encode(images[:, :, :, :3])
    return model.model.process_latent_in(latent).float().cpu().clone()


def zero_conditioning(model) -> list:
    """The unconditional input without a text encoder: zeroed context (ComfyUI's ConditioningZeroOut), plus a
    zeroed pooled output where the model needs one (SDXL)."""
    cfg = model.model.model_config.unet_config
    extra = {"pooled_output": torch.zeros(1, 1280)} if model_family(model) == "sdxl" else {}
    return [[torch.zeros(1, 77, int(cfg["context_dim"])), extra]]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _image_batch(images, what: str) -> torch.Tensor:
    if not (isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] > 0):
        raise ValueError(f"Unlearn Data: connect an IMAGE batch to '{what}' (e.g. from Load Image), got "
                         f"{type(images).__name__}")
    if images.shape[1] < 8 or images.shape[2] < 8:
        raise ValueError(f"Unlearn Data: '{what}' images are {images.shape[2]}×{images.shape[1]} pixels; the VAE "
                         "needs at least 8×8 — scale them up (e.g. with Upscale Image)")
    return images


class UnlearnData(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Unlearn_UnlearnData",
            display_name="Unlearn Data",
            category=f"{CATEGORY}/train",
            description="Trains a LoRA that makes the model forget specific images (data unlearning) while its "
                        "distribution elsewhere stays as close as possible to the original: FU (forward-KL "
                        "constrained), or the NegGrad / SISS baselines with a fixed weight. Without retain images, "
                        "the retain set is drawn from the unchanged model itself at the caption. Returns the model "
                        "with the LoRA applied; the input MODEL is not changed.",
            inputs=[
                _model_input(),
                io.Vae.Input("vae", tooltip="The model's VAE, used to encode the images into latents."),
                io.Image.Input("forget_images", tooltip="The images to forget (a batch, e.g. from Load Image)."),
                io.Combo.Input("method", options=list(DATA_METHODS), default="FU",
                               tooltip="FU: forward-KL constrained — the forget images must become unlikely by "
                                       "'threshold', with λ found by the trainer; NegGrad: retain loss − weight × "
                                       "forget loss; SISS: importance-sampled mixture with a fixed λ = weight."),
                io.Float.Input("threshold", default=0.05, min=0.001, max=1000.0, step=0.01,
                               tooltip="FU: how much worse the model must become at denoising the forget images — "
                                       "the required increase of their negative ELBO, as a fraction of its value "
                                       "under the original model (0.05 = raise it by 5 %; 1.0 = double it). "
                                       "NegGrad / SISS only report against it."),
                *_steps_rank_inputs(),
                io.Combo.Input("targets", options=list(TARGET_PRESETS), default="attn",
                               tooltip="Layers that get a LoRA: attn = all attention projections (default: images "
                                       "are not reached through the text alone); xattn = cross-attention keys/values "
                                       "(needs a CLIP); all = attention + feed-forward."),
                _lr_input(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for the LoRA initialisation, the noise draws and the retain samples. "
                                     "The same inputs and seed train the same LoRA, so re-queuing reuses the cached "
                                     "one; 'randomize' / 'increment' train a new one on every queue."),
                io.Int.Input("batch", default=4, min=1, max=256,
                             tooltip="Retain and forget samples per step (each)."),
                io.Float.Input("weight", default=0.5, min=0.0, max=0.95, step=0.01,
                               tooltip="NegGrad: the forget loss's weight w; SISS: λ (the forget share of the data "
                                       "retrains without it). Ignored by FU (it finds λ from the threshold)."),
                io.Int.Input("retain_samples", default=16, min=1, max=1024,
                             tooltip="Without retain images: how many samples of the unchanged model at the caption "
                                     "form the retain set (what the model should keep producing)."),
                io.Image.Input("retain_images", optional=True,
                               tooltip="Optional: images the model must keep (resized to the forget images' size). "
                                       "Without them the retain set is sampled from the unchanged model."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The model's text encoder, to encode the caption (and the empty prompt, the "
                                      "model's own unconditional input). Without it the conditioning is zeroed."),
                io.String.Input("caption", multiline=True, default="", optional=True,
                                tooltip="The caption the forget images go with (e.g. the prompt that made them); "
                                        "empty = unconditional. Needs the clip input."),
                io.Int.Input("timesteps", default=100, min=2, max=1000, optional=True,
                             tooltip="Noise levels used for training and for the forget-set estimate: this many "
                                     "evenly spaced levels of the model's 1000 (1000 = all of them). The estimate "
                                     "runs the UNet 5× per level and forget image: fewer = faster and coarser."),
                _micro_batch_input(),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=_train_outputs("λ, threshold and the achieved forget-set increase."),
        )

    @classmethod
    def execute(cls, model, vae, forget_images, method: str, threshold: float, steps: int, rank: int, targets: str,
                learning_rate: float, seed: int, batch: int, weight: float, retain_samples: int,
                retain_images=None, clip=None, caption: str = "", timesteps: int = 100,
                micro_batch: int = 0) -> io.NodeOutput:
        if method not in DATA_METHODS:
            raise ValueError(f"Unlearn Data: unknown method {method!r}; choose one of {', '.join(DATA_METHODS)}")
        check_model(model)
        if vae is None or not hasattr(vae, "encode"):
            raise ValueError("Unlearn Data: connect the checkpoint's VAE output to 'vae'")
        forget_images = _image_batch(forget_images, "forget_images")
        caption = (caption or "").strip()
        if clip is None and caption:
            raise ValueError("Unlearn Data: a caption needs a text encoder — connect the checkpoint's CLIP output to "
                             "'clip', or clear the caption")
        if clip is None and targets == "xattn":
            raise ValueError("Unlearn Data: without a CLIP the conditioning is zero, and cross-attention keys/values "
                             "of a zero context cannot change — connect CLIP or choose targets 'attn' or 'all'")
        key = DATA_METHODS[method]
        forget = encode_images(vae, model, forget_images)
        retain = None
        if retain_images is not None:
            retain_images = _image_batch(retain_images, "retain_images")
            h, w = forget_images.shape[1:3]
            if tuple(retain_images.shape[1:3]) != (h, w):
                retain_images = comfy.utils.common_upscale(retain_images.movedim(-1, 1), w, h, "bilinear",
                                                           "center").movedim(1, -1)
            retain = encode_images(vae, model, retain_images)
        cond = caption if clip is not None else zero_conditioning(model)
        # no polish phase: FU's primal has no fixed point at a frozen λ (see unlearn_core.unlearn.DEFAULTS)
        config = TrainConfig(steps=steps, lr=learning_rate, batch=batch, dual_every=min(10, steps),
                             estimate_samples=max(4, batch), seed=seed, polish_fraction=0.0,
                             micro_batch=micro_batch or None)
        with torch.inference_mode(False), torch.enable_grad():
            den = ComfyDenoiser(model, clip=clip, targets=targets, rank=rank, latent_hw=tuple(forget.shape[-2:]),
                                seed=seed, num_timesteps=timesteps)
            with den.session():
                if retain is None:
                    # p0 = the model itself at the caption: samples of the frozen model stand in for the retain set
                    g = torch.Generator().manual_seed(seed + 12345)
                    states, _ = rollout(den, den.encode([cond]), retain_samples, RETAIN_SAMPLE_STEPS, g,
                                        adapted=False)
                    retain = states[-1].float().cpu()
                problem = Problem(key, data=DataSpec(forget=forget, retain=retain, cond=cond), threshold=threshold,
                                  threshold_mode="multiple", fixed_weight=None if key == "fu" else weight,
                                  lam_max=FU_LAM_MAX if key == "fu" else None)
                result = _train(den, problem, config, _node_id(cls), ["forget"])
        name = f"forget set ({_count(len(forget), 'image')})"
        md = unlearn_metadata(
            method=key, concepts=[name], anchors=[caption],
            constraints=[{"name": "forget", "requested": result.thresholds[0], "achieved": result.final_estimates[0],
                          "lambda": result.lambdas[0], "units": "forget-set NELBO increase"}],
            steps=result.steps_done, seed=seed, targets=targets,
            extra={"data": {"forget_images": len(forget), "retain_images": len(retain),
                            "retain_from_model": retain_images is None, "caption": caption, "timesteps": timesteps}})
        summary = (f"method {method}: {result.steps_done} steps in {result.seconds:.1f} s\n"
                   f"{name}: λ = {result.lambdas[0]:.4g}, required NELBO increase {result.thresholds[0]:.4g} "
                   f"({threshold:g}× its original value {result.separation[0]:.4g}), achieved "
                   f"{result.final_estimates[0]:.4g}; retain set: "
                   + (_count(len(retain), "image") if retain_images is not None else
                      f"{_count(len(retain), 'sample')} of the unchanged model"))
        lora = UnlearnLora(modules=den.lora_modules(), family=den.family, layout=den.layout, metadata=md,
                           summary=summary)
        log.info("Unlearn Data: %s", summary.replace("\n", "; "))
        return io.NodeOutput(apply_unlearn_lora(model, lora, 1.0), lora, curves_image(result), summary)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,127}")


def safe_lora_name(name: str) -> str:
    """A plain file name inside the loras folder (``.safetensors`` added); anything path-like is refused."""
    n = (name or "").strip()
    if not n:
        raise ValueError("Save Unlearning LoRA: the file name is empty — type a name such as 'no_van_gogh'")
    if "/" in n or "\\" in n or ".." in n or Path(n).is_absolute() or ":" in n or "\0" in n:
        raise ValueError(f"Save Unlearning LoRA: {name!r} is not a plain file name — no folders, '..', drive letters "
                         "or absolute paths; the file always goes into models/loras")
    if not _SAFE_NAME.fullmatch(n):
        raise ValueError(f"Save Unlearning LoRA: {name!r} has characters that are not allowed — use letters, digits, "
                         "spaces, '_', '-' and '.', starting with a letter or digit")
    return n if n.lower().endswith(".safetensors") else n + ".safetensors"


def loras_dir() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


# ---------------------------------------------------------------------------------------------------- caching
# ComfyUI reuses a node's cached outputs while its cache key is unchanged: its constant inputs, its ancestors' keys
# and what ``fingerprint_inputs`` returns (computed before the prompt runs, from constant inputs only — linked
# inputs arrive as None). The trainers are deterministic in their inputs and seed, so a cached LoRA is the LoRA a
# re-run would train: they define no fingerprint. Save and Apply also depend on a file, which the key cannot see;
# their fingerprints below make a change on disk a change of the key.
_ALWAYS_RUN = float("nan")  # NaN ≠ NaN: a key holding it never matches an earlier one
_INTACT = "intact"  # Save: the target is what this node leaves behind (not written yet, or as it wrote it)
_HEADER_CAP = 1 << 20


def _stat_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _header_digest(path: Path) -> str:
    """SHA-256 of a .safetensors file's header (its JSON: names, shapes, offsets, the unlearn.* metadata), or of the
    first MiB of any other file: catches a same-size replacement within the file system's mtime granularity."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        rest = f.read(n if 0 < n <= _HEADER_CAP else _HEADER_CAP - len(head))
    return hashlib.sha256(head + rest).hexdigest()


def lora_file_fingerprint(path: str | Path) -> tuple | float:
    """What Apply's cache key sees of a LoRA file: mtime, size and header digest (a missing file: always re-run,
    so that the node reports it)."""
    path = Path(path)
    sig = _stat_signature(path)
    if sig is None:
        return _ALWAYS_RUN
    return sig[0], sig[1], _header_digest(path)


class _SavedFile:
    """A file Save wrote in this server process: its stat right after the write, the UNLEARN_LORA written (weakly:
    the cache holds the LoRA, this record must not) and the dtype."""

    def __init__(self, path: Path, lora: UnlearnLora, dtype: str):
        self.signature, self.lora, self.dtype = _stat_signature(path), weakref.ref(lora), dtype

    def holds(self, path: Path, lora: UnlearnLora, dtype: str) -> bool:
        return self.signature == _stat_signature(path) and self.lora() is lora and self.dtype == dtype


_SAVED: dict[Path, _SavedFile] = {}


def save_fingerprint(filename: str) -> str | tuple | float:
    """Save's cache-key part: :data:`_INTACT` while the target file is absent and never written, or exactly as this
    process wrote it (so an identical re-queue is a cache hit); always-run once a written file has vanished (so it is
    written again); the file's stat while it is someone else's (a changed file is a changed key)."""
    try:
        path = loras_dir() / safe_lora_name(filename)
    except ValueError:
        return _ALWAYS_RUN  # execute reports the bad name
    sig, saved = _stat_signature(path), _SAVED.get(path)
    if sig is None:
        return _INTACT if saved is None else _ALWAYS_RUN
    if saved is not None and saved.signature == sig:
        return _INTACT
    return "file", *sig


class SaveUnlearningLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Unlearn_SaveUnlearningLora",
            display_name="Save Unlearning LoRA",
            category=f"{CATEGORY}/lora",
            description="Saves an unlearning LoRA into models/loras as a kohya-format .safetensors file with its "
                        "unlearning metadata (method, concepts, λ, thresholds). Never overwrites unless asked. "
                        "Re-queuing the same workflow reuses the result while the file is as saved; a deleted or "
                        "replaced file makes the node run again (the trained LoRA itself stays cached).",
            is_output_node=True,
            inputs=[
                UnlearnLoraType.Input("unlearn_lora", tooltip="The LoRA from Unlearn Concept."),
                io.String.Input("filename", default="unlearned",
                                tooltip="File name only (no folders); '.safetensors' is added."),
                io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="Precision of the saved weights."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name (off: refuse)."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="The saved file's name in models/loras.")],
        )

    @classmethod
    def execute(cls, unlearn_lora: UnlearnLora, filename: str, dtype: str, overwrite: bool) -> io.NodeOutput:
        if not isinstance(unlearn_lora, UnlearnLora):
            raise ValueError("Save Unlearning LoRA: connect the unlearn_lora output of Unlearn Concept")
        name = safe_lora_name(filename)
        path = loras_dir() / name
        saved = _SAVED.get(path)
        if saved is not None and saved.holds(path, unlearn_lora, dtype):
            # a re-run after the cache forgot this node (e.g. it ran on another key in between): the file already
            # holds this very LoRA, so writing it again would not be an overwrite and refusing would be wrong
            log.info("Save Unlearning LoRA: models/loras/%s already holds this LoRA", name)
        else:
            if path.exists() and not overwrite:
                raise FileExistsError(f"Save Unlearning LoRA: models/loras/{name} already exists — choose another "
                                      "name or switch 'overwrite' on")
            save_lora(path, unlearn_lora.modules, family=unlearn_lora.family, layout=unlearn_lora.layout,
                      naming="ldm", metadata=unlearn_lora.metadata, dtype=dtype, overwrite=overwrite)
            _SAVED[path] = _SavedFile(path, unlearn_lora, dtype)
        return io.NodeOutput(name, ui={"text": [f"saved models/loras/{name}"]})

    @classmethod
    def fingerprint_inputs(cls, filename: str, **_) -> str | tuple | float:
        return save_fingerprint(filename)


class ApplyUnlearningLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Unlearn_ApplyUnlearningLora",
            display_name="Apply Unlearning LoRA",
            category=f"{CATEGORY}/lora",
            description="Applies an unlearning LoRA (a connected UNLEARN_LORA, else a file from models/loras) to a "
                        "copy of the model at the given strength. Strip Unlearning LoRA removes it again. A LoRA "
                        "file replaced on disk under the same name is read again on the next queue.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is not changed; a copy is returned)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="LoRA strength: 0 = the original model, 1 = as trained."),
                io.Combo.Input("lora_name", options=[NO_FILE] + folder_paths.get_filename_list("loras"),
                               default=NO_FILE, optional=True,
                               tooltip="A LoRA file from models/loras (used when unlearn_lora is not connected)."),
                UnlearnLoraType.Input("unlearn_lora", optional=True,
                                      tooltip="A LoRA straight from Unlearn Concept (takes precedence over the file)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the LoRA applied.")],
        )

    @classmethod
    def execute(cls, model, strength: float, lora_name: str = NO_FILE, unlearn_lora: UnlearnLora | None = None
                ) -> io.NodeOutput:
        check_model(model)
        if unlearn_lora is None and (not lora_name or lora_name == NO_FILE):
            raise ValueError("Apply Unlearning LoRA: no LoRA — connect unlearn_lora or pick a file in lora_name")
        if unlearn_lora is not None:
            return io.NodeOutput(apply_unlearn_lora(model, unlearn_lora, strength))
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        return io.NodeOutput(apply_lora_file(model, load_lora(path), strength))

    @classmethod
    def fingerprint_inputs(cls, lora_name: str = NO_FILE, **_) -> str | tuple | float:
        # A file replaced under the same name must not give the model patched with the old one. (A connected
        # unlearn_lora cannot be seen here — linked inputs are None — so the file counts even then: at worst a
        # needless, cheap re-patch.)
        if not lora_name or lora_name == NO_FILE:
            return NO_FILE
        path = folder_paths.get_full_path("loras", lora_name)
        return _ALWAYS_RUN if path is None else lora_file_fingerprint(path)


class StripUnlearningLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Unlearn_StripUnlearningLora",
            display_name="Strip Unlearning LoRA",
            category=f"{CATEGORY}/lora",
            description="Returns a copy of the model without the patches added by Unlearn Concept / Apply Unlearning "
                        "LoRA; other LoRAs and patches stay. The input MODEL is not changed.",
            inputs=[io.Model.Input("model", tooltip="A model that may carry unlearning LoRAs.")],
            outputs=[io.Model.Output(display_name="model", tooltip="The model without unlearning patches.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        check_model(model)
        stripped, removed = strip_unlearn_patches(model)
        log.info("Strip Unlearning LoRA: removed %d patches", removed)
        return io.NodeOutput(stripped)


NODES: list[type[io.ComfyNode]] = [UnlearnConcept, UnlearnData, SaveUnlearningLora, ApplyUnlearningLora,
                                   StripUnlearningLora]
