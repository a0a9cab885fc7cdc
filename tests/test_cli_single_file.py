"""``unlearn --model FILE``: a single-file SD1.x checkpoint (original LDM names) converted offline against the
configs in ``unlearn_core/sd_configs/sd15``, with CLIP's tokenizer from ComfyUI's tree.

The checkpoint is the random, architecture-true SD1.5 file the real-server tests generate with ComfyUI's own classes
(2.1 GB, cached; see ``make_sd15_checkpoint.py``). The conversion is checked against ComfyUI reading the same file:
UNet, text encoder and VAE must compute the same numbers (weights of the right shapes are not enough: with the shipped
UNet config's head count edited from 8 to 4 every tensor still loads, and the UNet comparison fails by 0.48). The
refusals run on tiny fake files.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfy_env import require_comfy
from comfy_server import sd15_checkpoint
from safetensors.torch import save_file

from unlearn_core import cli, unlearn
from unlearn_core.lora import load_lora
from unlearn_core.models import find_clip_tokenizer, load_model_path


@pytest.fixture(scope="module")
def files():
    root = require_comfy()
    return sd15_checkpoint(root), root / "comfy" / "sd1_tokenizer"


@pytest.fixture(scope="module")
def model(files):
    ckpt, tok = files
    return load_model_path(ckpt, tokenizer=tok, resolution=64)


def _comfy_parts(ckpt):
    """ComfyUI's own modules for the file, as ComfyUI detects it (meta-built, then the file's tensors in fp32)."""
    import comfy.model_detection
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from make_sd15_checkpoint import VAE
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in load_file(str(ckpt)).items()}
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(detected).__name__ == "SD15"  # ComfyUI reads the file as SD1.5
    unet_cfg = {k: v for k, v in detected.unet_config.items() if k != "disable_unet_model_creation"}
    clip_cfg = json.loads((require_comfy() / "comfy" / "sd1_clip_config.json").read_text())
    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        parts = {"model.diffusion_model.": UNetModel(**unet_cfg, device="meta", operations=ops),
                 "cond_stage_model.transformer.": CLIPTextModel(clip_cfg, dtype=torch.float32, device="meta",
                                                                operations=ops),
                 "first_stage_model.": AutoencoderKL(ddconfig=VAE, embed_dim=4)}
    for prefix, module in parts.items():
        own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(own, strict=False, assign=True)
        assert not [k for k in missing if "position_ids" not in k] and not unexpected, (prefix, missing, unexpected)
        module.eval()
    return parts


@torch.no_grad()
def test_the_conversion_computes_what_comfyui_computes_from_the_same_file(files, model):
    ckpt, _ = files
    comfy = _comfy_parts(ckpt)
    torch.manual_seed(0)
    ids = model.tokenizers[0](["a photo of a cat"], padding="max_length", max_length=77,
                              return_tensors="pt").input_ids
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids for these words
    ours_h = model.text_encoders[0](ids)[0]
    theirs_h = comfy["cond_stage_model.transformer."](ids)[0]
    torch.testing.assert_close(ours_h, theirs_h, rtol=1e-4, atol=1e-4)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([981, 21])
    ctx = torch.cat([ours_h, torch.randn_like(ours_h)])
    ours = model.unet(x, t, encoder_hidden_states=ctx).sample
    theirs = comfy["model.diffusion_model."](x, t, context=ctx)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(model.vae.decode(z).sample, comfy["first_stage_model."].decode(z), rtol=1e-4,
                               atol=1e-4)


def test_unlearn_on_a_single_file_trains_and_writes_an_sd1_lora(files, tmp_path, capsys, monkeypatch):
    ckpt, tok = files
    for k, v in {"batch": 2, "keep_batch": 1, "rollouts": 1, "keep_rollouts": 1, "rollout_jumps": 2,
                 "estimate_samples": 2}.items():
        monkeypatch.setitem(unlearn.DEFAULTS, k, v)
    out = tmp_path / "out"
    rc = cli.main(["unlearn", "--model", str(ckpt), "--tokenizer", str(tok), "--resolution", "64", "--concept",
                   "a cat", "--steps", "2", "--rank", "2", "--eval-samples", "0", "--quiet", "--checkpoint-every", "0",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    lora = load_lora(out / "ru-a-cat.safetensors")
    md = lora.metadata
    assert md["unlearn.model"] == str(ckpt) and md["ss_base_model_version"] == "sd_v1"
    # SD1.5 has 16 cross-attentions; their k and v, under kohya's SD1 names (what ComfyUI, A1111 and diffusers read)
    names = set(lora.modules)
    assert len(names) == 32 and all(n.startswith("lora_unet_") and n.endswith(("attn2_to_k", "attn2_to_v"))
                                    for n in names), sorted(names)[:4]
    assert any(m.up.abs().sum() > 0 for m in lora.modules.values())  # B starts at 0: two steps moved it
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and m["constraints"][0]["requested"] > 0


def test_the_tokenizer_is_found_in_the_comfyui_tree_the_package_sits_in(files, tmp_path):
    _, tok = files
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy" / "sd1_tokenizer").mkdir(parents=True)
    for f in ("vocab.json", "merges.txt"):
        (comfy / "comfy" / "sd1_tokenizer" / f).write_bytes((tok / f).read_bytes())
    package = comfy / "custom_nodes" / "ComfyUI-Unlearn" / "unlearn_core" / "models.py"
    assert find_clip_tokenizer(search_from=package) == comfy / "comfy" / "sd1_tokenizer"
    assert find_clip_tokenizer(tok) == tok
    with pytest.raises(FileNotFoundError, match="give --tokenizer DIR"):
        find_clip_tokenizer(search_from=tmp_path / "elsewhere" / "unlearn_core" / "models.py")


def _fake(path, shapes: dict[str, tuple[int, ...]]):
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


SD1_PARTS = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
             "first_stage_model.decoder.conv_in.weight": (1, 1),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": (1,)}


@pytest.mark.parametrize("shapes, says", [
    ({**SD1_PARTS, "conditioner.embedders.0.transformer.x": (1,)}, "an SDXL checkpoint"),
    ({**SD1_PARTS, "cond_stage_model.model.x": (1,)}, "an SD2.x checkpoint"),
    ({k: v for k, v in SD1_PARTS.items() if not k.startswith("first")}, "no the VAE"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (1, 1)}, "the names look like a LoRA"),
    ({**SD1_PARTS, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "takes 9 input channels"),
    ({**SD1_PARTS, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     "1024-wide text features"),
])
def test_files_that_are_not_sd1_checkpoints_are_refused_in_one_line(files, tmp_path, capsys, shapes, says):
    _, tok = files
    ckpt = _fake(tmp_path / "model.safetensors", shapes)
    out = tmp_path / "out"
    rc = cli.main(["unlearn", "--model", str(ckpt), "--tokenizer", str(tok), "--concept", "a cat", "--quiet",
                   "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and says in err[0], err
    assert not out.exists()  # refused before the output folder is created


def test_a_pickled_checkpoint_is_read_with_weights_only_and_its_state_dict_unwrapped(files, tmp_path, capsys):
    _, tok = files
    ckpt = tmp_path / "model.ckpt"  # as the original SD releases: {"state_dict": {...}, ...}
    torch.save({"global_step": 1, "state_dict": {**{k: torch.zeros(s) for k, s in SD1_PARTS.items()},
                                                  "cond_stage_model.model.x": torch.zeros(1)}}, ckpt)
    rc = cli.main(["unlearn", "--model", str(ckpt), "--tokenizer", str(tok), "--concept", "a cat", "--quiet",
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "an SD2.x checkpoint" in err[0], err


def test_bad_tokenizer_resolution_and_unreadable_files_are_refused_in_one_line(files, tmp_path, capsys):
    ckpt, tok = files
    fake = _fake(tmp_path / "model.safetensors", SD1_PARTS)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"not a zip, not a pickle")
    out = tmp_path / "out"
    cases = [
        (["--model", str(fake), "--tokenizer", str(tmp_path)], "holds no vocab.json and merges.txt"),
        (["--model", str(fake), "--tokenizer", str(tok), "--resolution", "100"], "must be a positive multiple of 64"),
        (["--model", str(broken), "--tokenizer", str(tok)], "cannot read the checkpoint"),
        (["--model", str(pickled), "--tokenizer", str(tok)], "cannot read the checkpoint"),
        (["--resolution", "256"], "are for Stable Diffusion models"),
    ]
    for args, says in cases:
        rc = cli.main(["unlearn", "--concept", "a cat", "--quiet", "--out", str(out), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and says in err[0], (args, err)
        assert not out.exists()
