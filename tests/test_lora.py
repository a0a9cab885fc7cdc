"""The LoRA file: kohya-format round trip, apply/strip on a diffusers UNet, honest metadata, refusing bad files."""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import struct

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from unet_configs import SD2, SD15, SDXL, TINY, meta_unet

from unlearn_core import lora as L
from unlearn_core.lora import LoraFormatError, LoraModule

ATTN = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@pytest.fixture(scope="module")
def base_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY).eval()


@pytest.fixture(scope="module")
def adapted(base_unet):
    """(base copy, peft-adapted copy with random non-zero A and B, alpha ≠ rank so the scale matters)."""
    unet = copy.deepcopy(base_unet)
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=3.0, target_modules=ATTN, init_lora_weights=False))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return base_unet, unet


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, TINY["cross_attention_dim"], generator=g)
    return x, torch.tensor([10, 700]), ctx


def _out(unet, seed=0):
    x, t, ctx = _inputs(seed)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def _meta():
    return L.unlearn_metadata(
        method="RU", concepts=["a handwritten digit three"], anchors=["a handwritten digit"],
        constraints=[{"name": "forget", "requested": 1.5, "achieved": 1.42, "lambda": 0.31, "units": "× separation"},
                     {"name": "retain", "requested": 0.2, "achieved": 0.17, "lambda": 0.0}],
        steps=400, seed=7, targets="attn", base_model_hash="sha256:abc", evaluation={"erased_acc": 0.04, "kept_acc": 0.93},
    )


@pytest.fixture()
def saved(adapted, tmp_path):
    _, unet = adapted
    path = tmp_path / "erase-three.safetensors"
    L.save_lora(path, L.peft_lora_modules(unet), family="demo", metadata=_meta(), dtype="fp32")
    return path


# ---------------------------------------------------------------------------------------------------- round trip
def test_round_trip_fp32_gives_identical_tensors(adapted, saved):
    modules = L.peft_lora_modules(adapted[1])
    lora = L.load_lora(saved)
    assert len(lora.modules) == len(modules) == 48  # 4 transformers × (8 attention + 2 ff) + 4 × proj_in/out
    for name, m in modules.items():
        got = lora.modules[L.lora_key(name, "demo")]
        assert torch.equal(got.down, m.down) and torch.equal(got.up, m.up)
        assert got.alpha == m.alpha == 3.0


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_round_trip_half_precision_stores_the_cast_tensors(adapted, tmp_path, dtype, torch_dtype):
    modules = L.peft_lora_modules(adapted[1])
    lora = L.load_lora(L.save_lora(tmp_path / "x.safetensors", modules, family="demo", dtype=dtype))
    for name, m in modules.items():
        got = lora.modules[L.lora_key(name, "demo")]
        assert got.down.dtype == torch_dtype
        assert torch.equal(got.down, m.down.to(torch_dtype)) and torch.equal(got.up, m.up.to(torch_dtype))
        assert got.alpha == 3.0  # alpha is kept in fp32 whatever the weights' dtype


def test_round_trip_keeps_metadata_as_strings(saved):
    md = L.load_lora(saved).metadata
    for k, v in _meta().items():
        assert md[k] == v
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_network_module"] == "networks.lora"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("2", "3")
    assert md["ss_base_model_version"] == "unlearn_demo_v1" and md["ss_output_name"] == "erase-three"
    assert json.loads(md["unlearn.final_lambda"]) == {"forget": 0.31, "retain": 0.0}
    assert json.loads(md["unlearn.constraints"])[0]["achieved"] == 1.42
    assert len(md["sshs_model_hash"]) == 64


def test_file_keys_are_kohya_format(saved):
    keys = load_file(str(saved)).keys()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    alpha = load_file(str(saved))["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha"]
    assert alpha.dim() == 0
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)


