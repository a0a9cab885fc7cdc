"""The ComfyUI nodes in-process (no server): a tiny SD1-style UNet built with ComfyUI's own classes, random weights.

The package is loaded the way ComfyUI loads a custom node (by path, under its own name), because ComfyUI has a
top-level module called ``nodes`` too.
"""

import dataclasses
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


# SDXL-shaped: label embedding of SDXL's pooled text output (1280) and six size embeddings (6 × 256); ComfyUI's
# SDXL config fixes 64 channels per attention head
TINY_SDXL_UNET = {**TINY_UNET, "adm_in_channels": 2816, "num_classes": "sequential", "use_linear_in_transformer": True,
                  "model_channels": 64}
POOLED_DIM = 1280


def tiny_model(seed=0, kind="sd15"):
    """A tiny random UNet in ComfyUI's classes: ``sd15`` (ε), ``sd2v`` (v-prediction, as SD2-768),
    ``sdxl`` (ComfyUI's SDXL model class: pooled output and size conditioning), ``sdxl-v`` (an SDXL v-pred)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    torch.manual_seed(seed)
    xl = kind.startswith("sdxl")
    mc = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET)) if xl else comfy.supported_models.SD15(dict(TINY_UNET))
    mc.set_inference_dtype(torch.float32, None)
    if kind == "sd2v":
        base = comfy.model_base.BaseModel(mc, model_type=comfy.model_base.ModelType.V_PREDICTION)
    else:  # SDXL's model_type() reads a "v_pred" key of the state dict
        base = mc.get_model({"v_pred": torch.tensor([])} if kind == "sdxl-v" else {})
    with torch.no_grad():  # ComfyUI zero-initialises output layers; random weights make every layer matter
        for p in base.diffusion_model.parameters():
            p.normal_(0, 0.05)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def cond(text: str, pooled: bool = False):
    """A CONDITIONING for ``text`` without a text encoder: a fixed random embedding per string (and, for SDXL, a
    fixed random pooled output as its text encoder gives)."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
    extra = {"pooled_output": torch.randn(1, POOLED_DIM, generator=g)} if pooled else {}
    return [[torch.randn(1, 4, CONTEXT_DIM, generator=g), extra]]


class FakeVae:
    """Duck-typed VAE: IMAGE [B, H, W, 3] → a 4-channel latent at 1/8 size that depends on every pixel block."""

    def encode(self, pixels):
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([x, x.mean(1, keepdim=True)], 1) * 2 - 1


def images(n, size=64, seed=0):
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


class FakeClip:
    """Duck-typed CLIP (tokenize + encode_from_tokens_scheduled) so the node runs without a real text encoder;
    ``pooled`` adds the pooled output an SDXL text encoder gives."""

    def __init__(self, pooled: bool = False):
        self.pooled = pooled

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return cond(tokens, self.pooled)


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


def _eps_of(pkg, mp, x, t, pooled=False):
    den = pkg["comfy_denoiser"].ComfyDenoiser(mp, latent_hw=tuple(x.shape[-2:]))
    den.patcher.weight_wrapper_patches = {}
    with den.session():
        return base_eps(den, x, t, den.encode([cond("a dog", pooled)]))


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


def test_micro_batch_bounds_the_trained_forwards_of_both_training_nodes(pkg, monkeypatch, record_trained_forwards):
    """``micro_batch`` reaches the trainer: no forward with gradients sees more samples than it (concept: 2
    wordings × 8 + a kept prompt's 8 samples per step; data: 4 retain + 4 forget samples per step)."""
    nodes = pkg["unlearn_nodes"]
    sizes = record_trained_forwards(sys.modules[nodes.Trainer.__module__])  # the package under test's own trainer
    for micro in (0, 3):
        sizes.clear()
        nodes.UnlearnConcept.execute(tiny_model(seed=1), FakeClip(), concept="a cat | kitten", anchor="", method="RU",
                                     threshold=0.5, steps=2, rank=1, targets="xattn", learning_rate=1e-2, seed=0,
                                     width=64, height=64, batch=8, esd_eta=1.0, keep_prompts="a dog",
                                     trajectory_steps=3, micro_batch=micro)
        assert max(sizes) == (24 if micro == 0 else 3), sizes
    seen = []
    real_predict = pkg["comfy_denoiser"].ComfyDenoiser.predict

    def predict(self, x, t, cond, adapted=True):
        if adapted and torch.is_grad_enabled():
            seen.append(len(x))
        return real_predict(self, x, t, cond, adapted)

    monkeypatch.setattr(pkg["comfy_denoiser"].ComfyDenoiser, "predict", predict)
    nodes.UnlearnData.execute(tiny_model(seed=3), FakeVae(), images(2), retain_images=images(3, seed=1),
                              clip=FakeClip(), caption="a cat", **{**DATA_KW, "batch": 4}, micro_batch=1)
    assert seen and max(seen) == 1  # FU's retain and forget samples split too


