"""The embedded demo model: a small text-to-image diffusion model on 16×16 digits, and its judge.

    from unlearn_core.demo import load_demo_model, load_judge
    model = load_demo_model()                       # UNet2DConditionModel + DDPMScheduler + frozen MiniLM
    imgs = model.sample("a handwritten digit three", n=8, seed=0)   # [8, 16, 16] in [0, 1]
    load_judge().predict_digit(imgs)                 # tensor of digit labels

Rebuild with ``python -m unlearn_core.demo.build``; score with ``python -m unlearn_core.demo.evaluate``.
"""

from .data import DIGIT_WORDS, HELDOUT_TEMPLATES, MAIN_TEMPLATE, STYLES, TRAIN_TEMPLATES, caption
from .judge import Judge, load_judge
from .model import DemoModel, SamplerSettings, load_demo_model

__all__ = [
    "DIGIT_WORDS",
    "STYLES",
    "TRAIN_TEMPLATES",
    "HELDOUT_TEMPLATES",
    "MAIN_TEMPLATE",
    "caption",
    "DemoModel",
    "SamplerSettings",
    "load_demo_model",
    "Judge",
    "load_judge",
]