def test_sdxl_files_use_sgm_names_and_sd_files_diffusers_names():
    name = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    assert L.lora_key(name, "sdxl") == "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    assert L.lora_key(name, "sd1") == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"
    # a module named the LDM way (ComfyUI's UNetModel) lands on the same file key
    assert L.lora_key("input_blocks.4.1.transformer_blocks.1.attn2.to_k", "sd1", naming="ldm") == L.lora_key(name, "sd1")


@pytest.mark.parametrize("config", [SD15, SD2, SDXL, TINY], ids=["sd15", "sd2", "sdxl", "tiny"])
def test_diffusers_and_ldm_names_are_inverse(config):
    unet = meta_unet(config)
    layout = L.UNetLayout.from_diffusers_config(unet)
    names = [n for n, _ in unet.named_parameters()]
    ldm = [L.diffusers_to_ldm(n, layout) for n in names]
    assert len(set(ldm)) == len(names)
    assert [L.ldm_to_diffusers(n, layout) for n in ldm] == names


@pytest.mark.parametrize("config,family", [(SD15, "sd1"), (SD2, "sd2"), (SDXL, "sdxl"), (TINY, "demo")])
def test_unet_family_is_recognised_from_the_config(config, family):
    assert L.unet_family(config) == family


# ---------------------------------------------------------------------------------------------------- apply / strip
@pytest.mark.parametrize("strength", [1.0, 0.5, -0.7])
def test_apply_at_strength_equals_the_adapter_scaled_by_strength(adapted, saved, strength):
    base, peft_unet = adapted
    unet = copy.deepcopy(base)
    reference = copy.deepcopy(peft_unet)
    with torch.no_grad():  # the peft model with B scaled by s is exactly W + s·ΔW
        for n, p in reference.named_parameters():
            if "lora_B" in n:
                p.mul_(strength)
    applied = L.apply_lora(unet, saved, strength)
    want, got = _out(reference), _out(unet)
    assert len(applied.originals) == 48
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - _out(base)).abs().max() > 1e-3  # and the LoRA does change the output


def test_apply_changes_each_weight_by_strength_times_delta(base_unet, saved):
    lora = L.load_lora(saved)
    unet = copy.deepcopy(base_unet)
    w0 = {k: v.clone() for k, v in unet.state_dict().items()}
    L.apply_lora(unet, lora, 0.3)
    for key, m in lora.modules.items():
        name = key[len("lora_unet_"):]
        (pname,) = [p for p in w0 if p.replace(".", "_") == name + "_weight"]
        w = unet.state_dict()[pname]
        torch.testing.assert_close(w - w0[pname], 0.3 * m.delta(w.shape), rtol=1e-5, atol=1e-6)


def test_strip_gives_back_the_exact_base_model(base_unet, saved):
    unet = copy.deepcopy(base_unet)
    applied = L.apply_lora(unet, saved, 1.0)
    L.strip_lora(applied)
    assert torch.equal(_out(unet), _out(base_unet))
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), base_unet.state_dict().values()))


def test_apply_as_a_context_strips_on_exit(base_unet, saved):
    unet = copy.deepcopy(base_unet)
    with L.apply_lora(unet, saved, 2.0):
        assert not torch.equal(_out(unet), _out(base_unet))
    assert torch.equal(_out(unet), _out(base_unet))


# ---------------------------------------------------------------------------------------------------- writing
def test_existing_file_is_not_overwritten(adapted, saved):
    before = saved.read_bytes()
    modules = L.peft_lora_modules(adapted[1])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        L.save_lora(saved, modules, family="demo", dtype="fp16")
    assert saved.read_bytes() == before
    L.save_lora(saved, modules, family="demo", dtype="fp16", overwrite=True)
    assert L.load_lora(saved).dtype == torch.float16
    assert sorted(os.listdir(saved.parent)) == [saved.name]  # no temp files left behind


