"""A real ComfyUI 0.3.75 server on the CPU, with this package in its custom_nodes, driven over HTTP.

One server per module (``comfy_server.ComfyServer``: a private base directory, killed by PID at teardown), a random
but architecture-true SD1.5 checkpoint (generated once into the cache), and the workflows of ``example_workflows/``
converted from the front end's format to API prompts with tiny settings (64×64, 2 sampling steps at cfg 1, 2 training
steps — 1 for the two-concept example —, 2-step trajectories, one wording per concept, 4 noise levels for data
unlearning). Skipped only if ComfyUI cannot be obtained at all. About 7 minutes on two shared CPU cores, most of it
the SD1.5 UNet at 8×8 latents (~0.4 s per sample and call on one core), plus ~4 minutes of load test.

Also: how the nodes behave under ComfyUI's cache (an identical re-queue trains nothing; a deleted LoRA file is saved
again; a LoRA file replaced under the same name is read again), and a load test — 20 trainings queued at once on a
narrow SD1.5-detected UNet, with the server's RSS read after each.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from comfy_env import ComfyUnavailable, cache_dir, comfyui_dir
from comfy_server import CHECKPOINT, ComfyServer, messages, output_images, sd15_checkpoint
from comfy_workflow import to_api_prompt
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
NODE_IDS = ("Unlearn_UnlearnConcept", "Unlearn_UnlearnData", "Unlearn_SaveUnlearningLora",
            "Unlearn_ApplyUnlearningLora", "Unlearn_StripUnlearningLora")
# Widget values the tests override, by node type. The learning rate is large so that two Adam steps move the
# zero-initialised LoRA enough to change an 8-bit image.
TINY = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "KSampler": {"steps": 2, "cfg": 1.0},  # cfg 1: ComfyUI skips the unconditional pass
    "Unlearn_UnlearnConcept": {"steps": 2, "width": 64, "height": 64, "batch": 1, "trajectory_steps": 2,
                               "learning_rate": 0.05},
    "Unlearn_UnlearnData": {"steps": 2, "batch": 1, "retain_samples": 2, "timesteps": 4, "learning_rate": 0.05},
}
CONCEPT, DATA, APPLY = "01_erase_a_concept.json", "03_unlearn_data.json", "04_apply_and_strip_a_saved_lora.json"
SEVERAL = "02_erase_several_concepts.json"
# One wording per concept: the trainer draws at least 8 samples per wording and step (~20 s each on this CPU).
ONE_CONCEPT = {"8": {"concept": "Van Gogh"}}
TWO_CONCEPTS = {"8": {"concept": "Van Gogh\nPicasso", "steps": 1}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        root = comfyui_dir()
    except ComfyUnavailable as e:
        pytest.skip(f"ComfyUI unavailable: {e}")
    srv = ComfyServer(root, tmp_path_factory.mktemp("comfyui-base"), sd15_checkpoint(root))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def example(name: str, object_info: dict, **by_node: dict) -> dict:
    """An example workflow as an API prompt with the tiny settings, plus per-node overrides (by node id)."""
    wf = json.loads((EXAMPLES / name).read_text())
    types = {n["type"] for n in wf["nodes"]}
    overrides = {k: v for k, v in TINY.items() if k in types}
    overrides.update(by_node)
    return to_api_prompt(wf, object_info, overrides)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def image_of(server, entry, node_id: str) -> np.ndarray:
    (path,) = output_images(server, entry, node_id)
    return pixels(path)


def assert_success(entry: dict) -> None:
    errors = messages(entry, "execution_error")
    assert entry["status"]["status_str"] == "success", errors[0]["exception_message"] if errors else entry["status"]


def lora_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def texts(entry: dict, node_id: str) -> list[str]:
    return entry["outputs"][node_id]["text"]


# ------------------------------------------------------------------------------------------------ no training
def test_every_example_workflow_has_a_server_test():
    assert sorted(p.name for p in EXAMPLES.glob("*.json")) == sorted([CONCEPT, SEVERAL, DATA, APPLY])


def test_object_info_lists_the_nodes_under_unlearning(object_info):
    for node_id in NODE_IDS:
        info = object_info[node_id]
        assert info["category"].startswith("unlearning/"), node_id
        assert info["python_module"] == "custom_nodes.ComfyUI-Unlearn", node_id
    data = object_info["Unlearn_UnlearnData"]["input"]
    assert data["required"]["forget_images"][0] == "IMAGE" and data["required"]["vae"][0] == "VAE"
    assert data["optional"]["retain_images"][0] == "IMAGE" and data["optional"]["clip"][0] == "CLIP"
    assert object_info["Unlearn_UnlearnData"]["output"] == ["MODEL", "UNLEARN_LORA", "IMAGE", "STRING"]


def test_examples_match_the_servers_node_definitions(object_info):
    """Every saved widget value lands on an input of the server's node (the converter refuses count mismatches)."""
    for path in sorted(EXAMPLES.glob("*.json")):
        prompt = to_api_prompt(json.loads(path.read_text()), object_info)
        for nid, node in prompt.items():
            required = object_info[node["class_type"]]["input"].get("required", {})
            assert set(required) <= set(node["inputs"]), (path.name, nid, set(required) - set(node["inputs"]))


