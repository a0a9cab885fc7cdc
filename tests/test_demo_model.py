"""The embedded demo model: loads offline, samples deterministically, and draws what it is asked to draw."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from unlearn_core.demo import DIGIT_WORDS, MAIN_TEMPLATE, STYLES, caption, load_demo_model, load_judge
from unlearn_core.demo.data import load_demo_data
from unlearn_core.demo.model import WEIGHTS_DIR


class _NoNetwork(socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access attempted while loading the demo model")


@pytest.fixture(scope="module")
def offline_model_and_judge():
    """Model and judge loaded with sockets disabled and the hub offline; encoding a prompt included."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket, "socket", _NoNetwork)
        model = load_demo_model()
        model.encode(["", "a handwritten digit three"])
        judge = load_judge()
    return model, judge


def test_model_and_judge_load_without_network(offline_model_and_judge):
    model, judge = offline_model_and_judge
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert model.unet.config.cross_attention_dim == 384
    assert any(name.endswith("attn2.to_k") for name, _ in model.unet.named_modules())
    assert judge.predict_digit(torch.zeros(2, 16, 16)).shape == (2,)


def test_encode_masks_padding_and_empty_prompt_is_two_tokens(offline_model_and_judge):
    model, _ = offline_model_and_judge
    hidden, mask = model.encode(["", "a handwritten digit three"])
    assert hidden.shape == (2, mask.shape[1], 384)
    assert mask[0].sum() == 2  # [CLS] [SEP]
    assert mask[1].sum() == 7  # [CLS] a hand ##written digit three [SEP]
    assert torch.all(hidden[0, 2:] == 0)


def test_shipped_weights_are_a_few_megabytes():
    size = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    assert size < 8 * 2**20


def test_sampling_is_deterministic_under_a_seed(offline_model_and_judge):
    model, _ = offline_model_and_judge
    a = model.sample("a handwritten digit five", n=3, seed=7, steps=8)
    b = model.sample("a handwritten digit five", n=3, seed=7, steps=8)
    c = model.sample("a handwritten digit five", n=3, seed=8, steps=8)
    assert a.shape == (3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


def test_per_prompt_seeds_give_each_prompt_its_own_samples_in_one_batched_call(offline_model_and_judge):
    model, _ = offline_model_and_judge
    prompts = ["a handwritten digit two", "a handwritten digit five"]
    together = model.sample(prompts, n=2, seeds=[11, 12], steps=5)
    alone = torch.cat([model.sample([p], n=2, seed=s, steps=5) for p, s in zip(prompts, (11, 12))])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one per prompt"):
        model.sample(prompts, n=2, seeds=[11])


def test_judge_is_accurate_on_real_digits_it_never_saw():
    judge = load_judge()
    data = load_demo_data("diffusion")  # the judge trains on the held-out split only
    assert (judge.predict_digit(data.images) == data.digits).float().mean() > 0.97
    assert (judge.predict_style(data.images) == data.styles).float().mean() > 0.98


def test_judge_recognises_sampled_digits(offline_model_and_judge):
    """A small version of the acceptance bar (the full one: `python -m unlearn_core.demo.evaluate`)."""
    model, judge = offline_model_and_judge
    n = 4
    prompts = [caption(MAIN_TEMPLATE, d) for d in range(len(DIGIT_WORDS))]
    imgs = model.sample(prompts, n=n, seed=0)
    target = torch.arange(10).repeat_interleave(n)
    accuracy = (judge.predict_digit(imgs) == target).float().mean()
    assert accuracy >= 0.8  # the full evaluation measures ~0.9+; 40 samples leave ±0.05 of noise


def test_judge_recognises_sampled_style(offline_model_and_judge):
    model, judge = offline_model_and_judge
    prompts = [caption(MAIN_TEMPLATE, d, "inverted") for d in (1, 4, 7)]
    imgs = model.sample(prompts, n=4, seed=1)
    assert (judge.predict_style(imgs) == STYLES.index("inverted")).float().mean() >= 0.8


def test_sample_command_writes_pngs_and_array(tmp_path):
    from unlearn_core.demo.sample import main

    assert main(["--prompt", "the number 7", "-n", "3", "--out", str(tmp_path), "--steps", "6"]) == 0
    arr = np.load(tmp_path / "samples.npy")
    assert arr.shape == (3, 16, 16) and arr.dtype == np.float32
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    assert len(list(tmp_path.glob("*.png"))) == 3
