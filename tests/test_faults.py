"""Fault injection: ``unlearn`` killed with SIGKILL at random moments while training and while saving.

Issue #8: a kill never leaves a corrupt or partial file under a final name, and ``--resume`` then completes,
reproducing the uninterrupted run. SIGKILL cannot be caught, so this is the atomic writes (temp file, fsync,
rename) and the checkpoints that are tested here, not a signal handler.

Every kill lands in a real process running the CLI (``python -m unlearn_core unlearn ...``). Starting Python and
importing torch/diffusers/peft costs ~15 s of CPU on the shared 2-core test machine and writes nothing, so the
trials are forked from a *zygote*: one ``sys.executable`` process that has done those imports and then, per
trial, forks a child that runs the ``unlearn_core`` main module with the trial's argv (``runpy``: the same code
``python -m`` runs). The kills therefore land in model loading, checkpoint reading, calibration, training,
checkpointing and saving — the parts that touch files. The uninterrupted reference run is forked the same way;
the final ``--resume`` is a plain ``python -m unlearn_core`` process, so the chain of forked runs is also checked
against a normal one. The zygote kills its own unreaped child, so a kill can never hit a recycled pid.

``pytest -s tests/test_faults.py`` prints a table of where the kills landed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from unlearn_core.lora import load_lora

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"),
                                reason="needs fork and SIGKILL (POSIX)")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 24
LAST_CHECKPOINT = STEPS - 2  # checkpoints at steps 2, 4, ..., STEPS - 2
NAME = "ru-three"
# tests/test_cli_unlearn.py's tiny settings, checkpoints every 2 steps (dual_every/refresh_every divide it)
ARGS = ["unlearn", "--concept", "three", "--steps", str(STEPS), "--checkpoint-every", "2",
        "--set", "dual_every=2", "--set", "refresh_every=2", "--set", "batch=8", "--set", "keep_batch=2",
        "--set", "rollouts=1", "--set", "keep_rollouts=1", "--set", "rollout_jumps=3", "--set", "estimate_samples=8",
        "--exact-wording", "--keep", "a handwritten digit seven", "--eval-samples", "0", "--quiet"]
LORA, PARTIAL, CKPT = f"{NAME}.safetensors", f"{NAME}.partial.safetensors", f"{NAME}.checkpoint.pt"
SAVED = [LORA, "training.png", "constraints.png", "metrics.json", "report.html"]  # in the order run_job writes them
OUTPUTS = {LORA, PARTIAL, CKPT, *SAVED}
METRIC_KEYS = {"lora", "method", "concepts", "steps", "seed", "constraints", "keep_constraints", "train_seconds",
               "settled", "dual_history", "seconds"}

# How each trial picks its moment: training-phase triggers first (each moves the chain on by a few steps), then the
# saving-phase ones. Any trigger that has not fired when the final LoRA is being written kills then (a saving kill).
TRAINING_MODES = ["uniform"] * 5 + ["checkpoint"] * 5 + ["checkpoint-temp"] * 4
SAVING_MODES = ["lora"] * 3 + ["metrics"] * 2 + ["output-temp"] * 2
MIN_KILLS, MIN_TRAINING, MIN_SAVING = 20, 5, 5

ZYGOTE = r"""
import json, os, runpy, signal, sys, traceback

import unlearn_core.cli
unlearn_core.cli.build_parser()  # imports the subcommands
import peft, safetensors.torch  # noqa: F401  the CLI's lazy imports, done once here
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: F401
import unlearn_core.demo.model, unlearn_core.diffusers_denoiser, unlearn_core.trainer  # noqa: F401

child = None