# ------------------------------------------------------------------------------------------------ (a) one concept
@pytest.fixture(scope="module")
def concept_run(server, object_info):
    return server.run(example(CONCEPT, object_info, **ONE_CONCEPT))


def test_erase_a_concept_example_runs(server, concept_run):
    assert_success(concept_run)
    before, after = image_of(server, concept_run, "7"), image_of(server, concept_run, "11")
    assert before.shape == after.shape == (64, 64, 3)
    assert np.abs(before - after).mean() > 1.0  # the same seed, another model: ≥ 1 grey level on average
    meta = lora_metadata(server.loras / "no_van_gogh.safetensors")
    assert meta["unlearn.method"] == "ru" and json.loads(meta["unlearn.concepts"]) == ["Van Gogh"]
    assert texts(concept_run, "12") == ["saved models/loras/no_van_gogh.safetensors"]
    assert texts(concept_run, "14")[0].startswith("method RU: 2 steps")


# ------------------------------------------------------------------------------------------------ ComfyUI's cache
# Right after the concept example, whose trained LoRA is still in the server's cache: these and the next test share
# its Unlearn Concept node (only Save differs), so none of them trains. (Apply's file check is with the apply tests.)
UNLEARN, SAVE = "8", "12"  # node ids in example 01


def cached_nodes(entry: dict) -> set[str]:
    """The nodes ComfyUI answered from its cache in this run (its ``execution_cached`` message)."""
    (msg,) = messages(entry, "execution_cached")
    return set(msg["nodes"])


def trainings(log: str) -> int:
    return log.count("Unlearn Concept: method")  # the node logs its summary once per training


@pytest.fixture(scope="module")
def probe_prompt(object_info):
    """Example 01 with the concept run's settings, saving to its own file."""
    return example(CONCEPT, object_info, **ONE_CONCEPT, **{SAVE: {"filename": "cache_probe"}})


def test_requeuing_an_identical_unlearning_workflow_reuses_the_trained_lora(server, probe_prompt, concept_run):
    first = server.run(probe_prompt)  # trains only if a prompt queued since the concept run evicted its outputs
    start = len(server.log())
    again = server.run(probe_prompt)
    assert_success(first)
    assert_success(again)
    assert cached_nodes(again) == set(probe_prompt)  # nothing ran: no training, no sampling, no save
    assert trainings(server.log()[start:]) == 0
    assert texts(again, "14") == texts(first, "14")  # the first run's summary, its training time included


def test_a_deleted_lora_file_is_saved_again_without_retraining(server, probe_prompt):
    path = server.loras / "cache_probe.safetensors"
    assert_success(server.run(probe_prompt))
    meta = lora_metadata(path)
    path.unlink()
    start = len(server.log())
    entry = server.run(probe_prompt)
    assert_success(entry)
    assert UNLEARN in cached_nodes(entry) and SAVE not in cached_nodes(entry)
    assert trainings(server.log()[start:]) == 0
    assert lora_metadata(path) == meta