def test_unlearn_concept_updates_the_progress_bar_once_per_step(pkg, monkeypatch):
    import comfy.utils

    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda v, total, preview, node_id=None: calls.append((v, total)) if preview is None else None)
    pkg["unlearn_nodes"].UnlearnConcept.execute(
        tiny_model(), FakeClip(), concept="a cat", anchor="", method="ESD", threshold=1.0, steps=2, rank=1,
        targets="xattn", learning_rate=1e-3, seed=0, width=64, height=64, batch=2, esd_eta=1.0)
    assert calls == [(1, 2), (2, 2)]


def test_unlearn_concept_shows_a_preview_of_the_concept_at_every_refresh(pkg, monkeypatch):
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args
    from PIL import Image

    previews = []
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Auto)  # ComfyUI's default is no previews
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda v, total, preview, node_id=None: previews.append((v, preview)) if preview else None)
    pkg["unlearn_nodes"].UnlearnConcept.execute(
        tiny_model(), FakeClip(), concept="a cat", anchor="", method="ESD", threshold=1.0, steps=3, rank=1,
        targets="xattn", learning_rate=1e-3, seed=0, width=64, height=64, batch=2, esd_eta=1.0)
    assert previews, "no preview was sent"
    v, (fmt, image, max_res) = previews[0]
    assert v == 0 and fmt == "JPEG" and isinstance(image, Image.Image) and image.size == (8, 8)


def test_unlearn_concept_streams_live_progress_events_for_its_node(pkg, monkeypatch):
    import importlib
    import types

    nodes = pkg["unlearn_nodes"]
    progress = importlib.import_module(nodes.__name__.rsplit(".", 1)[0] + ".progress")
    sent = []
    monkeypatch.setattr(nodes, "progress_reporter", lambda node_id, names: progress.progress_reporter(
        node_id, names, send=lambda event, data: sent.append((event, data))))
    monkeypatch.setattr(nodes.UnlearnConcept, "hidden", types.SimpleNamespace(unique_id="17"), raising=False)
    nodes.UnlearnConcept.execute(
        tiny_model(), FakeClip(), concept="a cat", anchor="", method="RU", threshold=1.0, steps=3, rank=1,
        targets="xattn", learning_rate=1e-3, seed=0, width=64, height=64, batch=2, esd_eta=1.0)
    assert all(event == "unlearn.progress" and data["node"] == "17" for event, data in sent)
    assert sent[0][1] == {"node": "17", "reset": True, "names": ["a cat"]}
    steps = [d for _, d in sent if "loss" in d]
    assert [d["step"] for d in steps] == [0, 1, 2] and all(d["total"] == 3 for d in steps)
    duals = [d for _, d in sent if "lambda" in d]
    assert len(duals) == 1 and duals[0]["step"] == 2 and len(duals[0]["lambda"]) == len(duals[0]["slack"]) == 1


def test_progress_reporter_is_silent_without_a_node_and_survives_a_broken_socket(pkg):
    import importlib

    progress = importlib.import_module(pkg["unlearn_nodes"].__name__.rsplit(".", 1)[0] + ".progress")
    sent = []
    progress.progress_reporter(None, ["x"], send=lambda e, d: sent.append(d))({"type": "step", "step": 0, "loss": 1.0})
    assert sent == []

    def broken(event, data):
        raise ConnectionResetError("socket closed")

    report = progress.progress_reporter("3", ["x"], send=broken)
    report({"type": "step", "step": 0, "total": 1, "loss": float("nan")})  # must not raise