def reply(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def reap(flags):
    global child
    pid, status = os.waitpid(child, flags)
    if pid == 0:
        return None
    child = None
    return os.waitstatus_to_exitcode(status)


reply(ready=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the trial: `python -m unlearn_core ARGV`, minus the imports
            code = 1
            try:
                fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                sys.argv = ["unlearn_core", *cmd["argv"]]
                try:
                    runpy.run_module("unlearn_core", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        child = pid
        reply(pid=pid)
    elif cmd["op"] == "ping":
        reply(ok=True)
    elif cmd["op"] == "poll":
        reply(rc=reap(os.WNOHANG))
    elif cmd["op"] == "kill":  # our own child, not reaped yet: its pid cannot have been recycled
        os.kill(child, signal.SIGKILL)
        reply(rc=reap(0))
if child is not None:
    os.kill(child, signal.SIGKILL)
    reap(0)
"""


class Zygote:
    def __init__(self, log: Path):
        self._err = open(log, "w")  # noqa: SIM115 - closed in close()
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1)
        self.log = log
        self._ready = False

    def ask(self, **cmd) -> dict:
        if not self._ready:
            self._ready = bool(self._read().get("ready"))
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died: {self.log.read_text()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.p.stdin.close()
            self.p.wait(timeout=60)
        except Exception:  # noqa: BLE001
            self.p.kill()
            self.p.wait()
        finally:
            self._err.close()


def _stat(p: Path):
    try:
        s = p.stat()
    except FileNotFoundError:
        return None
    return s.st_ino, s.st_mtime_ns, s.st_size


def _snapshot(out: Path) -> dict:
    return {p.name: _stat(p) for p in out.iterdir()} if out.exists() else {}


def _is_temp(name: str, of=OUTPUTS) -> bool:
    return name.endswith(".tmp") and any(name.startswith(f".{n}.") and len(name) > len(n) + 6 for n in of)


def _new_temp(snap: dict, before: dict, of) -> bool:
    """A temp file this trial's run is writing (not one an earlier kill left: the run removes those at start)."""
    return any(_is_temp(n, of) and n not in before for n in snap)


def _same_lora(a, b) -> None:
    assert a.modules.keys() == b.modules.keys()
    for k, m in a.modules.items():
        # Bit-identical expected, not merely close: one process and thread, same seed, same machine and software,
        # and the checkpoint holds every piece of state the loop reads (adapter, Adam moments, duals, both RNGs)
        # at a step boundary. atol=rtol=0 would do; the tiny tolerance only spares a denormal-level flake.
        torch.testing.assert_close(b.modules[k].down, m.down, rtol=0, atol=1e-12)
        torch.testing.assert_close(b.modules[k].up, m.up, rtol=0, atol=1e-12)


def check_folder(out: Path, reference) -> int | None:
    """Every file under a final name is complete; returns the checkpoint's step (None if there is none)."""
    step = None
    for p in sorted(out.iterdir()):
        n = p.name
        if _is_temp(n):
            continue  # a write the kill cut short: only ever under a temp name
        assert n in OUTPUTS, f"unexpected file {n} in {out}"
        try:
            if n in (LORA, PARTIAL):
                lora = load_lora(p)  # raises on a truncated or corrupt file
                if n == LORA:  # only a finished training is ever exported under the final name
                    assert int(lora.metadata["unlearn.steps"]) == STEPS
                    _same_lora(reference, lora)
            elif n == "metrics.json":
                m = json.loads(p.read_text())
                assert METRIC_KEYS <= m.keys() and m["steps"] == STEPS
            elif n == "report.html":
                html = p.read_text()
                assert html.startswith("<!doctype html>") and html.rstrip().endswith("</body></html>")
            elif n.endswith(".png"):
                blob = p.read_bytes()
                assert blob.startswith(b"\x89PNG\r\n\x1a\n") and blob.endswith(b"IEND\xaeB`\x82")
            elif n == CKPT:
                state = torch.load(p, map_location="cpu", weights_only=True)
                step = int(state["step"])
                assert 0 < step < STEPS and step % 2 == 0 and state["job"]["steps"] == STEPS
        except Exception as e:
            raise AssertionError(f"{out.name}/{n} ({p.stat().st_size} bytes) is broken: {type(e).__name__}: {e}") from e
    return step


def _phase(before: dict, after: dict, killed: bool, rc: int) -> str:
    """Where the kill landed, from what this trial wrote (a new inode or mtime, or a temp file)."""
    if not killed:
        return "finished" if rc == 0 else "failed"
    new = {n for n, s in after.items() if s != before.get(n)}
    if CKPT not in after and LORA in after:
        return "exiting"  # every output written and the checkpoint removed: only the exit was left
    if new & set(SAVED) or any(_is_temp(n, SAVED) for n in new):
        return "saving"
    if CKPT in new or any(_is_temp(n, [CKPT]) for n in new):
        return "training"
    return "startup"


def _trigger(mode: str, rng: random.Random, before: dict, window: float):
    """A predicate (snapshot, seconds since start) -> kill now?, for one trial."""
    ck0 = before.get(CKPT)
    if mode == "uniform":
        at = rng.uniform(0.0, window)
        return lambda snap, t: t >= at
    if mode == "checkpoint":  # right after a new checkpoint, at once or a moment later (into the next step)
        delay = rng.choice([0.0, rng.uniform(0.0, 0.3)])
        since = [None]

        def after_checkpoint(snap, t):
            if since[0] is None and snap.get(CKPT) not in (None, ck0):
                since[0] = t
            return since[0] is not None and t >= since[0] + delay
        return after_checkpoint
    if mode == "checkpoint-temp":  # while a checkpoint is being written, if the poll catches it; else after the 2nd
        seen = [ck0]

        def during_checkpoint(snap, t):
            if snap.get(CKPT) is not None and snap.get(CKPT) != seen[-1]:
                seen.append(snap.get(CKPT))
            return _new_temp(snap, before, [CKPT]) or len(seen) > 2
        return during_checkpoint
    if mode in ("lora", "metrics"):  # the LoRA or metrics.json (or its temp file) appears: at once or a moment later
        target = LORA if mode == "lora" else "metrics.json"
        delay = rng.choice([0.0, rng.uniform(0.0, 0.3)]) if mode == "lora" else 0.0
        since = [None]

        def after_output(snap, t):
            if since[0] is None and (snap.get(target) not in (None, before.get(target))
                                     or _new_temp(snap, before, [target])):
                since[0] = t
            return since[0] is not None and t >= since[0] + delay
        return after_output
    if mode == "output-temp":  # while the LoRA, a figure, metrics.json or report.html is being written, if caught;
        def during_saving(snap, t):  # else once the LoRA is there
            return _new_temp(snap, before, SAVED) or snap.get(LORA) not in (None, before.get(LORA))
        return during_saving
    raise ValueError(mode)


def run_trial(zyg: Zygote, out: Path, mode: str, rng: random.Random, log: Path, window: float) -> dict:
    before = _snapshot(out)
    t0 = time.perf_counter()
    zyg.ask(op="run", argv=[*ARGS, "--out", str(out), "--resume"], log=str(log))
    fire = _trigger(mode, rng, before, window)
    fallback = False
    while True:
        t = time.perf_counter() - t0
        snap = _snapshot(out)
        fallback = mode not in SAVING_MODES and (snap.get(LORA) not in (None, before.get(LORA))
                                                 or _new_temp(snap, before, [LORA]))
        if fire(snap, t) or fallback:
            rc = zyg.ask(op="kill")["rc"]
            break
        rc = zyg.ask(op="poll")["rc"]
        if rc is not None:
            break
        if t > 300:
            raise AssertionError(f"trial stuck ({mode}); log: {log.read_text()[-2000:]}")
        time.sleep(0.002)
    killed = rc == -signal.SIGKILL
    after = _snapshot(out)
    phase = _phase(before, after, killed, rc)
    assert phase != "failed", f"the run failed (exit code {rc}): {log.read_text()[-3000:]}"
    # the temp files an earlier kill left are removed when the next run starts (run_job), before it writes
    if phase in ("training", "saving", "exiting", "finished"):
        stale = [n for n in before if _is_temp(n) and n in after and after[n] == before[n]]
        assert not stale, f"stale temp files survived a run: {stale}"
    return {"mode": mode + (" (late)" if fallback else ""), "phase": phase, "seconds": time.perf_counter() - t0,
            "temp_left": sum(_is_temp(n) and after[n] != before.get(n) for n in after)}


def test_sigkill_while_training_and_saving_leaves_only_complete_files_and_resume_completes(tmp_path):
    t_all = time.perf_counter()
    zyg = Zygote(tmp_path / "zygote.log")
    (tmp_path / "logs").mkdir()
    try:
        # 1. the uninterrupted reference run (forked, like the trials; the final --resume is a plain process)
        ref_dir = tmp_path / "reference"
        zyg.ask(op="ping")  # waits for the imports
        t = time.perf_counter()
        zyg.ask(op="run", argv=[*ARGS, "--out", str(ref_dir)], log=str(tmp_path / "logs" / "reference.log"))
        while (rc := zyg.ask(op="poll")["rc"]) is None:
            time.sleep(0.05)
        ref_seconds = time.perf_counter() - t
        assert rc == 0, (tmp_path / "logs" / "reference.log").read_text()[-3000:]
        reference = load_lora(ref_dir / LORA)
        assert check_folder(ref_dir, reference) is None and sorted(p.name for p in ref_dir.iterdir()) == sorted(SAVED)
        ref_metrics = json.loads((ref_dir / "metrics.json").read_text())
        step_s = ref_metrics["train_seconds"] / STEPS

        # 2. the kills, chained on one folder: each trial resumes whatever the previous kill left
        rng = random.Random(8)
        training, saving = TRAINING_MODES[:], SAVING_MODES[:]
        rng.shuffle(training)
        rng.shuffle(saving)
        saving.remove("lora")
        plan = training + saving + ["lora"]  # the last kill lands early in saving: a checkpoint is left to resume
        chains, trials = 1, []
        out = tmp_path / "chain1"
        t_trials = time.perf_counter()
        i = 0
        print()
        while True:
            step = check_folder(out, reference) if out.exists() else None
            count = Counter(t["phase"] for t in trials)
            if i < len(plan):
                mode = plan[i]
            elif count["training"] < MIN_TRAINING:  # the timing was unlucky: top up (a fresh chain if at the end)
                mode = "checkpoint"
                if step == LAST_CHECKPOINT:
                    chains += 1
                    out, step = tmp_path / f"chain{chains}", None
            elif (count["saving"] < MIN_SAVING or len(trials) - count["finished"] < MIN_KILLS
                  or not (out / CKPT).exists()):
                mode = "lora"
            else:
                break
            assert i < 2 * len(plan), f"cannot place the kills: {count}"
            window = 1.5 + (STEPS - (step or 0)) * step_s  # startup in the fork, then the remaining steps
            res = run_trial(zyg, out, mode, rng, tmp_path / "logs" / f"trial{i:02d}.log", window)
            res.update(chain=chains, step=step)
            trials.append(res)
            print(f"  trial {i:2d}  chain {chains}  from step {step or 0:2d}  {res['mode']:<15} {res['phase']:<8} "
                  f"{res['seconds']:5.1f} s" + ("  (killed mid-write)" if res["temp_left"] else ""), flush=True)
            check_folder(out, reference)
            if res["phase"] in ("finished", "exiting"):  # nothing left to resume here: a fresh folder
                chains += 1
                out = tmp_path / f"chain{chains}"
            i += 1
        trials_seconds = time.perf_counter() - t_trials

        # 3. a plain `python -m unlearn_core ... --resume` completes the last chain, bit-identical to the reference
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "unlearn_core", *ARGS, "--out", str(out), "--resume"], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=600)
        final_seconds = time.perf_counter() - t
        assert r.returncode == 0, r.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == sorted(SAVED)  # no checkpoint, no temp file left
        check_folder(out, reference)  # includes: the LoRA equals the reference's
        m = json.loads((out / "metrics.json").read_text())
        assert m["dual_history"] == ref_metrics["dual_history"] and m["constraints"] == ref_metrics["constraints"]
    finally:
        zyg.close()

    kills = [t for t in trials if t["phase"] not in ("finished",)]
    by_phase = Counter(t["phase"] for t in kills)
    rows = []
    for phase in ("startup", "training", "saving", "exiting"):
        ts = [t for t in kills if t["phase"] == phase]
        modes = Counter(t["mode"] for t in ts)
        rows.append(f"  {phase:<9} {len(ts):>5} {sum(t['temp_left'] > 0 for t in ts):>12}   "
                    + ", ".join(f"{k} {v}" for k, v in sorted(modes.items())))
    print(f"SIGKILL fault injection: {len(kills)} kills in {len(trials)} trials, {chains} chain(s) of resumes, "
          f"{STEPS} steps, checkpoint every 2\n"
          f"  {'phase':<9} {'kills':>5} {'mid-write':>12}   trigger\n" + "\n".join(rows) + "\n"
          f"  runs that finished before the kill: {len(trials) - len(kills)}\n"
          f"  seconds: reference run {ref_seconds:.0f}, trials {trials_seconds:.0f}, final --resume "
          f"{final_seconds:.0f}, total {time.perf_counter() - t_all:.0f}")
    assert len(kills) >= MIN_KILLS and by_phase["training"] >= MIN_TRAINING and by_phase["saving"] >= MIN_SAVING