def test_writing_nan_weights_is_refused(adapted, tmp_path):
    modules = dict(L.peft_lora_modules(adapted[1]))
    name = next(iter(modules))
    modules[name] = LoraModule(modules[name].down * float("nan"), modules[name].up, 2.0)
    with pytest.raises(ValueError, match="NaN"):
        L.save_lora(tmp_path / "nan.safetensors", modules, family="demo")
    assert not (tmp_path / "nan.safetensors").exists()


# ---------------------------------------------------------------------------------------------------- bad files
def _write_raw(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_torch_pickle_checkpoint_is_refused_unopened(tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, path)
    with pytest.raises(LoraFormatError, match="PyTorch zip checkpoint.*never opened"):
        L.load_lora(path)


def test_raw_pickle_is_refused_unopened(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(LoraFormatError, match="Python pickle.*never opened"):
        L.load_lora(path)


def test_truncated_file_is_refused(saved):
    blob = saved.read_bytes()
    saved.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(LoraFormatError, match="truncated"):
        L.load_lora(saved)


def test_file_cut_inside_its_header_is_refused(saved):
    saved.write_bytes(saved.read_bytes()[:200])
    with pytest.raises(LoraFormatError, match="truncated"):
        L.load_lora(saved)


def test_corrupted_header_is_refused(saved):
    blob = bytearray(saved.read_bytes())
    blob[8:12] = b"\xff\xfe{]"
    saved.write_bytes(bytes(blob))
    with pytest.raises(LoraFormatError, match="header is not valid JSON"):
        L.load_lora(saved)


def test_header_that_disagrees_with_the_data_is_refused(tmp_path):
    header = json.dumps({"lora_unet_a.lora_down.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}})
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(8))
    with pytest.raises(LoraFormatError, match=r"declares 8 bytes for shape \[2, 2\] F32"):
        L.load_lora(path)


def test_absurd_header_size_is_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(LoraFormatError, match="not a safetensors file"):
        L.load_lora(path)


def test_header_above_the_limit_is_refused(saved):
    with pytest.raises(LoraFormatError, match="above the 100-byte limit"):
        L.load_lora(saved, max_header_bytes=100)


def test_absurd_metadata_size_is_refused(tmp_path):
    path = _write_raw(tmp_path / "md.safetensors", {"lora_unet_a.lora_down.weight": torch.zeros(1, 2)},
                      {"ss_tag_frequency": "x" * (2 * 1024 * 1024)})
    with pytest.raises(LoraFormatError, match="metadata is .* bytes, above the 1048576-byte limit"):
        L.load_lora(path, max_metadata_bytes=1024 * 1024)


def test_empty_and_tiny_files_are_refused(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(LoraFormatError, match="too short"):
        L.load_lora(path)


def test_non_kohya_keys_are_refused(tmp_path):
    path = _write_raw(tmp_path / "peft.safetensors", {"unet.down_blocks.0.to_k.lora_A.weight": torch.zeros(1, 2)})
    with pytest.raises(LoraFormatError, match="not kohya LoRA keys"):
        L.load_lora(path)


def test_lycoris_files_are_named_as_such(tmp_path):
    path = _write_raw(tmp_path / "loha.safetensors", {"lora_unet_a.hada_w1_a": torch.zeros(1, 2)})
    with pytest.raises(LoraFormatError, match="LyCORIS"):
        L.load_lora(path)


def test_half_a_pair_is_refused(tmp_path):
    path = _write_raw(tmp_path / "half.safetensors", {"lora_unet_a.lora_down.weight": torch.zeros(1, 2)})
    with pytest.raises(LoraFormatError, match="needs both lora_down and lora_up"):
        L.load_lora(path)


def test_rank_mismatch_inside_a_pair_is_refused(tmp_path):
    path = _write_raw(tmp_path / "rank.safetensors", {"lora_unet_a.lora_down.weight": torch.zeros(2, 4),
                                                      "lora_unet_a.lora_up.weight": torch.zeros(4, 3)})
    with pytest.raises(LoraFormatError, match="shape mismatch.*rank 2.*rank 3"):
        L.load_lora(path)


def test_nan_in_a_file_is_refused(tmp_path):
    path = _write_raw(tmp_path / "nan.safetensors", {"lora_unet_a.lora_down.weight": torch.full((1, 2), float("nan")),
                                                     "lora_unet_a.lora_up.weight": torch.zeros(2, 1)})
    with pytest.raises(LoraFormatError, match="NaN or inf"):
        L.load_lora(path)


def test_bad_alpha_is_refused(tmp_path):
    path = _write_raw(tmp_path / "alpha.safetensors", {"lora_unet_a.lora_down.weight": torch.zeros(1, 2),
                                                       "lora_unet_a.lora_up.weight": torch.zeros(2, 1),
                                                       "lora_unet_a.alpha": torch.tensor(-1.0)})
    with pytest.raises(LoraFormatError, match="alpha is -1.0; it must be positive"):
        L.load_lora(path)


def _family_file(tmp_path, config, family, name):
    """A rank-1 LoRA on every cross-attention k/v of a (meta-built) UNet of ``config``."""
    unet = meta_unet(config)
    mods = {}
    for n, m in unet.named_modules():
        if n.endswith(("attn2.to_k", "attn2.to_v")):
            mods[n] = LoraModule(torch.full((1, m.in_features), 0.01), torch.full((m.out_features, 1), 0.01), 1.0)
    return L.save_lora(tmp_path / name, mods, family=family)


def test_lora_for_another_family_names_both_families_and_the_match_count(tmp_path):
    path = _family_file(tmp_path, SDXL, "sdxl", "xl.safetensors")
    with pytest.raises(LoraFormatError) as e:
        L.match_lora(L.load_lora(path), meta_unet(SD15))
    msg = str(e.value)
    assert "LoRA has 140 keys made for SDXL but the model is SD1.x" in msg
    # k/v of transformer_blocks.0 in the 8 attention blocks that both layouts have at the same LDM index
    assert "16 of 140 keys match" in msg
    assert "use a LoRA trained on this model family" in msg


def test_lora_without_metadata_is_recognised_by_its_keys(tmp_path):
    path = _family_file(tmp_path, SDXL, "sdxl", "xl.safetensors")
    stripped = _write_raw(tmp_path / "bare.safetensors", load_file(str(path)))
    with pytest.raises(LoraFormatError, match="made for SDXL but the model is the ComfyUI-Unlearn demo model"):
        L.match_lora(L.load_lora(stripped), meta_unet(TINY))


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    path = _family_file(tmp_path, SD2, "sd2", "sd2.safetensors")
    with pytest.raises(LoraFormatError) as e:
        L.match_lora(L.load_lora(path), meta_unet(SD15))
    msg = str(e.value)
    assert "shape mismatch at lora_unet_" in msg and "[320, [1024]]" in msg and "[320, 768]" in msg
    assert "made for SD2.x, the model is SD1.x" in msg


def test_refused_lora_leaves_the_model_untouched(base_unet, tmp_path):
    unet = copy.deepcopy(base_unet)
    mods = L.load_lora(_family_file(tmp_path, TINY, "demo", "t.safetensors")).modules
    key = next(iter(mods))
    bad = {**{k: v for k, v in mods.items()}, key: LoraModule(torch.zeros(1, 5), mods[key].up, 1.0)}
    with pytest.raises(LoraFormatError, match="shape mismatch"):
        L.apply_lora(unet, L.LoraFile(bad), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), base_unet.state_dict().values()))


def test_text_encoder_keys_are_not_silently_dropped(base_unet, tmp_path):
    path = _family_file(tmp_path, TINY, "demo", "t.safetensors")
    sd = load_file(str(path))
    sd.update({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(1, 4),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(4, 1)})
    lora = L.load_lora(_write_raw(tmp_path / "te.safetensors", sd))
    assert len(lora.text_encoder_keys) == 2
    with pytest.raises(LoraFormatError, match="also patches the text encoder"):
        L.apply_lora(copy.deepcopy(base_unet), lora)


# ---------------------------------------------------------------------------------------------------- inspect
def test_inspect_prints_what_a_person_needs(saved, capsys):
    parser = argparse.ArgumentParser()
    L.add_subcommand(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["inspect", str(saved)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "made for:    the ComfyUI-Unlearn demo model" in out
    assert "method:     RU" in out and "a handwritten digit three" in out
    assert "forget" in out and "1.5" in out and "1.42" in out and "0.31" in out
    assert "erased_acc: 0.04" in out and "ss_network_dim: 2" in out


def test_inspect_reads_a_plain_kohya_file_without_our_metadata(tmp_path, capsys):
    path = _write_raw(tmp_path / "k.safetensors", {"lora_unet_a.lora_down.weight": torch.zeros(2, 3),
                                                   "lora_unet_a.lora_up.weight": torch.zeros(3, 2)},
                      {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    parser = argparse.ArgumentParser()
    L.add_subcommand(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["inspect", str(path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "made for:    SDXL" in out and "unlearning" not in out and "ss_network_module: networks.lora" in out


def test_model_hash_depends_on_every_weight_bit(base_unet):
    sd = {k: v.clone() for k, v in base_unet.state_dict().items()}
    h = L.model_hash(sd)
    assert h.startswith("sha256:") and h == L.model_hash(base_unet.state_dict())
    key = next(iter(sd))
    sd[key].view(-1)[0] = torch.nextafter(sd[key].view(-1)[0], torch.tensor(1e9))
    assert L.model_hash(sd) != h


def test_inspect_reports_a_bad_file_with_exit_status_2(tmp_path, capsys):
    path = tmp_path / "x.safetensors"
    path.write_bytes(pickle.dumps(1))
    parser = argparse.ArgumentParser()
    L.add_subcommand(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["inspect", str(path)])
    assert args.func(args) == 2
    assert "pickle" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- diffusers
def test_diffusers_loads_the_file_into_an_sd15_pipeline_and_reads_it_as_we_do(tmp_path):
    """diffusers' own kohya loader accepts every key and its output equals our apply_lora at strength 1."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15).eval()  # random, architecture-true SD1.5 UNet (~20 s to initialise)
    mods = {}
    g = torch.Generator().manual_seed(3)
    for n, m in unet.named_modules():
        if n.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_q", "proj_in", "ff.net.2")):
            w = m.weight
            mods[n] = LoraModule(torch.randn(4, *w.shape[1:], generator=g) * 0.05,
                                 torch.randn(w.shape[0], 4, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.05, 2.0)
    path = L.save_lora(tmp_path / "sd15.safetensors", mods, family="sd1", dtype="fp16")
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, layers_per_block=1)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=100, max_position_embeddings=77))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    emb = torch.randn(1, 77, 768, generator=g)

    def sample():  # the VAE above has scale factor 1: height=width=8 is an 8×8 latent
        return pipe(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb), height=8, width=8,
                    num_inference_steps=2, guidance_scale=3.0, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).images

    base = sample()
    applied = L.apply_lora(pipe.unet, path, 1.0)
    ours = sample()
    applied.strip()
    assert torch.equal(sample(), base)

    pipe.load_lora_weights(str(path), adapter_name="unlearn")
    from peft.tuners.lora import LoraLayer

    patched = [n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)]
    assert len(patched) == len(mods)  # every module in the file became a LoRA layer
    theirs = sample()
    assert (theirs - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-4)


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(saved):
    mode = saved.stat().st_mode & 0o777
    mask = os.umask(0o022)
    os.umask(mask)
    assert mode == 0o666 & ~mask