def test_requeuing_after_a_resave_neither_rewrites_nor_refuses_the_file(server, probe_prompt):
    """The re-save ran Save under an always-changed key, so the next queue runs it again: it must see that the file
    already holds this very LoRA (overwrite is off: a plain "file exists" check would fail the prompt)."""
    path = server.loras / "cache_probe.safetensors"
    assert_success(server.run(probe_prompt))
    path.unlink()
    assert_success(server.run(probe_prompt))
    written = path.stat().st_mtime_ns
    for _ in range(2):
        assert_success(server.run(probe_prompt))
    assert path.stat().st_mtime_ns == written


def test_a_bad_lora_filename_is_a_node_error_that_says_what_to_fix(server, object_info, concept_run):
    entry = server.run(example(CONCEPT, object_info, **ONE_CONCEPT, **{"12": {"filename": "../evil"}}))
    assert entry["status"]["status_str"] == "error"
    (err,) = messages(entry, "execution_error")
    assert err["node_type"] == "Unlearn_SaveUnlearningLora"
    assert "not a plain file name" in err["exception_message"] and "models/loras" in err["exception_message"]
    assert not list(server.base.rglob("evil*"))


def test_an_empty_concept_is_a_node_error_and_the_server_keeps_serving(server, object_info):
    entry = server.run(example(CONCEPT, object_info, **{"8": {"concept": "  "}}))
    assert entry["status"]["status_str"] == "error"
    (err,) = messages(entry, "execution_error")
    assert err["node_type"] == "Unlearn_UnlearnConcept" and "'concept' is empty" in err["exception_message"]
    assert "type what to unlearn" in err["exception_message"]
    assert_success(server.run(sampling_prompt()))


