"""The demo's data: scikit-learn's bundled 8×8 digits, upsampled to 16×16, in three styles, with captions.

Everything here is deterministic and offline (``load_digits`` ships inside scikit-learn). Images are float
tensors in [0, 1] with ink = 1 (plain, bold) or ink = 0 (inverted); the diffusion model sees them mapped to
[-1, 1].

Captions come from templates over (digit, style). ``TRAIN_TEMPLATES`` are the only wordings the diffusion
model is trained on; ``HELDOUT_TEMPLATES`` are paraphrases it never sees, used to test that erasing or
generating "three" is about the concept and not about one string.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIGIT_WORDS",
    "STYLES",
    "TRAIN_TEMPLATES",
    "HELDOUT_TEMPLATES",
    "MAIN_TEMPLATE",
    "IMAGE_SIZE",
    "DemoData",
    "caption",
    "load_demo_data",
    "render_styles",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Style names; "plain" has no adjective in captions (so "a handwritten digit three" means a plain three).
STYLES = ("plain", "inverted", "bold")
_STYLE_ADJECTIVE = {"plain": "", "inverted": "inverted", "bold": "bold"}

# Placeholders: {word} digit word, {num} numeral, {adj} style adjective followed by a space (or nothing),
# {a} the article "a"/"an" agreeing with what follows it.
MAIN_TEMPLATE = "{a} {adj}handwritten digit {word}"
TRAIN_TEMPLATES = (
    MAIN_TEMPLATE,
    "the {adj}number {num}",
    "{adj}{word}",
    "{a} {adj}{word}",
    "{a} {adj}digit {num}",
    "{a} drawing of the {adj}digit {word}",
)
HELDOUT_TEMPLATES = (
    "{adj}{num}",
    "a picture of {a} {adj}{word}",
    "the {adj}digit {word}",
    "number {num}, {adj}handwritten",
)

IMAGE_SIZE = 16
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.3  # of the 1797 base images; the judge trains on these, the diffusion model on the rest


def caption(template: str, digit: int, style: str = "plain") -> str:
    """Fill a template: ``caption(MAIN_TEMPLATE, 3, "inverted") == "an inverted handwritten digit three"``."""
    if style not in _STYLE_ADJECTIVE:
        raise ValueError(f"unknown style {style!r}; choose one of {STYLES}")
    adj = _STYLE_ADJECTIVE[style]
    adj = adj + " " if adj else ""
    text = template.replace("{adj}", adj).replace("{word}", DIGIT_WORDS[digit]).replace("{num}", str(digit))
    while "{a} " in text:
        i = text.index("{a} ")
        following = text[i + 4 : i + 5]
        text = text[:i] + ("an " if following in "aeiou" and following else "a ") + text[i + 4 :]
    return " ".join(text.replace(" ,", ",").split()).strip(", ")


def render_styles(plain: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each style of a batch of plain images ``[N, H, W]`` in [0, 1] (ink = 1)."""
    x = plain.unsqueeze(1)
    # Bold: a 3×3 grey dilation thickens every stroke by a pixel on each side at 16×16 (a 2×2 one was too
    # subtle: the judge confused it with naturally thick plain digits ~2% of the time).
    bold = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return {"plain": plain, "inverted": 1.0 - plain, "bold": bold.squeeze(1).clamp(0, 1)}


@dataclass
class DemoData:
    """Images ``[N, 16, 16]`` in [0, 1] with their digit and style labels, for one split."""

    images: torch.Tensor
    digits: torch.Tensor
    styles: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def _base_images() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    x = F.interpolate(x.unsqueeze(1), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.squeeze(1).clamp(0, 1), torch.tensor(bunch.target, dtype=torch.long)


def split_indices(n: int, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """The fixed split of base images: ``diffusion`` (trains the generator) and ``heldout`` (trains the judge).

    The judge is scored on the ``diffusion`` images, which it never sees — the images the generator imitates.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_held = int(round(HELDOUT_FRACTION * n))
    return {"diffusion": np.sort(perm[n_held:]), "heldout": np.sort(perm[:n_held])}


def load_demo_data(split: str, styles: tuple[str, ...] = STYLES) -> DemoData:
    """One split (``"diffusion"`` or ``"heldout"``) in every requested style."""
    plain, digits = _base_images()
    idx = split_indices(len(plain))
    if split not in idx:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(idx)}")
    sel = torch.as_tensor(idx[split])
    rendered = render_styles(plain[sel])
    images, labels, style_ids = [], [], []
    for s in styles:
        images.append(rendered[s])
        labels.append(digits[sel])
        style_ids.append(torch.full((len(sel),), STYLES.index(s), dtype=torch.long))
    return DemoData(torch.cat(images), torch.cat(labels), torch.cat(style_ids))
