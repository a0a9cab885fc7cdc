"""The ComfyUI nodes in-process (no server): a tiny SD1-style UNet built with ComfyUI's own classes, random weights.

The package is loaded the way ComfyUI loads a custom node (by path, under its own name), because ComfyUI has a
top-level module called ``nodes`` too.
"""

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from comfy_env import require_comfy

ROOT = Path(__file__).resolve().parents[1]
CONTEXT_DIM = 16
TINY_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
             "transformer_depth": [1, 0], "transformer_depth_output": [1, 1, 0, 0], "channel_mult": [1, 2],
             "transformer_depth_middle": 0, "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM,
             "num_heads": 4, "num_head_channels": -1}


@pytest.fixture(scope="module")
def pkg():
    require_comfy()
    name = "comfyui_unlearn_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    import importlib as il
    return {k: il.import_module(f"{name}.nodes.{k}") for k in ("comfy_denoiser", "lora_patches", "unlearn_nodes")}


def tiny_model(seed=0):
    import comfy.model_patcher
    import comfy.supported_models

    torch.manual_seed(seed)
    mc = comfy.supported_models.SD15(dict(TINY_UNET))
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({})
    with torch.no_grad():  # ComfyUI zero-initialises output layers; random weights make every layer matter
        for p in base.diffusion_model.parameters():
            p.normal_(0, 0.05)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def cond(text: str):
    """A CONDITIONING for ``text`` without a text encoder: a fixed random embedding per string."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
    return [[torch.randn(1, 4, CONTEXT_DIM, generator=g), {}]]


class FakeClip:
    """Duck-typed CLIP (tokenize + encode_from_tokens_scheduled) so the node runs without a real text encoder."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return cond(tokens)


@pytest.fixture(scope="module")
def model(pkg):
    return tiny_model()


def base_eps(den, x_t, t, c):
    """ε of the model as ComfyUI's own sampling path computes it, from the VE input x_t·√(1+σ²)."""
    import comfy.samplers

    sigma = den.sigma(t)
    s = sigma.reshape(-1, 1, 1, 1)
    x = x_t * (1 + s**2).sqrt()
    (x0,) = comfy.samplers.calc_cond_batch(den.patcher.model, [c.conds], x, sigma, den.patcher.model_options)
    return (x - x0) / s


def test_schedule_is_the_models_discrete_schedule(pkg, model):
    den = pkg["comfy_denoiser"].ComfyDenoiser(model, latent_hw=(8, 8))
    sig = model.model.model_sampling.sigmas.double()
    torch.testing.assert_close(den.schedule.alphas_cumprod, 1 / (1 + sig**2))
    # SD1's scaled-linear betas: ᾱ_0 = 1 − 0.00085
    assert den.schedule.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-5)


def test_vp_input_maps_to_comfy_input_and_eps_round_trips(pkg, model):
    """x_t = √ᾱ x0 + √(1−ᾱ) ε reaches the UNet as ComfyUI's calculate_input(σ, x0 + σε): the same tensor."""
    den = pkg["comfy_denoiser"].ComfyDenoiser(model, latent_hw=(8, 8))
    ms = model.model.model_sampling
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    x_t = den.schedule.add_noise(x0, t, eps)
    sigma = den.sigma(t)
    ve = ms.noise_scaling(sigma, eps, x0)  # ComfyUI's x = x0 + σ ε
    torch.testing.assert_close(x_t * (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), ve, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ms.calculate_input(sigma, ve), x_t, rtol=1e-5, atol=1e-5)
    assert torch.equal(ms.timestep(sigma).round().long(), t)


