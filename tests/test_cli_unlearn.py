"""``unlearn`` / ``evaluate`` end to end on the demo model, with a tiny configuration (a few steps, 2 samples).

These check the plumbing (files, metadata, exit codes, Ctrl-C, no clobbering); the erasure numbers come from
``benchmarks/acceptance_cli.py``.
"""

import json
import os
import signal

import pytest
import torch

from unlearn_core import cli, unlearn
from unlearn_core.lora import load_lora


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    monkeypatch.setitem(unlearn.DEFAULTS, "batch", 8)
    monkeypatch.setitem(unlearn.DEFAULTS, "keep_batch", 2)
    monkeypatch.setitem(unlearn.DEFAULTS, "rollouts", 1)
    monkeypatch.setitem(unlearn.DEFAULTS, "keep_rollouts", 1)
    monkeypatch.setitem(unlearn.DEFAULTS, "rollout_jumps", 3)
    monkeypatch.setitem(unlearn.DEFAULTS, "estimate_samples", 8)
    monkeypatch.setitem(unlearn.DEFAULTS, "fu_retain_samples", 8)


TINY = ["--steps", "4", "--eval-samples", "2", "--quiet", "--exact-wording", "--keep", "a handwritten digit seven"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("unlearn") / "three"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"batch": 8, "keep_batch": 2, "rollouts": 1, "keep_rollouts": 1, "rollout_jumps": 3,
                     "estimate_samples": 8}.items():
            mp.setitem(unlearn.DEFAULTS, k, v)
        rc = cli.main(["unlearn", "--concept", "three", "--out", str(out), *TINY])
    assert rc == 0
    return out


def test_unlearn_writes_lora_metrics_and_report(run_dir):
    lora = run_dir / "ru-three.safetensors"
    assert lora.is_file() and (run_dir / "metrics.json").is_file() and (run_dir / "report.html").is_file()
    html = (run_dir / "report.html").read_text()
    for png in ("training.png", "constraints.png", "samples_erased_before.png", "samples_paraphrase_after.png",
                "samples_retained_after.png"):
        assert (run_dir / png).stat().st_size > 1000
        assert png in html
    assert not list(run_dir.glob(".*.tmp")) and not list(run_dir.glob("*.partial.safetensors"))


def test_lora_metadata_names_method_concept_and_constraint(run_dir):
    md = load_lora(run_dir / "ru-three.safetensors").metadata
    assert md["unlearn.method"] == "ru"
    assert json.loads(md["unlearn.concepts"]) == ["three"]
    (c,) = json.loads(md["unlearn.constraints"])
    assert c["requested"] > 0 and c["achieved"] > 0 and 0 <= c["lambda"] <= unlearn.DEFAULTS["lam_max"]
    assert md["ss_network_dim"] == str(unlearn.DEFAULTS["rank"]) and md["unlearn.base_model_hash"].startswith("sha256:")


