"""The node classes (ComfyUI V3 API): Unlearn Concept, Save / Apply / Strip Unlearning LoRA."""

from __future__ import annotations

import io as _bytes_io
import logging
import re
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..unlearn_core.lora import load_lora, save_lora, unlearn_metadata
from ..unlearn_core.trainer import ConceptSpec, Problem, TrainConfig, Trainer, TrainResult
from .comfy_denoiser import TARGET_PRESETS, ComfyDenoiser, check_model
from .lora_patches import UnlearnLora, apply_lora_file, apply_unlearn_lora, strip_unlearn_patches

log = logging.getLogger(__name__)

CATEGORY = "unlearning"
UnlearnLoraType = io.Custom("UNLEARN_LORA")
METHODS = {"RU": "ru", "LU": "lu", "ESD": "esd"}
NO_FILE = "(none)"


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
                io.Model.Input("model", tooltip="The SD1.x / SD2.x / SDXL model to unlearn from."),
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
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Training steps."),
                io.Int.Input("rank", default=4, min=1, max=128, tooltip="LoRA rank."),
                io.Combo.Input("targets", options=list(TARGET_PRESETS), default="xattn",
                               tooltip="Layers that get a LoRA: xattn = cross-attention keys/values (what the text "
                                       "reaches); attn = all attention projections; all = attention + feed-forward."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Adam learning rate of the LoRA."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for the LoRA initialisation and the sampled trajectories."),
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
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the unlearning LoRA applied."),
                UnlearnLoraType.Output(display_name="unlearn_lora",
                                       tooltip="The trained LoRA, for Save / Apply Unlearning LoRA."),
                io.Image.Output(display_name="curves", tooltip="Loss and λ per step."),
                io.String.Output(display_name="summary", tooltip="λ, thresholds and achieved constraint values."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concept: str, anchor: str, method: str, threshold: float, steps: int, rank: int,
                targets: str, learning_rate: float, seed: int, width: int, height: int, batch: int, esd_eta: float,
                keep_prompts: str = "") -> io.NodeOutput:
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
                             rollouts=max(2, batch // 2), rollout_jumps=20, refresh_every=10,
                             estimate_samples=max(4, batch), seed=seed)
        pbar = comfy.utils.ProgressBar(steps)

        def on_event(ev: dict) -> None:
            if ev["type"] == "step":
                pbar.update(1)  # also how Cancel reaches the loop: the hook raises when interrupted

        # ComfyUI runs nodes under inference mode; autograd needs it off (as in comfy_extras/nodes_train.py).
        with torch.inference_mode(False), torch.enable_grad():
            den = ComfyDenoiser(model, clip=clip, targets=targets, rank=rank, latent_hw=(height // 8, width // 8),
                                seed=seed)
            with den.session():
                result = Trainer(den, problem, config, callbacks=[on_event],
                                 should_stop=comfy.model_management.processing_interrupted).run()
        if result.cancelled:
            comfy.model_management.throw_exception_if_processing_interrupted()
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


class SaveUnlearningLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Unlearn_SaveUnlearningLora",
            display_name="Save Unlearning LoRA",
            category=f"{CATEGORY}/lora",
            description="Saves an unlearning LoRA into models/loras as a kohya-format .safetensors file with its "
                        "unlearning metadata (method, concepts, λ, thresholds). Never overwrites unless asked.",
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
        if path.exists() and not overwrite:
            raise FileExistsError(f"Save Unlearning LoRA: models/loras/{name} already exists — choose another name "
                                  "or switch 'overwrite' on")
        save_lora(path, unlearn_lora.modules, family=unlearn_lora.family, layout=unlearn_lora.layout, naming="ldm",
                  metadata=unlearn_lora.metadata, dtype=dtype, overwrite=overwrite)
        return io.NodeOutput(name, ui={"text": [f"saved models/loras/{name}"]})


class ApplyUnlearningLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Unlearn_ApplyUnlearningLora",
            display_name="Apply Unlearning LoRA",
            category=f"{CATEGORY}/lora",
            description="Applies an unlearning LoRA (a connected UNLEARN_LORA, else a file from models/loras) to a "
                        "copy of the model at the given strength. Strip Unlearning LoRA removes it again.",
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


NODES: list[type[io.ComfyNode]] = [UnlearnConcept, SaveUnlearningLora, ApplyUnlearningLora, StripUnlearningLora]