@pytest.mark.parametrize("bad, fix", [("../evil", "plain file name"), ("/tmp/evil", "plain file name"),
                                      ("a/b", "plain file name"), ("a\\b", "plain file name"), ("", "empty"),
                                      ("C:evil", "plain file name"), (".hidden", "not allowed"),
                                      ("..", "plain file name"), (".", "not allowed"), ("...", "plain file name"),
                                      ("   ", "empty"), ("a/../b", "plain file name"), ("/", "plain file name"),
                                      ("..\\evil", "plain file name"), ("C:\\evil", "plain file name"),
                                      ("\\\\server\\share\\x", "plain file name"), ("x\x00y", "plain file name"),
                                      ("a\nb", "not allowed"), ("ａ／ｂ", "not allowed")])
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
    # the very LoRA it wrote, re-run (e.g. after ComfyUI's cache forgot the node): already there, nothing written
    stat = (tmp_path / name).stat()
    assert nodes.SaveUnlearningLora.execute(lora, "no cats", "fp32", False).result[0] == name
    assert (tmp_path / name).stat().st_mtime_ns == stat.st_mtime_ns
    # anything else under that name is refused without overwrite: another LoRA, or the same one in another dtype
    other = _lora_for(pkg, model)
    with pytest.raises(FileExistsError, match="overwrite"):
        nodes.SaveUnlearningLora.execute(other, "no cats", "fp32", False)
    with pytest.raises(FileExistsError, match="overwrite"):
        nodes.SaveUnlearningLora.execute(lora, "no cats", "fp16", False)
    assert (tmp_path / name).stat().st_mtime_ns == stat.st_mtime_ns
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
        "Unlearn_UnlearnConcept", "Unlearn_UnlearnData", "Unlearn_SaveUnlearningLora", "Unlearn_ApplyUnlearningLora",
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


# ---------------------------------------------------------------------------------------------------- Unlearn Data
DATA_KW = dict(method="FU", threshold=0.5, steps=3, rank=2, targets="attn", learning_rate=1e-2, seed=0, batch=2,
               weight=0.5, retain_samples=3, timesteps=20)


def _capture_problems(pkg, monkeypatch):
    """Record the Problem every Trainer of the node module is built with (the data the node hands the trainer)."""
    nodes = pkg["unlearn_nodes"]
    seen = []

    class Recording(nodes.Trainer):
        def __init__(self, den, problem, *a, **k):
            seen.append(problem)
            super().__init__(den, problem, *a, **k)

    monkeypatch.setattr(nodes, "Trainer", Recording)
    return seen


def test_unlearn_data_trains_and_leaves_the_input_model_alone(pkg):
    nodes = pkg["unlearn_nodes"]
    mp = tiny_model(seed=3)
    before = {k: v.clone() for k, v in mp.model.state_dict().items()}
    out = nodes.UnlearnData.execute(mp, FakeVae(), images(2), retain_images=images(3, seed=1), clip=FakeClip(),
                                    caption="a cat", **DATA_KW)
    patched, lora, curves, summary = out.result
    assert mp.patches == {} and all(torch.equal(before[k], v) for k, v in mp.model.state_dict().items())
    assert patched is not mp and len(patched.patches) == len(lora.modules) > 0
    assert any(m.up.abs().max() > 0 for m in lora.modules.values())  # three Adam steps moved the zero-init up
    assert curves.shape[0] == 1 and curves.shape[-1] == 3
    assert summary.startswith("method FU: 3 steps") and "forget set (2 images)" in summary and "3 images" in summary
    assert lora.metadata["unlearn.method"] == "fu" and '"retain_from_model": false' in lora.metadata["unlearn.data"]


def test_unlearn_data_encodes_images_with_the_vae_and_the_latent_format(pkg, monkeypatch):
    seen = _capture_problems(pkg, monkeypatch)
    mp, forget, retain = tiny_model(), images(2), images(3, size=48, seed=1)
    pkg["unlearn_nodes"].UnlearnData.execute(mp, FakeVae(), forget, retain_images=retain, clip=FakeClip(),
                                             caption="a cat", **{**DATA_KW, "steps": 1})
    data = seen[0].data
    torch.testing.assert_close(data.forget, mp.model.process_latent_in(FakeVae().encode(forget)))
    assert data.forget.shape == (2, 4, 8, 8) and data.cond == "a cat"
    assert data.retain.shape == (3, 4, 8, 8)  # 48×48 retain images were resized to the forget images' 64×64