def test_adapter_off_is_the_base_model_exactly(pkg, model):
    den = pkg["comfy_denoiser"].ComfyDenoiser(model, targets="attn", rank=2, latent_hw=(8, 8))
    for a in den.adapters.values():  # a trained-looking adapter, so "on" differs
        torch.nn.init.normal_(a.up, std=2.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    with den.session():
        c = den.encode([cond("a cat")])
        off = den.predict(x, t, c, adapted=False)
        on = den.predict(x, t, c, adapted=True)
    ref_model = tiny_model()  # same seed, no wrappers at all
    ref = pkg["comfy_denoiser"].ComfyDenoiser(ref_model, latent_hw=(8, 8))
    ref.patcher.weight_wrapper_patches = {}
    with ref.session():
        base = base_eps(ref, x, t, ref.encode([cond("a cat")]))
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-3  # |ε| is ~0.05 in this random net; float noise is ~1e-7


def test_predict_many_equals_separate_predictions(pkg, model):
    den = pkg["comfy_denoiser"].ComfyDenoiser(model, latent_hw=(8, 8))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with den.session():
        a, b = den.encode([cond("a")]), den.encode([cond("b")])
        ea, eb = den.predict_many(x, t, [a, b], adapted=False)
        torch.testing.assert_close(ea, den.predict(x, t, a, adapted=False), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eb, den.predict(x, t, b, adapted=False), rtol=1e-5, atol=1e-5)
    assert (ea - eb).abs().max() > 1e-4


def _lora_for(pkg, model):
    lp = pkg["lora_patches"]
    den = pkg["comfy_denoiser"].ComfyDenoiser(model, rank=2, latent_hw=(8, 8))
    mods = den.lora_modules()
    for m in mods.values():
        torch.nn.init.normal_(m.up, std=2.0)
    return lp.UnlearnLora(modules=mods, family=den.family, layout=den.layout)


def _eps_of(pkg, mp, x, t):
    den = pkg["comfy_denoiser"].ComfyDenoiser(mp, latent_hw=(8, 8))
    den.patcher.weight_wrapper_patches = {}
    with den.session():
        return base_eps(den, x, t, den.encode([cond("a dog")]))


def test_apply_strength_zero_and_strip_give_the_base_model(pkg, model):
    nodes = pkg["unlearn_nodes"]
    lora = _lora_for(pkg, model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([50, 600])
    base = _eps_of(pkg, model, x, t)
    at0 = nodes.ApplyUnlearningLora.execute(model, 0.0, unlearn_lora=lora).result[0]
    at1 = nodes.ApplyUnlearningLora.execute(model, 1.0, unlearn_lora=lora).result[0]
    stripped = nodes.StripUnlearningLora.execute(at1).result[0]
    assert torch.equal(_eps_of(pkg, at0, x, t), base)
    assert (_eps_of(pkg, at1, x, t) - base).abs().max() > 1e-3  # |ε| is ~0.05 in this random net; float noise is ~1e-7
    assert torch.equal(_eps_of(pkg, stripped, x, t), base)
    assert stripped.patches == {} and at1.patches and model.patches == {}


def test_applied_patch_is_w_plus_scaled_up_down(pkg, model):
    lp = pkg["lora_patches"]
    lora = _lora_for(pkg, model)
    patched = lp.apply_unlearn_lora(model, lora, 0.5)
    name, m = next(iter(lora.modules.items()))
    key = f"diffusion_model.{name}.weight"
    w = model.model.state_dict()[key]
    import comfy.lora

    got = comfy.lora.calculate_weight(patched.patches[key], w.clone(), key)
    torch.testing.assert_close(got, w + 0.5 * m.delta(w.shape), rtol=1e-5, atol=1e-6)


def test_strip_keeps_other_patches(pkg, model):
    from comfy.weight_adapter.lora import LoRAAdapter

    lp = pkg["lora_patches"]
    key = next(k for k in model.model.state_dict() if k.endswith("attn1.to_q.weight"))
    other = model.clone()
    other.add_patches({key: LoRAAdapter(set(), (torch.zeros(32, 1), torch.zeros(1, 32), 1.0, None, None, None))}, 1.0)
    mine = lp.apply_unlearn_lora(other, _lora_for(pkg, model), 1.0)
    stripped, removed = lp.strip_unlearn_patches(mine)
    assert removed == len(_lora_for(pkg, model).modules)
    assert list(stripped.patches) == [key] and not isinstance(stripped.patches[key][0][1], lp.UnlearnLoRAAdapter)


def test_unlearn_concept_trains_and_leaves_the_input_model_alone(pkg):
    nodes = pkg["unlearn_nodes"]
    mp = tiny_model(seed=1)
    before = {k: v.clone() for k, v in mp.model.state_dict().items()}
    uuid_before, wrappers_before = mp.patches_uuid, dict(mp.weight_wrapper_patches)
    out = nodes.UnlearnConcept.execute(mp, FakeClip(), concept="a cat | kitten", anchor="an animal", method="RU",
                                       threshold=0.5, steps=3, rank=2, targets="xattn", learning_rate=1e-2, seed=0,
                                       width=64, height=64, batch=2, esd_eta=1.0, keep_prompts="a dog")
    patched, lora, curves, summary = out.result
    assert mp.patches == {} and mp.weight_wrapper_patches == wrappers_before and mp.patches_uuid == uuid_before
    assert all(torch.equal(before[k], v) for k, v in mp.model.state_dict().items())
    assert patched is not mp and len(patched.patches) == len(lora.modules) > 0
    assert any(m.up.abs().max() > 0 for m in lora.modules.values())  # three Adam steps moved the zero-init up
    assert curves.shape[0] == 1 and curves.shape[-1] == 3 and 0 <= curves.min() and curves.max() <= 1
    assert "RU" in summary and "'a cat'" in summary
    assert lora.metadata["unlearn.method"] == "ru"


def test_unlearn_concept_updates_the_progress_bar_once_per_step(pkg, monkeypatch):
    import comfy.utils

    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda v, total, preview, node_id=None: calls.append((v, total)))
    pkg["unlearn_nodes"].UnlearnConcept.execute(
        tiny_model(), FakeClip(), concept="a cat", anchor="", method="ESD", threshold=1.0, steps=2, rank=1,
        targets="xattn", learning_rate=1e-3, seed=0, width=64, height=64, batch=2, esd_eta=1.0)
    assert calls == [(1, 2), (2, 2)]


@pytest.mark.parametrize("bad, fix", [("../evil", "plain file name"), ("/tmp/evil", "plain file name"),
                                      ("a/b", "plain file name"), ("a\\b", "plain file name"), ("", "empty"),
                                      ("C:evil", "plain file name"), (".hidden", "not allowed")])
def test_save_refuses_path_like_names(pkg, bad, fix):
    with pytest.raises(ValueError, match=fix):
        pkg["unlearn_nodes"].safe_lora_name(bad)


def test_save_writes_kohya_file_and_never_overwrites(pkg, model, tmp_path, monkeypatch):
    from unlearn_core.lora import load_lora

    nodes = pkg["unlearn_nodes"]
    monkeypatch.setattr(nodes, "loras_dir", lambda: tmp_path)
    lora = _lora_for(pkg, model)
    lora.metadata = {"unlearn.method": "ru"}
    name = nodes.SaveUnlearningLora.execute(lora, "no cats", "fp32", False).result[0]
    assert name == "no cats.safetensors"
    lf = load_lora(tmp_path / name)
    assert lf.metadata["unlearn.method"] == "ru" and len(lf.modules) == len(lora.modules)
    with pytest.raises(FileExistsError, match="overwrite"):
        nodes.SaveUnlearningLora.execute(lora, "no cats", "fp32", False)
    nodes.SaveUnlearningLora.execute(lora, "no cats", "fp16", True)
    # the file round-trips into the same patches as the in-memory LoRA
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    from_file = pkg["lora_patches"].apply_lora_file(model, load_lora(tmp_path / name), 1.0)
    from_mem = pkg["lora_patches"].apply_unlearn_lora(model, lora, 1.0)
    torch.testing.assert_close(_eps_of(pkg, from_file, x, t), _eps_of(pkg, from_mem, x, t), rtol=2e-2, atol=2e-3)


def test_bad_inputs_say_what_to_fix(pkg, model):
    nodes, lp = pkg["unlearn_nodes"], pkg["lora_patches"]
    kw = dict(anchor="", method="RU", threshold=1.0, steps=1, rank=1, targets="xattn", learning_rate=1e-3, seed=0,
              width=64, height=64, batch=2, esd_eta=1.0)
    with pytest.raises(ValueError, match="'concept' is empty"):
        nodes.UnlearnConcept.execute(model, FakeClip(), concept="  \n ", **kw)
    with pytest.raises(ValueError, match="expected a MODEL"):
        nodes.UnlearnConcept.execute("not a model", FakeClip(), concept="a cat", **kw)
    with pytest.raises(ValueError, match="no LoRA — connect"):
        nodes.ApplyUnlearningLora.execute(model, 1.0)
    sdxl_lora = _lora_for(pkg, model)
    sdxl_lora.family = "sdxl"
    with pytest.raises(ValueError, match="trained for SDXL but the model is"):
        lp.apply_unlearn_lora(model, sdxl_lora, 1.0)


def test_flow_model_is_refused_with_a_fix(pkg):
    import comfy.model_sampling

    mp = tiny_model()
    mp.model.model_sampling = type("MS", (comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST),
                                   {})(None)
    with pytest.raises(ValueError, match="discrete ε- or v-prediction"):
        pkg["comfy_denoiser"].check_model(mp)


def test_extension_registers_prefixed_v3_nodes_with_tooltips(pkg):
    import asyncio

    ext = asyncio.run(sys.modules["comfyui_unlearn_under_test"].comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    assert {n.define_schema().node_id for n in nodes} == {
        "Unlearn_UnlearnConcept", "Unlearn_SaveUnlearningLora", "Unlearn_ApplyUnlearningLora",
        "Unlearn_StripUnlearningLora"}
    for n in nodes:
        s = n.define_schema()
        assert s.category.startswith("unlearning/") and s.description
        for i in s.inputs:
            assert i.tooltip, (s.node_id, i.id)
            if hasattr(i, "min") and i.__class__.__qualname__.split(".")[0] in ("Int", "Float"):
                assert i.min is not None and i.max is not None, (s.node_id, i.id)


def test_unlearn_concept_trains_a_model_loaded_under_inference_mode(pkg):
    """ComfyUI loads checkpoints and runs nodes under torch.inference_mode(); training must still work."""
    with torch.inference_mode():
        mp = tiny_model(seed=2)
        out = pkg["unlearn_nodes"].UnlearnConcept.execute(
            mp, FakeClip(), concept="a cat", anchor="", method="RU", threshold=0.5, steps=2, rank=1,
            targets="xattn", learning_rate=1e-2, seed=0, width=64, height=64, batch=2, esd_eta=1.0)
    assert any(m.up.abs().max() > 0 for m in out.result[1].modules.values())