def test_metrics_json_has_requested_achieved_and_judge_metrics(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    (c,) = m["constraints"]
    assert c["requested"] == pytest.approx(unlearn.DEFAULTS["threshold"] * c["separation"], rel=1e-6)
    ev = m["evaluation"]
    assert 0 <= ev["forget_rate"] <= 1 and len(ev["paraphrases"]) == 4 and len(ev["retained"]) == 9
    assert m["keep"][0] == "" and "a handwritten digit seven" in m["keep"]


def test_evaluate_reads_concept_from_lora_metadata(run_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = cli.main(["evaluate", "--lora", str(run_dir / "ru-three.safetensors"), "-n", "2", "--json", "--out", str(out)])
    assert rc == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["concepts"] == ["three"] and [e["digit"] for e in m["erased"]] == [3]
    assert json.loads(out.read_text())["kid_retained"] == pytest.approx(m["kid_retained"])


def test_existing_output_is_not_overwritten(run_dir, capsys):
    before = (run_dir / "ru-three.safetensors").read_bytes()
    rc = cli.main(["unlearn", "--concept", "three", "--out", str(run_dir), *TINY])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "ru-three.safetensors").read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["--concept", ""], "empty"),
    (["--concept", "three", "--anchor", "three"], "equals the anchor"),
    (["--forget", "{tmp}/missing"], "does not exist"),
    (["--forget", "{tmp}/empty"], "holds no images"),
    (["--forget", "{tmp}/bad"], "cannot read image"),
    (["--concept", "three", "--method", "fu"], "unlearns data"),
    (["--concept", "three", "--set", "no_such_knob=1"], "KEY=VALUE"),
    (["--concept", "three", "--set", "steps=many"], "not a valid int"),
    (["--concept", "three", "--set", "dual_lr=-1"], ">= 0"),
    (["--concept", "three", "--set", "lam_init=warm"], "lam_init: give 'closed', 'target' or a number in [0, 1)"),
    (["--concept", "three", "--set", "lam_init=1.2"], "lam_init: give 'closed', 'target' or a number in [0, 1)"),
    (["--concept", "three", "--method", "esd", "--weight", "1", "--set", "lam_init=0.3"], "fixed-weight baseline"),
    (["--concept", "three", "--method", "lu", "--set", "lam_init=closed"], "RU's closed form"),
    (["--concept", "three", "--set", "lam_init=target"], "LU's closed-form target"),
    (["--concept", "three", "--method", "lu", "--set", "lu_lam_init=closed"], "RU's closed form"),
    (["--concept", "three", "--method", "lu", "--set", "dual_lr=0.01"], "has its own; use --set lu_dual_lr"),
    (["--concept", "three", "--set", "lu_dual_lr=0.01"], "applies to --method lu only"),
    (["--concept", "three", "--micro-batch", "-1"], "--micro-batch must be >= 0"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    rc = cli.main(["unlearn", *[a.format(tmp=tmp_path) for a in argv], "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_micro_batch_bounds_the_trained_forwards_and_gives_the_same_lora(run_dir, tmp_path, record_trained_forwards):
    """``--micro-batch 3``: no trained forward sees more than 3 samples, and the LoRA is the default run's (the
    run_dir fixture: same options and seed) up to float rounding."""
    from unlearn_core import trainer

    sizes = record_trained_forwards(trainer)
    out = tmp_path / "micro"
    assert cli.main(["unlearn", "--concept", "three", "--out", str(out), *TINY, "--micro-batch", "3"]) == 0
    assert sizes and max(sizes) <= 3
    a, b = load_lora(run_dir / "ru-three.safetensors"), load_lora(out / "ru-three.safetensors")
    for name, m in a.modules.items():
        for got, want in ((b.modules[name].down, m.down), (b.modules[name].up, m.up)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))


def test_non_writable_output_folder_is_exit_code_2(tmp_path, capsys):
    if os.geteuid() == 0:
        target = "/proc/unlearn-out"  # root can write anywhere a chmod would forbid; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "out")
    rc = cli.main(["unlearn", "--concept", "three", "--out", target, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "output folder" in err[0]


def test_ctrl_c_keeps_last_good_lora_as_partial(tmp_path):
    out = tmp_path / "cancel"

    def interrupt_at_step_2(ev):
        if ev["type"] == "step" and ev["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    args = cli.build_parser().parse_args(["unlearn", "--concept", "three", "--out", str(out), *TINY,
                                          "--steps", "50"])
    job = unlearn.job_from_args(args)
    with pytest.raises(KeyboardInterrupt):
        unlearn.run_job(job, quiet=True, callbacks=[interrupt_at_step_2])
    partial = out / "ru-three.partial.safetensors"
    lora = load_lora(partial)
    assert json.loads(lora.metadata["unlearn.cancelled"]) is True
    assert int(lora.metadata["unlearn.steps"]) < 50
    assert not (out / "ru-three.safetensors").exists() and not (out / "metrics.json").exists()
    assert not list(out.glob(".*.tmp"))


def test_forget_images_fu_end_to_end(tmp_path):
    from PIL import Image

    from unlearn_core.demo.data import load_demo_data

    data = load_demo_data("diffusion", styles=("plain",))
    forget = tmp_path / "forget"
    forget.mkdir()
    for i, idx in enumerate((data.digits == 3).nonzero().flatten()[:1].tolist()):
        Image.fromarray((data.images[idx].numpy() * 255).astype("uint8"), mode="L").save(forget / f"{i}.png")
    out = tmp_path / "fu"
    rc = cli.main(["unlearn", "--forget", str(forget), "--caption", "a handwritten digit three", "--out", str(out),
                   "--steps", "3", "--eval-samples", "2", "--quiet"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "fu" and m["constraints"][0]["name"] == "forget"
    assert m["evaluation"]["digit"] == 3
    assert torch.isfinite(torch.tensor(m["constraints"][0]["achieved"]))


def test_settled_ignores_the_frozen_polish_phase_and_flags_a_moving_lambda():
    def hist(free, frozen):
        h = [{"step": 10 * i, "lambda": [v]} for i, v in enumerate(free)]
        return h + [{"step": 10 * (len(free) + i), "lambda": [frozen], "polished": True} for i in range(4)]

    calm = unlearn.settled(hist([0.1, 0.3, 0.42, 0.44, 0.43, 0.44, 0.45, 0.44], 0.44), lam_hi=0.9)
    assert calm["ok"] and calm["window"] == 3 and calm["ranges"][0] == pytest.approx(0.01)
    # λ still climbing when the polish froze it: the frozen tail must not hide that
    climbing = unlearn.settled(hist([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], 0.7), lam_hi=0.9)
    assert not climbing["ok"] and climbing["ranges"][0] == pytest.approx(0.2)
    at_cap = unlearn.settled(hist([0.9] * 8, 0.9), lam_hi=0.9)
    assert not at_cap["ok"] and not at_cap["inside_bounds"]
    assert not unlearn.settled([], lam_hi=0.9)["ok"]


def test_set_overrides_are_converted_to_the_defaults_types():
    before = dict(unlearn.DEFAULTS)
    got = unlearn.parse_overrides(["dual_lr=0.07", "dual_every=7", "dual_estimate=target", "lam_init=0.25"])
    assert got == {"dual_lr": 0.07, "dual_every": 7, "dual_estimate": "target", "lam_init": 0.25}
    assert unlearn.parse_overrides(["lam_init=closed"]) == {"lam_init": "closed"}
    assert isinstance(got["dual_every"], int) and isinstance(got["dual_lr"], float)
    assert unlearn.DEFAULTS == before  # parsing alone changes nothing


def test_demo_wordings_choose_the_training_templates_a_digit_is_expanded_to():
    """``--set demo_wordings=…`` picks which of the demo's six training templates a digit concept trains on; the
    held-out paraphrases are never among them, and bad indices are one clear error."""
    from unlearn_core.demo.data import HELDOUT_TEMPLATES, caption

    def wordings(*extra):
        args = cli.build_parser().parse_args(["unlearn", "--concept", "five", "--out", "x", *extra])
        return unlearn.prepare_job(args)[0].concepts[0]

    assert wordings() == ["a handwritten digit five", "the number 5", "five", "a five"]
    six = wordings("--set", "demo_wordings=0,1,2,3,4,5")
    assert len(six) == 6 and "a digit 5" in six and "a drawing of the digit five" in six
    assert not {caption(t, 5) for t in HELDOUT_TEMPLATES} & set(six)
    assert unlearn.DEFAULTS["demo_wordings"] == "0,1,2,3"  # the override held for that job only
    for bad in ("0,1,9", "0,0", "", "a,b"):
        with pytest.raises(ValueError, match="demo_wordings"):
            wordings("--set", f"demo_wordings={bad}")


def test_training_options_default_per_job_kind_and_set_overrides_them(tmp_path):
    """An omitted --steps / --rank / --lr / --targets takes its default when the job is built — the data job on the
    demo its own length and rank, ``--set`` the same as the option — and a given option is never replaced."""
    from PIL import Image

    (tmp_path / "f").mkdir()
    Image.new("L", (16, 16)).save(tmp_path / "f" / "0.png")

    def job(*extra):
        args = cli.build_parser().parse_args(["unlearn", "--out", str(tmp_path / "o"), *extra])
        j = unlearn.prepare_job(args)[0]
        return j.steps, j.rank, j.lr, j.targets

    d = unlearn.DEFAULTS
    concept, data = ["--concept", "five"], ["--forget", str(tmp_path / "f")]
    assert job(*concept) == (d["steps"], d["rank"], d["lr"], d["targets"])
    assert job(*data) == (d["fu_steps"], d["fu_rank"], d["lr"], d["targets"])
    assert d["fu_rank"] != d["rank"] and d["fu_steps"] != d["steps"]  # else the line above proves nothing
    assert job(*data, "--rank", str(d["rank"]), "--steps", str(d["steps"]))[:2] == (d["steps"], d["rank"])
    assert job(*concept, "--set", "rank=3", "--set", "lr=0.01", "--set", "targets=attn", "--set", "steps=7") == \
        (7, 3, 0.01, "attn")
    assert job(*concept, "--set", "rank=3", "--rank", "5")[1] == 5


RESUMABLE = [*TINY, "--steps", "8", "--eval-samples", "0", "--checkpoint-every", "2",
             "--set", "dual_every=2", "--set", "refresh_every=2"]


def test_ctrl_c_then_resume_reproduces_the_uninterrupted_lora(tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert cli.main(["unlearn", "--concept", "three", "--out", str(full), *RESUMABLE]) == 0
    assert not (full / "ru-three.checkpoint.pt").exists()  # a finished run leaves nothing to resume

    out = tmp_path / "cut"

    def interrupt_at_step_5(ev):
        if ev["type"] == "step" and ev["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    args = cli.build_parser().parse_args(["unlearn", "--concept", "three", "--out", str(out), *RESUMABLE])
    for k, v in unlearn.parse_overrides(args.set).items():
        monkeypatch.setitem(unlearn.DEFAULTS, k, v)
    with pytest.raises(KeyboardInterrupt):
        unlearn.run_job(unlearn.job_from_args(args), quiet=True, callbacks=[interrupt_at_step_5])
    state = torch.load(out / "ru-three.checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and not (out / "ru-three.safetensors").exists()

    # a different option refuses the checkpoint instead of silently starting over
    rc = cli.main(["unlearn", "--concept", "three", "--out", str(out), *RESUMABLE, "--lr", "0.01", "--resume"])
    assert rc == 2 and (out / "ru-three.checkpoint.pt").exists()

    assert cli.main(["unlearn", "--concept", "three", "--out", str(out), *RESUMABLE, "--resume"]) == 0
    a, b = load_lora(full / "ru-three.safetensors"), load_lora(out / "ru-three.safetensors")
    for name, m in a.modules.items():
        torch.testing.assert_close(b.modules[name].down, m.down, rtol=0, atol=0)
        torch.testing.assert_close(b.modules[name].up, m.up, rtol=0, atol=0)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, out))
    assert mb["steps"] == 8 and mb["dual_history"] == ma["dual_history"]
    assert mb["constraints"][0]["lambda"] == ma["constraints"][0]["lambda"]
    assert not (out / "ru-three.checkpoint.pt").exists()


def test_resume_without_a_checkpoint_starts_afresh(tmp_path, capsys):
    out = tmp_path / "fresh"
    rc = cli.main(["unlearn", "--concept", "three", "--out", str(out), *RESUMABLE, "--steps", "2", "--resume"])
    assert rc == 0 and (out / "ru-three.safetensors").exists()


def test_a_new_run_removes_temp_files_a_killed_writer_left_for_its_own_outputs(tmp_path, monkeypatch):
    out = tmp_path / "killed"
    out.mkdir()
    stale = [".ru-three.safetensors.k2j4_x9a.tmp", ".ru-three.checkpoint.pt.0abcdefg.tmp",
             ".ru-three.partial.safetensors.zz11yy22.tmp", ".metrics.json.q1w2e3r4.tmp", ".report.html.abcd1234.tmp",
             ".training.png.a1b2c3d4.tmp", ".samples_retained_after.png.t0t0t0t0.tmp"]
    kept = [".ru-seven.safetensors.k2j4_x9a.tmp",  # another job's output in the same folder
            ".ru-three.safetensors.tmp", "notes.tmp", "ru-three.safetensors.abcd1234.tmp",  # not a writer's temp name
            "ru-three.checkpoint.pt"]
    for n in stale + kept:
        (out / n).write_bytes(b"half a file")

    class Stop(Exception):
        pass

    def stop_after_setup(job):
        raise Stop

    monkeypatch.setattr(unlearn, "load_model", stop_after_setup)
    args = cli.build_parser().parse_args(["unlearn", "--concept", "three", "--out", str(out), *TINY])
    with pytest.raises(Stop):
        unlearn.run_job(unlearn.job_from_args(args), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(kept)


def test_set_lam_init_reaches_the_learned_lambda_of_each_method(tmp_path):
    """``--set lam_init`` is where RU's and FU's λ starts, ``lu_lam_init`` LU's (not a silent no-op: ``lam_init``
    with LU is an error naming LU's own); "closed" stays RU's, "target" LU's."""
    from PIL import Image

    from unlearn_core.demo import load_demo_model

    for d in ("f", "r"):
        (tmp_path / d).mkdir()
        Image.new("L", (16, 16)).save(tmp_path / d / "0.png")
    model = load_demo_model()

    def problem(*extra):
        args = cli.build_parser().parse_args(["unlearn", "--out", str(tmp_path / "o"), *extra])
        job, overrides = unlearn.prepare_job(args)
        with unlearn.overridden_defaults(overrides):
            return unlearn.build_problem(job, model)[0]

    assert problem("--concept", "five").lam_init == 0.0
    assert problem("--concept", "five", "--set", "lam_init=closed").lam_init == "closed"
    assert problem("--concept", "five", "--method", "lu", "--set", "lu_lam_init=0.2").lam_init == 0.2
    assert problem("--concept", "five", "--method", "lu").lam_init == "target"
    with pytest.raises(ValueError, match="use --set lu_lam_init"):
        problem("--concept", "five", "--method", "lu", "--set", "lam_init=0.2")
    data = ["--forget", str(tmp_path / "f"), "--retain", str(tmp_path / "r"), "--caption", "a handwritten digit three"]
    assert problem(*data, "--set", "lam_init=0.1").lam_init == 0.1


def test_lu_has_a_threshold_and_an_elbo_stride_of_its_own(tmp_path):
    """RU's multiple asks LU for little, and LU's log-ratio reads at every timestep are too slow on CPU: LU has its
    own defaults, each still overridable."""
    from unlearn_core.demo import load_demo_model

    model = load_demo_model()

    def build(*extra):
        args = cli.build_parser().parse_args(["unlearn", "--out", str(tmp_path / "o"), "--concept", "five", *extra])
        job, overrides = unlearn.prepare_job(args)
        with unlearn.overridden_defaults(overrides):
            problem, config = unlearn.build_problem(job, model)
            return job, config, problem

    d = unlearn.DEFAULTS
    job, config, problem = build("--method", "lu")
    assert (job.threshold, config.elbo_stride) == (d["lu_threshold"], d["lu_elbo_stride"])
    # its dual: λ solved on the closed-form target, held through a longer warm-up, then slow corrections
    assert (problem.lam_init, config.dual_warmup, config.dual_lr) == ("target", d["lu_dual_warmup"], d["lu_dual_lr"])
    assert d["lu_threshold"] != d["threshold"] and d["lu_dual_lr"] != d["dual_lr"]
    job, config, problem = build("--method", "lu", "--threshold", "3", "--set", "lu_elbo_stride=5",
                                 "--set", "lu_lam_init=0.2", "--set", "lu_dual_lr=0.03")
    assert (job.threshold, config.elbo_stride, problem.lam_init, config.dual_lr) == (3.0, 5, 0.2, 0.03)
    job, config, problem = build()  # RU keeps the shared ones
    assert (job.threshold, config.elbo_stride) == (d["threshold"], d["elbo_stride"])
    assert (problem.lam_init, config.dual_warmup, config.dual_lr) == (d["lam_init"], d["dual_warmup"], d["dual_lr"])