def sampling_prompt(prefix: str = "unlearn/probe") -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                       "latent_image": ["3", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
            "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}}}


# ------------------------------------------------------------------------------------------------ (d) apply / strip
BASE, APPLIED, STRIPPED, STOCK = "7", "11", "15", "21"  # SaveImage nodes of example 04


@pytest.fixture(scope="module")
def apply_run(server, object_info, concept_run):
    assert_success(concept_run)  # it saved the LoRA this example loads
    start = len(server.log())
    entry = server.run(example(APPLY, object_info))
    return entry, server.log()[start:]


def test_apply_and_strip_example_runs(apply_run):
    assert_success(apply_run[0])


def test_strength_one_changes_the_images(server, apply_run):
    entry = apply_run[0]
    assert np.abs(image_of(server, entry, APPLIED) - image_of(server, entry, BASE)).mean() > 1.0


def test_strip_gives_the_base_models_images_exactly(server, apply_run):
    entry = apply_run[0]
    assert np.array_equal(image_of(server, entry, STRIPPED), image_of(server, entry, BASE))


def test_stock_lora_loader_loads_every_key_and_matches_apply(server, apply_run):
    entry, log = apply_run
    assert "Requested to load" in log  # the log of this run was captured …
    assert "lora key not loaded" not in log  # … and ComfyUI's LoRA loader matched every key of our file
    stock = image_of(server, entry, STOCK)
    assert np.abs(stock - image_of(server, entry, BASE)).mean() > 1.0
    assert np.array_equal(stock, image_of(server, entry, APPLIED))  # the same patches, bit for bit


def test_apply_at_strength_zero_gives_the_base_models_images_exactly(server, object_info, apply_run):
    entry = server.run(example(APPLY, object_info, **{"8": {"strength": 0.0}}))
    assert_success(entry)
    assert np.array_equal(image_of(server, entry, APPLIED), image_of(server, entry, BASE))


def applied_prompt(lora_name: str, prefix: str = "unlearn/applied") -> dict:
    """The probe sampling prompt with Apply Unlearning LoRA (node "7") between the checkpoint and the sampler."""
    prompt = sampling_prompt(prefix)
    prompt["7"] = {"class_type": "Unlearn_ApplyUnlearningLora",
                   "inputs": {"model": ["1", 0], "strength": 1.0, "lora_name": lora_name}}
    prompt["4"]["inputs"]["model"] = ["7", 0]
    return prompt


def other_lora_of_the_same_size(src: Path, dst: Path) -> None:
    """``src`` with every up-projection negated and one metadata digit changed: another LoRA, another header, the
    same byte count."""
    tensors = load_file(str(src))
    meta = dict(lora_metadata(src))
    for k in tensors:
        if k.endswith("lora_up.weight"):
            tensors[k] = -tensors[k]
    seed = meta["unlearn.seed"]
    meta["unlearn.seed"] = seed[:-1] + str((int(seed[-1]) + 1) % 10)
    save_file(tensors, str(dst), metadata=meta)


def test_a_lora_file_replaced_under_the_same_name_is_read_again(server, concept_run):
    assert_success(concept_run)
    path = server.loras / "cache_apply.safetensors"
    shutil.copyfile(server.loras / "no_van_gogh.safetensors", path)
    prompt = applied_prompt(path.name)
    first = server.run(prompt)
    assert_success(first)
    assert "7" in cached_nodes(server.run(prompt))  # the file is unchanged: the patched model is reused
    st = path.stat()
    other_lora_of_the_same_size(path, path.with_name("other.tmp"))
    os.replace(path.with_name("other.tmp"), path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p`, or a rewrite within the mtime resolution
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    replaced = server.run(prompt)
    assert_success(replaced)
    assert "7" not in cached_nodes(replaced)
    assert np.abs(image_of(server, replaced, "6") - image_of(server, first, "6")).mean() > 1.0


# ------------------------------------------------------------------------------------------------ (b), (c)
def test_erase_several_concepts_example_runs(server, object_info):
    entry = server.run(example(SEVERAL, object_info, **TWO_CONCEPTS))
    assert_success(entry)
    for before, after in (("23", "26"), ("33", "36"), ("43", "46")):
        assert image_of(server, entry, before).shape == image_of(server, entry, after).shape == (64, 64, 3)
    meta = lora_metadata(server.loras / "no_van_gogh_picasso.safetensors")
    assert len(json.loads(meta["unlearn.constraints"])) == 2
    summary = texts(entry, "14")[0]
    assert "'Van Gogh': λ" in summary and "'Picasso': λ" in summary


def test_unlearn_data_example_runs(server, object_info):
    entry = server.run(example(DATA, object_info))
    assert_success(entry)
    forget, after = image_of(server, entry, "7"), image_of(server, entry, "11")
    assert np.abs(forget - after).mean() > 1.0  # the same seed no longer reproduces the forget image
    meta = lora_metadata(server.loras / "forget_red_cars.safetensors")
    assert meta["unlearn.method"] == "fu" and json.loads(meta["unlearn.data"])["retain_from_model"] is True
    summary = texts(entry, "14")[0]
    assert summary.startswith("method FU: 2 steps") and "forget set (1 image)" in summary
    assert "2 samples of the unchanged model" in summary


# ------------------------------------------------------------------------------------------------ interrupt
async def _train_and_interrupt(server, prompt: dict, node: str, follow_up: dict) -> dict:
    """Queue a training prompt and a follow-up, POST /interrupt once the training node reports its first step, and
    collect the training node's progress reports until ComfyUI says the prompt was interrupted."""
    import aiohttp

    client_id = "unlearn-interrupt-test"
    seen: list[int] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
        async def post(path, body):
            async with http.post(server.url + path, json=body) as r:
                assert r.status == 200, await r.text()
                return await r.json(content_type=None)

        train_id = (await post("/prompt", {"prompt": prompt, "client_id": client_id}))["prompt_id"]
        next_id = (await post("/prompt", {"prompt": follow_up, "client_id": client_id}))["prompt_id"]
        at_interrupt = None
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            ev = json.loads(msg.data)
            data = ev.get("data", {})
            if data.get("prompt_id") != train_id:
                continue
            if ev["type"] == "progress" and data.get("node") == node:
                seen.append(data["value"])
                if at_interrupt is None:
                    at_interrupt = data["value"]
                    await post("/interrupt", {})
            elif ev["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                break
    return {"train_id": train_id, "next_id": next_id, "progress": seen, "at_interrupt": at_interrupt}


def test_interrupt_stops_training_within_a_step_leaves_no_lora_and_the_queue_goes_on(server, object_info):
    prompt = example(CONCEPT, object_info, **{"8": {"concept": "Van Gogh", "steps": 50, "seed": 1},
                                              "12": {"filename": "interrupted"}})
    got = asyncio.run(asyncio.wait_for(_train_and_interrupt(server, prompt, "8", sampling_prompt("unlearn/next")),
                                       timeout=900))
    entry = server.wait(got["train_id"])
    assert entry["status"]["status_str"] == "error" and messages(entry, "execution_interrupted")
    assert got["at_interrupt"] == 1
    assert max(got["progress"]) <= 2  # the step running when /interrupt arrived may still report; none after it
    assert not list(server.loras.glob("interrupted*"))
    assert_success(server.wait(got["next_id"]))


# ------------------------------------------------------------------------------------------------ load
# A UNet with SD1.5's widths (320 channels, a 768-d context: ComfyUI detects an SD1.5 model) but one level of one
# block, next to SD1.5's CLIP-L and VAE: a training then takes ~10 s instead of ~40 s, so twenty fit in minutes.
NARROW = "random-sd15-narrow-fp16.safetensors"
NARROW_UNET = {"num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1]}
LOAD_RUNS = 20


@pytest.fixture(scope="module")
def narrow_checkpoint(server) -> str:
    path = cache_dir() / "models" / NARROW
    if not path.is_file():  # ~15 s, 0.5 GB, once
        code = "import json, sys, make_sd15_checkpoint as m; m.UNET.update(json.loads(sys.argv[1])); m.main(*sys.argv[2:])"
        subprocess.run([sys.executable, "-c", code, json.dumps(NARROW_UNET), str(server.root), str(path), "fp16"],
                       cwd=Path(__file__).parent, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    link = server.base / "models" / "checkpoints" / NARROW
    if not link.exists():
        link.symlink_to(path)
    return NARROW


def cheapest_concept_prompt(checkpoint: str, seed: int, filename: str) -> dict:
    """Checkpoint → Unlearn Concept at the lowest settings it accepts → Save Unlearning LoRA."""
    unlearn = {"model": ["1", 0], "clip": ["1", 1], "concept": "Van Gogh", "anchor": "", "method": "RU",
               "threshold": 1.0, "steps": 1, "rank": 1, "targets": "xattn", "learning_rate": 0.05, "seed": seed,
               "width": 64, "height": 64, "batch": 1, "esd_eta": 1.0, "trajectory_steps": 2}
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
            "2": {"class_type": "Unlearn_UnlearnConcept", "inputs": unlearn},
            "3": {"class_type": "Unlearn_SaveUnlearningLora",
                  "inputs": {"unlearn_lora": ["2", 1], "filename": filename, "dtype": "fp16", "overwrite": False}}}


def test_twenty_queued_unlearning_workflows_all_succeed_and_memory_stays_flat(server, narrow_checkpoint):
    """All queued at once, each with its own seed (nothing is cached) and file; the server's RSS is read as each one
    finishes, and after the 20th it is within 10 % of after the 5th (the first ones also warm allocators up)."""
    proc = psutil.Process(server.proc.pid)
    seeds = range(1000, 1000 + LOAD_RUNS)
    ids = [server.queue(cheapest_concept_prompt(narrow_checkpoint, s, f"load_{s}")) for s in seeds]
    done: dict[str, dict] = {}
    rss: list[int] = []  # rss[k - 1]: after the k-th finished
    t0 = time.monotonic()
    while len(done) < LOAD_RUNS:
        assert server.proc.poll() is None, server.log()[-3000:]
        assert time.monotonic() - t0 < 1800, f"{len(done)} of {LOAD_RUNS} finished in 30 min"
        history = server.get("/history")
        for pid in ids:
            entry = history.get(pid)
            if pid not in done and entry and entry["status"].get("status_str") in ("success", "error"):
                done[pid] = entry
        rss += [proc.memory_info().rss] * (len(done) - len(rss))
        time.sleep(0.5)  # polling, not timing
    wall = time.monotonic() - t0
    print(f"\n{LOAD_RUNS} unlearning workflows in {wall:.0f} s; server RSS after each (MiB): "
          + " ".join(str(r >> 20) for r in rss))
    for pid in ids:
        assert_success(done[pid])
    assert sorted(int(lora_metadata(server.loras / f"load_{s}.safetensors")["unlearn.seed"]) for s in seeds) \
        == list(seeds)
    assert abs(rss[-1] - rss[4]) <= 0.10 * rss[4], [r >> 20 for r in rss]


# ------------------------------------------------------------------------------------------------ batch --comfyui
def test_batch_command_trains_each_job_on_the_server_and_a_rerun_skips_them(server, narrow_checkpoint, tmp_path):
    """``python -m unlearn_core batch JOBS --comfyui URL`` against this server (not the fake of ``test_batch.py``):
    example 01 with each job's settings, on the narrow checkpoint at the cheapest settings; a rerun reads the LoRAs'
    metadata through /view_metadata and queues nothing."""
    import contextlib
    import io

    from unlearn_core import cli
    from unlearn_core.lora import load_lora

    cheap = {"CheckpointLoaderSimple": {"ckpt_name": narrow_checkpoint},
             "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
             "KSampler": {"steps": 1, "cfg": 1.0},
             "Unlearn_UnlearnConcept": {"width": 64, "height": 64, "batch": 1, "trajectory_steps": 2}}
    jobs = {"defaults": {"steps": 1, "rank": 1, "comfyui": cheap},
            "jobs": [{"name": "batch_van_gogh", "concept": "Van Gogh", "seed": 21},
                     {"name": "batch_picasso", "concept": "Picasso", "anchor": "a photo", "seed": 22}]}
    concepts = {"batch_van_gogh": "Van Gogh", "batch_picasso": "Picasso"}
    jobs_path = tmp_path / "jobs.json"
    jobs_path.write_text(json.dumps(jobs))

    def batch(summary: Path) -> tuple[int, dict]:
        argv = ["batch", str(jobs_path), "--comfyui", server.url, "--poll", "0.2", "--timeout", "600",
                "--summary", str(summary)]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = cli.main(argv)
        return rc, json.loads(summary.read_text())

    t0 = time.monotonic()
    rc, first = batch(tmp_path / "first.json")
    t1 = time.monotonic()
    assert rc == 0, first["jobs"]
    assert [(j["name"], j["status"]) for j in first["jobs"]] == [(n, "done") for n in concepts], first["jobs"]
    history = server.get("/history")
    for job in first["jobs"]:
        assert job["lora"] == f"models/loras/{job['name']}.safetensors"
        assert history[job["prompt_id"]]["status"]["status_str"] == "success"  # queued under the batch's own id
        lora = load_lora(server.loras / f"{job['name']}.safetensors")
        assert lora.modules and json.loads(lora.metadata["unlearn.concepts"]) == [concepts[job["name"]]]
        assert lora.metadata["unlearn.seed"] == str(jobs["jobs"][job["index"] - 1]["seed"])
        assert lora.metadata["unlearn.steps"] == "1" and lora.metadata["ss_network_dim"] == "1"
        assert [c["name"] for c in job["constraints"]] == [concepts[job["name"]]]  # read back via /view_metadata
        assert job["outputs"]["12"] == [f"saved models/loras/{job['name']}.safetensors"]
    assert json.loads(load_lora(server.loras / "batch_picasso.safetensors").metadata["unlearn.anchors"]) == ["a photo"]

    start, queued = len(server.log()), len(history)
    rc, again = batch(tmp_path / "again.json")
    t2 = time.monotonic()
    assert rc == 0 and again["counts"] == {"skipped": 2}, again["jobs"]
    assert all(j["message"] == "already on the server with these settings" and "prompt_id" not in j
               for j in again["jobs"])
    assert len(server.get("/history")) == queued  # nothing was queued
    assert trainings(server.log()[start:]) == 0
    print(f"\nbatch --comfyui: 2 jobs in {t1 - t0:.1f} s, rerun (both skipped) in {t2 - t1:.1f} s")