def test_unlearn_data_without_retain_images_samples_the_unchanged_model(pkg, monkeypatch):
    seen = _capture_problems(pkg, monkeypatch)
    node = pkg["unlearn_nodes"].UnlearnData
    kw = {**DATA_KW, "steps": 1, "retain_samples": 5}
    out = node.execute(tiny_model(), FakeVae(), images(2), clip=FakeClip(), caption="a cat", **kw)
    node.execute(tiny_model(), FakeVae(), images(2), clip=FakeClip(), caption="a cat", **kw)
    node.execute(tiny_model(), FakeVae(), images(2), clip=FakeClip(), caption="a dog", **kw)
    r1, r2, r_dog = (p.data.retain for p in seen)
    assert r1.shape == (5, 4, 8, 8) and torch.isfinite(r1).all()
    assert torch.equal(r1, r2)  # a function of the seed and the frozen model …
    assert (r1 - r_dog).abs().max() > 1e-4  # … at the caption
    assert "5 samples of the unchanged model" in out.result[3]


def test_neggrad_and_siss_train_with_the_fixed_weight(pkg):
    node = pkg["unlearn_nodes"].UnlearnData
    for method in ("NegGrad", "SISS"):
        out = node.execute(tiny_model(), FakeVae(), images(2), retain_images=images(2, seed=1), clip=FakeClip(),
                           caption="", **{**DATA_KW, "method": method, "weight": 0.3, "steps": 2})
        lora, summary = out.result[1], out.result[3]
        assert "λ = 0.3," in summary, summary
        assert lora.metadata["unlearn.method"] == method.lower()


def test_unlearn_data_without_clip_uses_zero_conditioning(pkg, monkeypatch):
    seen = _capture_problems(pkg, monkeypatch)
    out = pkg["unlearn_nodes"].UnlearnData.execute(tiny_model(), FakeVae(), images(1),
                                                   retain_images=images(1, seed=1), **{**DATA_KW, "steps": 2})
    ((ctx, extra),) = seen[0].data.cond
    assert ctx.shape == (1, 77, CONTEXT_DIM) and not ctx.any() and extra == {}
    assert any(m.up.abs().max() > 0 for m in out.result[1].modules.values())


def test_unlearn_data_bad_inputs_say_what_to_fix(pkg):
    node = pkg["unlearn_nodes"].UnlearnData
    mp = tiny_model()
    with pytest.raises(ValueError, match="caption needs a text encoder"):
        node.execute(mp, FakeVae(), images(1), caption="a cat", **DATA_KW)
    with pytest.raises(ValueError, match="choose targets 'attn' or 'all'"):
        node.execute(mp, FakeVae(), images(1), **{**DATA_KW, "targets": "xattn"})
    with pytest.raises(ValueError, match="connect an IMAGE batch to 'forget_images'"):
        node.execute(mp, FakeVae(), None, clip=FakeClip(), **DATA_KW)
    with pytest.raises(ValueError, match="at least 8×8"):
        node.execute(mp, FakeVae(), images(1, size=4), clip=FakeClip(), **DATA_KW)
    with pytest.raises(ValueError, match="connect the checkpoint's VAE"):
        node.execute(mp, None, images(1), clip=FakeClip(), **DATA_KW)
    with pytest.raises(ValueError, match="unknown method 'RU'"):
        node.execute(mp, FakeVae(), images(1), clip=FakeClip(), **{**DATA_KW, "method": "RU"})


def test_unlearn_data_updates_the_progress_bar_once_per_step(pkg, monkeypatch):
    import comfy.utils

    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda v, total, preview, node_id=None: calls.append((v, total)))
    pkg["unlearn_nodes"].UnlearnData.execute(tiny_model(), FakeVae(), images(1), retain_images=images(1, seed=1),
                                             clip=FakeClip(), **{**DATA_KW, "steps": 2})
    assert calls == [(1, 2), (2, 2)]


def test_cancel_stops_training_within_one_step(pkg, monkeypatch):
    """Cancel (ComfyUI's interrupt flag, set here by the progress hook after step 1) raises before the next UNet
    call: no further step, no final estimate, no result."""
    import comfy.model_management
    import comfy.samplers
    import comfy.utils

    calls, unet_calls, at_cancel = [], [], []
    real = comfy.samplers.calc_cond_batch

    def counting(*a, **k):
        unet_calls.append(1)
        return real(*a, **k)

    def hook(v, total, preview, node_id=None):
        calls.append(v)
        at_cancel.append(len(unet_calls))
        comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", counting)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    nodes = pkg["unlearn_nodes"]
    runs = [(nodes.UnlearnConcept, dict(clip=FakeClip(), concept="a cat", anchor="", method="RU", threshold=1.0,
                                        rank=1, targets="xattn", learning_rate=1e-3, seed=0, width=64, height=64,
                                        batch=2, esd_eta=1.0, trajectory_steps=4)),
            (nodes.UnlearnData, dict(vae=FakeVae(), forget_images=images(1), retain_images=images(1, seed=1),
                                     clip=FakeClip(), **{k: v for k, v in DATA_KW.items() if k != "steps"}))]
    try:
        for node, kw in runs:
            calls.clear(), unet_calls.clear(), at_cancel.clear()
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                node.execute(tiny_model(), steps=50, **kw)
            assert calls == [1] and len(unet_calls) == at_cancel[0] > 0
            comfy.model_management.interrupt_current_processing(False)
    finally:
        comfy.model_management.interrupt_current_processing(False)


