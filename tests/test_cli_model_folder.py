"""``unlearn --model FOLDER`` on diffusers Stable Diffusion folders: tiny, randomly initialised SD1.x-like,
SD2.x-like (v-prediction) and SDXL-like pipelines saved with ``save_pretrained`` — no real weights, no network.

These check the plumbing (loading offline, latents, v-prediction, SDXL's added conditioning, the LoRA's kohya
keys and metadata, FU on VAE-encoded images, one-line refusals); they say nothing about erasure quality.
"""

from __future__ import annotations

import json

import pytest
import torch

from unlearn_core import cli, unlearn
from unlearn_core.lora import load_lora

WORDS = ("a", "cat", "dog", "photo", "of", "the", "painting")
MAX_LEN = 12  # tokens (real CLIP: 77)


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    for k, v in {"batch": 4, "keep_batch": 2, "rollouts": 1, "keep_rollouts": 1, "rollout_jumps": 3,
                 "estimate_samples": 4, "fu_retain_samples": 4, "fu_batch": 4}.items():
        monkeypatch.setitem(unlearn.DEFAULTS, k, v)


def _tokenizer(tmp):
    """A CLIP BPE tokenizer from a tiny vocab.json / merges.txt (characters and a few whole words)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for w in WORDS:  # merge each word left to right so that it becomes one token
        cur = w[0]
        for i, ch in enumerate(w[1:], 1):
            nxt = ch + ("</w>" if i == len(w) - 1 else "")
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=MAX_LEN)


def _text_encoder(vocab_size, width, with_projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_LEN, projection_dim=width,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def build_folder(root, kind: str):
    """Save a tiny random pipeline of ``kind`` ("sd1": ε, PNDM; "sd2v": v-prediction, DDIM, linear projections;
    "sdxl": two text encoders, pooled text + size ids, Euler) into ``root`` and return it."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(root.parent)  # the vocabulary files live beside the folder; save_pretrained writes its own
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=8)  # 8 px ⇄ 4×4×4 latents
    unet_kw = dict(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=8)
    sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if kind == "sdxl":
        te1, te2 = _text_encoder(len(tok), 16), _text_encoder(len(tok), 16, with_projection=True)
        unet = UNet2DConditionModel(**unet_kw, cross_attention_dim=32, addition_embed_type="text_time",
                                    addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4,
                                    use_linear_projection=True)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=EulerDiscreteScheduler(**sched_kw))
    else:
        te = _text_encoder(len(tok), 16)
        unet = UNet2DConditionModel(**unet_kw, cross_attention_dim=16, use_linear_projection=kind == "sd2v")
        sched = (PNDMScheduler(**sched_kw, skip_prk_steps=True, set_alpha_to_one=False) if kind == "sd1" else
                 DDIMScheduler(**sched_kw, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd")
    return {kind: build_folder(base / kind, kind) for kind in ("sd1", "sd2v", "sdxl")}


def _run(*args, eval_samples=0):
    return cli.main(["unlearn", *args, "--steps", "2", "--eval-samples", str(eval_samples), "--quiet",
                     "--checkpoint-every", "0"])


@pytest.mark.parametrize("kind", ["sd1", "sd2v", "sdxl"])
def test_concept_unlearning_on_a_diffusers_folder(folders, kind, tmp_path, capsys, monkeypatch):
    from unlearn_core.models import StableDiffusionModel

    out = tmp_path / "out"
    grids = kind == "sd1"  # before/after sample sheets decoded through the VAE (no judge: no metrics)
    sample = StableDiffusionModel.sample  # 5 sampler steps for the sheets, not 50 (rollouts still start at 981)
    monkeypatch.setattr(StableDiffusionModel, "sample", lambda self, *a, **k: sample(self, *a, **{**k, "steps": 5}))
    rc = _run("--model", str(folders[kind]), "--concept", "a cat", "--keep", "a dog", "--out", str(out),
              eval_samples=2 if grids else 0)
    assert rc == 0, capsys.readouterr().err
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lora = out / "ru-a-cat.safetensors"
    assert line["lora"] == str(lora) and lora.is_file()
    md = load_lora(lora).metadata
    assert md["unlearn.method"] == "ru" and json.loads(md["unlearn.concepts"]) == ["a cat"]
    assert md["unlearn.model"] == str(folders[kind])
    # kohya SD1/SD2 names: diffusers module paths with "." → "_", k/v of every cross-attention (the tiny SDXL-like
    # UNet is not the SDXL architecture, so it too is written under diffusers names, not SDXL's LDM ones)
    names = {k.split(".")[0] for k in _keys(lora)}
    assert names == {f"lora_unet_{b}_transformer_blocks_0_attn2_to_{kv}" for kv in "kv"
                     for b in ("down_blocks_0_attentions_0", "mid_block_attentions_0", "up_blocks_1_attentions_0",
                               "up_blocks_1_attentions_1")}
    m = json.loads((out / "metrics.json").read_text())
    assert "evaluation" not in m and m["keep"] == ["", "a dog"] and m["steps"] == 2
    html = (out / "report.html").read_text()
    sheets = [f"samples_{g}_{t}.png" for g in ("erased", "retained") for t in ("before", "after")]
    for png in ["training.png", "constraints.png", *(sheets if grids else [])]:
        assert png in html and (out / png).stat().st_size > 1000
    assert grids or not list(out.glob("samples_*.png"))
    assert "Metrics (judge" not in html


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())


def test_data_unlearning_encodes_the_forget_images_with_the_vae(folders, tmp_path, capsys):
    from PIL import Image

    forget = tmp_path / "forget"
    forget.mkdir()
    for i, color in enumerate(((200, 30, 30), (30, 30, 200))):  # 20 px: resized to 8 px, VAE-encoded to 4×4×4
        Image.new("RGB", (20, 20), color).save(forget / f"{i}.png")
    out = tmp_path / "fu"
    rc = _run("--model", str(folders["sd1"]), "--forget", str(forget), "--caption", "a photo", "--out", str(out))
    assert rc == 0, capsys.readouterr().err
    md = load_lora(out / "fu-forget-forget.safetensors").metadata
    assert md["unlearn.method"] == "fu"
    m = json.loads((out / "metrics.json").read_text())
    (c,) = m["constraints"]
    assert c["requested"] > 0 and "evaluation" not in m


def test_model_space_is_latents_and_samples_are_decoded(folders):
    from unlearn_core.diffusers_denoiser import DiffusersDenoiser
    from unlearn_core.models import load_diffusers_folder
    from unlearn_core.unlearn import sampler_start

    m = load_diffusers_folder(folders["sd2v"])
    assert m.scheduler.config.prediction_type == "v_prediction" and m.image_size == 8
    assert m.images_to_model_space(torch.zeros(2, 3, 8, 8)).shape == (2, 4, 4, 4)
    lat = m.sample_latents("a cat", n=2, seed=1, steps=3, guidance=1.0)
    assert lat.shape == (2, 4, 4, 4) and torch.equal(lat, m.sample_latents("a cat", n=2, seed=1, steps=3, guidance=1.0))
    img = m.sample(["a cat", "a dog"], n=1, steps=2)
    assert img.shape == (2, 3, 8, 8) and 0 <= img.min() and img.max() <= 1
    assert sampler_start(m) == 981  # DDIM, 50 leading steps, offset 1: where the rollouts start
    hidden, mask = m.encode(["a cat", ""])
    assert hidden.shape == (2, MAX_LEN, 16) and mask is None
    assert DiffusersDenoiser(m.unet, m.scheduler, encoder=m.encode).prediction_type == "v_prediction"
    xl = load_diffusers_folder(folders["sdxl"])
    hidden, mask, added = xl.encode(["a cat", ""])
    assert hidden.shape == (2, MAX_LEN, 32) and added["text_embeds"].shape == (2, 16)
    assert added["time_ids"].tolist()[0] == [8, 8, 0, 0, 8, 8]
    assert not hidden[1].any() and not added["text_embeds"][1].any()  # SDXL: force_zeros_for_empty_prompt


def _one_line_error(capsys, *args):
    rc = cli.main(["unlearn", "--concept", "a cat", "--steps", "1", "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --model"), err
    return err[0]


def test_bad_model_paths_are_one_line_errors(folders, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    assert "does not exist" in _one_line_error(capsys, "--model", str(tmp_path / "nope"), *out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no model_index.json" in _one_line_error(capsys, "--model", str(empty), *out)
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    msg = _one_line_error(capsys, "--model", str(ckpt), *out)  # single files: tests/test_cli_single_file.py
    assert "cannot read the checkpoint" in msg
    assert "--tokenizer is for single-file checkpoints" in _one_line_error(
        capsys, "--model", str(folders["sd1"]), "--tokenizer", str(tmp_path), *out)
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    msg = _one_line_error(capsys, "--model", str(other), *out)
    assert "FluxPipeline is not supported" in msg and "SD1.x" in msg and "SDXL" in msg
    assert not (tmp_path / "out").exists()  # refused before the output folder was created
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((folders["sd1"] / "model_index.json").read_text())
    for name in ("vae", "scheduler", "tokenizer", "text_encoder"):
        (broken / name).symlink_to(folders["sd1"] / name)
    assert "no unet/ component" in _one_line_error(capsys, "--model", str(broken), *out)
