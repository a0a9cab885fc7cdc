"""The demo's judge: a small CNN that names the digit and the style of a 16×16 image.

Trained only on held-out real images (the ``heldout`` split, which the diffusion model never sees) and scored
on the ``diffusion`` split (which the judge never sees); used only to evaluate generated images, never to train
the generator.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DIGIT_WORDS, STYLES, load_demo_data

__all__ = ["JudgeNet", "Judge", "train_judge", "save_judge", "load_judge", "JUDGE_FILE"]

log = logging.getLogger(__name__)

JUDGE_FILE = "judge.safetensors"
JUDGE_INFO = "judge.json"


class JudgeNet(nn.Module):
    """Three convs and two linear heads (10 digits, len(STYLES) styles); input ``[N, 1, 16, 16]`` in [0, 1]."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(),
            nn.Dropout(0.2),
        )
        self.digit_head = nn.Linear(128, len(DIGIT_WORDS))
        self.style_head = nn.Linear(128, len(STYLES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.digit_head(f), self.style_head(f)


class Judge:
    """``predict_digit(images)`` / ``predict_style(images)`` for images ``[N, 16, 16]`` (or ``[N, 1, 16, 16]``) in [0, 1]."""

    def __init__(self, net: JudgeNet, info: dict | None = None) -> None:
        self.net = net.eval()
        self.info = info or {}

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        outs_d, outs_s = [], []
        for i in range(0, x.shape[0], 1024):
            d, s = self.net(x[i : i + 1024])
            outs_d.append(d)
            outs_s.append(s)
        return torch.cat(outs_d), torch.cat(outs_s)

    def predict_digit(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)[0].argmax(-1)

    def predict_style(self, images: torch.Tensor) -> torch.Tensor:
        """Indices into ``STYLES``."""
        return self.logits(images)[1].argmax(-1)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Shifts of up to 1 px, and a small per-image contrast jitter: generated digits are a little off-centre
    # and a little softer or harder than the scans.
    n = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(16)[None]).long()
    cols = (dx[:, None] + torch.arange(16)[None]).long()
    out = torch.stack([pad[i, 0][rows[i]][:, cols[i]] for i in range(n)]).unsqueeze(1)
    gain = 1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    mid = out.mean(dim=(2, 3), keepdim=True)
    return ((out - mid) * gain + mid).clamp(0, 1)


def train_judge(seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3) -> tuple[JudgeNet, dict]:
    """Train on ``heldout`` and score on ``diffusion``; returns the net and its accuracies on unseen images."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, test = load_demo_data("heldout"), load_demo_data("diffusion")
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    x_all = train.images.unsqueeze(1)
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        net.train()
        for i in range(0, len(train), batch_size):
            b = perm[i : i + batch_size]
            d, s = net(_augment(x_all[b], gen))
            loss = F.cross_entropy(d, train.digits[b]) + F.cross_entropy(s, train.styles[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    judge = Judge(net)
    info = {
        "train_images": len(train),
        "test_images": len(test),
        "digit_accuracy": float((judge.predict_digit(test.images) == test.digits).float().mean()),
        "digit_accuracy_per_digit": [
            round(float((judge.predict_digit(test.images[test.digits == d]) == d).float().mean()), 4)
            for d in range(len(DIGIT_WORDS))
        ],
        "style_accuracy": float((judge.predict_style(test.images) == test.styles).float().mean()),
        "seed": seed,
        "epochs": epochs,
    }
    return net.eval(), info


def save_judge(net: JudgeNet, info: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / JUDGE_FILE))
    (directory / JUDGE_INFO).write_text(json.dumps(info, indent=2) + "\n")


def load_judge(directory: str | Path | None = None) -> Judge:
    """The shipped judge (CPU, float32); never touches the network."""
    from safetensors.torch import load_file

    from .model import WEIGHTS_DIR

    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    path = directory / JUDGE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no judge at {path}; rebuild it with `python -m unlearn_core.demo.build`")
    net = JudgeNet()
    net.load_state_dict(load_file(str(path)))
    info_path = directory / JUDGE_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return Judge(net, info)