# ---------------------------------------------------------------------------------------------------- ComfyDenoiser
def test_respaced_schedule_uses_evenly_spaced_levels_of_the_model(pkg, model):
    den = pkg["comfy_denoiser"].ComfyDenoiser(model, latent_hw=(8, 8), num_timesteps=10)
    sig = model.model.model_sampling.sigmas.float()
    idx = torch.tensor([0, 111, 222, 333, 444, 555, 666, 777, 888, 999])
    assert den.schedule.num_steps == 10
    torch.testing.assert_close(den.sigma(torch.arange(10)), sig[idx])
    torch.testing.assert_close(den.schedule.alphas_cumprod, 1 / (1 + sig[idx].double() ** 2))
    with pytest.raises(ValueError, match="num_timesteps"):
        pkg["comfy_denoiser"].ComfyDenoiser(model, latent_hw=(8, 8), num_timesteps=1)


def test_large_batches_are_split_without_changing_predictions(pkg, model, monkeypatch):
    import comfy.model_management

    den = pkg["comfy_denoiser"].ComfyDenoiser(model, latent_hw=(8, 8))
    x, t = torch.randn(5, 4, 8, 8), torch.tensor([1, 200, 400, 600, 999])
    with den.session():
        a, b = den.encode([cond("a")]), den.encode([cond("b")])
        whole = den.predict_many(x, t, [a, b], adapted=False)
        per = den.patcher.model.memory_required([2, 4, 8, 8])
        real = comfy.model_management.get_free_memory
        monkeypatch.setattr(comfy.model_management, "get_free_memory",  # room for two samples per call
                            lambda dev=None, torch_free_too=False: real(dev, True) if torch_free_too else 3 * per)
        assert den._chunk_size(x.shape, 2) == 2
        split = den.predict_many(x, t, [a, b], adapted=False)
    for w, s_ in zip(whole, split):
        torch.testing.assert_close(s_, w, rtol=1e-5, atol=1e-6)


def test_session_turns_inference_weights_into_normal_tensors_with_the_same_values(pkg):
    with torch.inference_mode():
        mp = tiny_model(seed=4)
    before = {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}
    assert all(p.is_inference() for p in mp.model.diffusion_model.parameters())
    den = pkg["comfy_denoiser"].ComfyDenoiser(mp, targets="xattn", latent_hw=(8, 8))
    assert set(den.patcher.weight_wrapper_patches) == {f"diffusion_model.{n}.weight" for n in den.adapters}
    with torch.inference_mode(False), den.session():
        pass
    assert not any(p.is_inference() for p in mp.model.diffusion_model.parameters())
    assert all(torch.equal(before[k], v) for k, v in mp.model.diffusion_model.state_dict().items())


# ------------------------------------------------------------------------- SD2-v and SDXL: the same path, checked
@pytest.mark.parametrize("kind", ["sd15", "sd2v", "sdxl", "sdxl-v"])
def test_epsilon_is_what_the_raw_unet_predicts_for_every_parameterisation(pkg, kind):
    """ε from the denoiser against the UNet called by hand: the VP input x_t, timestep t, the text embedding as
    context and, for SDXL, y = [pooled output, embeddings of (height, width, crop 0, 0, height, width)] at the
    sampled size in pixels. A v-model's output v gives ε = √ᾱ v + √(1−ᾱ) x_t."""
    mp = tiny_model(seed=4, kind=kind)
    xl = kind.startswith("sdxl")
    assert pkg["comfy_denoiser"].model_family(mp) == ("sdxl" if xl else "demo")
    den = pkg["comfy_denoiser"].ComfyDenoiser(mp, latent_hw=(8, 6))  # not square: height and width not swapped
    x_t, t = torch.randn(3, 4, 8, 6), torch.tensor([5, 400, 990])
    c = cond("a cat", pooled=xl)
    with den.session():
        got = den.predict(x_t, t, den.encode([c]), adapted=False)
        if xl:  # the pooled output reaches the UNet: another one, another ε
            other = [[c[0][0], {"pooled_output": torch.zeros(1, POOLED_DIM)}]]
            assert (den.predict(x_t, t, den.encode([other]), adapted=False) - got).abs().max() > 1e-4
    kw = {}
    if xl:
        sizes = torch.tensor([64.0, 48.0, 0.0, 0.0, 64.0, 48.0])
        kw["y"] = torch.cat([c[0][1]["pooled_output"], mp.model.embedder(sizes).reshape(1, -1)], 1).expand(3, -1)
    with torch.no_grad():
        out = mp.model.diffusion_model(x_t, t.float(), context=c[0][0].expand(3, -1, -1), **kw)
    a = den.schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    want = out if kind in ("sd15", "sdxl") else a.sqrt() * out + (1 - a).sqrt() * x_t
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd2v", "sdxl"])
def test_unlearn_concept_trains_sd2v_and_sdxl_and_the_saved_lora_loads_in_comfyuis_loader(pkg, kind, tmp_path,
                                                                                          monkeypatch, caplog):
    """Train through the node (SDXL: pooled output and sizes from process_conds), save, load the file with the
    stock LoraLoader's function: every key lands, nothing "not loaded", and the model it patches predicts what
    the node's own MODEL output predicts."""
    import logging

    import comfy.sd
    import comfy.utils

    nodes, xl = pkg["unlearn_nodes"], kind == "sdxl"
    mp = tiny_model(seed=5, kind=kind)
    before = {k: v.clone() for k, v in mp.model.state_dict().items()}
    patched, lora, _, summary = nodes.UnlearnConcept.execute(
        mp, FakeClip(pooled=xl), concept="a cat | kitten", anchor="", method="RU", threshold=0.5, steps=3, rank=2,
        targets="attn", learning_rate=1e-2, seed=0, width=48, height=64, batch=2, esd_eta=1.0,
        keep_prompts="a dog").result
    assert lora.family == ("sdxl" if xl else "demo") and "RU" in summary
    assert any(m.up.abs().max() > 0 for m in lora.modules.values())  # three Adam steps moved the zero-init up
    assert mp.patches == {} and all(torch.equal(before[k], v) for k, v in mp.model.state_dict().items())
    assert len(patched.patches) == len(lora.modules)
    # three small steps barely move this random net's ε (~1e-5); scaled up, a wrong key or orientation shows
    loud = dataclasses.replace(lora, modules={n: dataclasses.replace(m, up=m.up * 300) for n, m in lora.modules.items()})
    monkeypatch.setattr(nodes, "loras_dir", lambda: tmp_path)
    name = nodes.SaveUnlearningLora.execute(loud, f"no cats {kind}", "fp32", False).result[0]
    with caplog.at_level(logging.WARNING):
        stock, _ = comfy.sd.load_lora_for_models(mp, None, comfy.utils.load_torch_file(str(tmp_path / name)), 1.0,
                                                 1.0)
    assert "not loaded" not in caplog.text and len(stock.patches) == len(lora.modules)
    x, t = torch.randn(2, 4, 8, 6), torch.tensor([100, 800])
    base = _eps_of(pkg, mp, x, t, pooled=xl)
    ours = _eps_of(pkg, nodes.ApplyUnlearningLora.execute(mp, 1.0, unlearn_lora=loud).result[0], x, t, pooled=xl)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(_eps_of(pkg, stock, x, t, pooled=xl), ours, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_clip", [True, False])
def test_unlearn_data_trains_sdxl_with_a_caption_or_the_zeroed_pooled_output(pkg, with_clip):
    nodes = pkg["unlearn_nodes"]
    mp = tiny_model(seed=6, kind="sdxl")
    _, lora, _, summary = nodes.UnlearnData.execute(
        mp, FakeVae(), images(2), retain_images=images(2, seed=1), clip=FakeClip(pooled=True) if with_clip else None,
        caption="a cat" if with_clip else "", **DATA_KW).result
    assert lora.family == "sdxl" and "FU" in summary
    assert any(m.up.abs().max() > 0 for m in lora.modules.values())
