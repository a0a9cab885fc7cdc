"""The primal–dual loop: one loop for every method (methods are data, see ``methods.py``).

Concept methods (RU, ESD, LU), one step:
  every ``refresh_every`` steps roll the *current* model's stochastic trajectories at each edited prompt (no grad)
  and keep every state (one rollout feeds all its timesteps) → draw a batch of (x_t, t) → one batched frozen
  forward for (anchor, concept[, reference]) with the adapter off → the closed-form target for the current λ →
  one adapted forward + backward → optimizer step. Kept prompts ("stay within ρ") add (1 + μ)‖ε_θ − ε_0‖² on
  their own trajectories, μ the dual of the retention constraint.
Data methods (FU, NegGrad, SISS): noised retain/forget batches, DSM(retain) − λ DSM(forget).
Every ``dual_every`` steps each constraint is estimated, smoothed, and its λ takes a projected ascent step.
LU with ``lam_init="target"``: before the first step λ is solved as the root of constraint(p_λ) = b on the
closed-form target's own samples (the frozen model alone: :meth:`Trainer.solve_target_lambdas`), so the ascent
starts at the optimum of the known primal and only corrects for the adapter falling short of it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import targets
from .denoiser import Denoiser, predict_groups, rollout_many, same_conditioning
from .dual import Constraint, DualVariable
from .estimate import log_ratio, nelbo, path_kl_terms
from .methods import MethodSpec, get_method

log = logging.getLogger(__name__)

__all__ = ["ConceptSpec", "DataSpec", "Problem", "TrainConfig", "Trainer", "TrainResult", "Cancelled"]


class Cancelled(RuntimeError):
    """Raised inside the loop when the cancel callback says stop; the trainer returns a partial result."""


@dataclass
class ConceptSpec:
    """One concept to forget. Prompts are whatever the denoiser's ``encode`` accepts.

    ``concept`` may be a list of wordings of one concept ("three", "the number 3", …): they share one constraint
    and one λ, each wording is edited on its own trajectories, and the constraint is their average — training
    on several wordings is what makes erasure carry over to paraphrases.
    ``edit`` is the prompt whose output changes (default: each wording itself, as in ESD; set it to erase an
    attribute *from* a broader prompt); ``anchor`` the prompt whose distribution p0 to stay close to (default "");
    ``reference`` the base of LU's likelihood ratio (default: the anchor).
    """

    @property
    def wordings(self) -> list:
        return list(self.concept) if isinstance(self.concept, (list, tuple)) else [self.concept]

    concept: Any
    anchor: Any = ""
    edit: Any = None
    reference: Any = None


@dataclass
class DataSpec:
    """Data unlearning: ``forget`` (and ``retain``) are tensors of clean samples in the model's input space."""

    forget: torch.Tensor
    retain: torch.Tensor
    cond: Any = ""


@dataclass
class Problem:
    """What to unlearn, how far, and with which method.

    ``threshold`` is read per ``threshold_mode``:
      "increase" — the constraint must move by this much from the frozen model's own value, in the estimator's
                   units (RU: path KL up by X; FU: forget-set KL up by X; LU: E[r] down by X). Estimator biases
                   that the frozen and adapted model share cancel.
      "multiple" — X times the calibrated separation between anchor and concept (1.0: "as far from the concept as
                   the anchor is"); for LU, E[r] ≤ base − (X − 1)·|separation| … see :meth:`Trainer.thresholds`.
      "raw"      — the constraint's value itself, in estimator units.
    For baselines (frozen λ) the threshold is only reported against; ``fixed_weight`` sets their λ/η/w.
    """

    method: str
    concepts: Sequence[ConceptSpec] = ()
    data: DataSpec | None = None
    keep: Sequence[Any] = ()
    keep_rho: float = 0.05  # retention: path KL of kept prompts ≤ ρ × separation
    threshold: float | Sequence[float] = 1.0
    threshold_mode: str = "increase"
    fixed_weight: float | None = None  # ESD η, NegGrad w, SISS λ; or a frozen λ for the constrained methods
    lam_max: float | None = None
    # λ at the start: a number, or "closed" (RU only): per constraint, the λ whose closed-form target meets the
    # threshold on the calibration states. ε* = ε0 + η(ε0 − ε_q) is (1 + η) times as far from ε_q as ε0 is, so its
    # path KL to q is (1 + η)² × the separation, and b = x × separation gives 1 + η = √x, λ = η/(1 + η) = 1 − 1/√x
    # (0 for x ≤ 1). Exact for the target on the calibration states, not for the adapter on its own trajectories:
    # on the demo this start did worse than 0 (see unlearn.py's docstring). Or "target" (LU only): the λ at which
    # the closed-form target's own samples meet the threshold (Trainer.solve_target_lambdas, before training).
    lam_init: float | str = 0.0

    def __post_init__(self) -> None:
        self.spec: MethodSpec = get_method(self.method)
        if self.spec.kind == "concept":
            if not self.concepts:
                raise ValueError(f"method {self.method!r} unlearns concepts: give at least one concept")
            for c in self.concepts:
                if not c.wordings:
                    raise ValueError("a concept has no wordings; give the text of what to unlearn")
                for w in c.wordings:
                    if isinstance(w, str) and not w.strip():
                        raise ValueError("a concept prompt is empty; give the text of what to unlearn")
                    if w == c.anchor:
                        raise ValueError(f"concept {w!r} equals its anchor: nothing to move away from")
        else:
            if self.data is None:
                raise ValueError(f"method {self.method!r} unlearns data: give forget (and retain) samples")
            if len(self.data.forget) == 0:
                raise ValueError("the forget set is empty")
            if len(self.data.retain) == 0:
                raise ValueError("the retain set is empty")
        if self.threshold_mode not in ("increase", "multiple", "raw"):
            raise ValueError(f"threshold_mode must be increase|multiple|raw, got {self.threshold_mode!r}")
        ths = [self.threshold] * self.n_constraints if isinstance(self.threshold, (int, float)) else list(self.threshold)
        if len(ths) != self.n_constraints:
            raise ValueError(f"{len(ths)} thresholds for {self.n_constraints} constraints")
        for th in ths:
            if not (isinstance(th, (int, float)) and math.isfinite(th)) or (th <= 0 and self.threshold_mode != "raw"):
                raise ValueError(f"threshold must be a positive number, got {th!r}")
        self.thresholds = [float(t) for t in ths]
        hi = self.spec.lam_hi if self.lam_max is None else self.lam_max
        if self.spec.objective in ("reverse_kl", "forward_kl", "siss") and not (0 < hi < 1):
            raise ValueError(f"λ bound for {self.method!r} must be in (0, 1) (the target divides by 1 − λ), got {hi}")
        if not (0 < hi and math.isfinite(hi)):
            raise ValueError(f"λ bound must be a positive finite number, got {hi}")
        self.lam_hi = hi
        if isinstance(self.lam_init, str):
            if self.lam_init not in ("closed", "target"):
                raise ValueError(f"initial λ must be a number, 'closed' or 'target', got {self.lam_init!r}")
            if self.lam_init == "closed" and self.spec.objective != "reverse_kl":
                raise ValueError(f"initial λ 'closed' is the reverse-KL target's; method {self.method!r} needs a "
                                 f"number")
            if self.lam_init == "target" and self.spec.objective != "likelihood_ratio":
                raise ValueError(f"initial λ 'target' is solved on LU's log-ratio target; method {self.method!r} "
                                 f"needs a number")
        elif not (0 <= self.lam_init <= hi):
            raise ValueError(f"initial λ {self.lam_init} is outside [0, {hi}]")
        if self.spec.frozen and self.fixed_weight is None:
            raise ValueError(f"baseline {self.method!r} needs fixed_weight (ESD η, NegGrad weight, SISS λ)")
        if self.fixed_weight is not None and not (self.fixed_weight >= 0 and math.isfinite(self.fixed_weight)):
            raise ValueError(f"fixed_weight must be a finite number >= 0, got {self.fixed_weight!r}")
        if self.keep_rho <= 0:
            raise ValueError("keep_rho must be > 0")

    @property
    def n_constraints(self) -> int:
        return len(self.concepts) if self.spec.kind == "concept" else 1

    def frozen_lambda(self) -> float | None:
        if self.fixed_weight is None:
            return None
        if self.method == "esd":
            return targets.eta_to_lambda(self.fixed_weight)
        return self.fixed_weight


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    batch: int = 256
    dual_every: int = 10
    dual_lr: float = 0.05
    dual_smoothing: float = 0.5
    # "network": the adapted model's own value on every step's draws; "fresh": the same, from the steps right after
    # a refresh only (states the adapter has not trained on yet; between two refreshes λ steps on the latest such
    # value); "target": at p_λ (RU only)
    dual_estimate: str = "network"
    # "fresh": how many steps from each refresh count as fresh (1: the refresh step alone). One step's draws are a
    # noisy estimate; the next few have seen one or two updates on a sliver of the buffer's states
    fresh_steps: int = 1
    # "fresh": at each refresh, this many more states per wording of the new trajectories are read without a
    # gradient step (0: none), weighted with the refresh step's own draws by count. A step draws few per wording
    # (batch / wordings: 8 on the demo), and λ's ripple is that estimate's noise
    fresh_samples: int = 0
    rollouts: int = 32
    rollout_jumps: int | None = None  # None: every step of the schedule
    # First timestep of the rollouts (None: the noisiest). Set it to where your sampler starts: a squared-cosine
    # schedule's last index has ᾱ ≈ 0 and its jump would dominate every path KL (see NoiseSchedule).
    rollout_t_max: int | None = None
    refresh_every: int = 10
    guidance: float = 1.0
    null_prompt: Any = ""
    kl_t_min: int = 0
    estimate_samples: int = 256  # samples for LU's E[r] and the final estimates
    estimate_draws: int = 1
    # NELBO / log-ratio sums (FU's forget set, LU's E[r]) visit the elbo_stride // 5 smallest timesteps and every
    # elbo_stride-th one above them (an offset per sample, weighted ×stride): unbiased and about stride× cheaper
    # (estimate.nelbo); LU estimates E[r] at every dual step, so it pays most
    elbo_stride: int = 1
    # The separation (calibration) reads each wording's ε at every calibration_stride-th jump of its anchor
    # trajectories, from an offset per trajectory (×stride: unbiased). Its noise is mostly the trajectories': on the
    # demo's 32, relative SE 5.0 % at 1, 5.1 % at 2, 5.5 % at 3, 6.8 % at 5 (benchmarks/calibration_noise.py), with
    # 0.47 of stride 1's forwards at 3. 1 here (every jump); the CLI's demo defaults use 3
    calibration_stride: int = 1
    grad_clip: float = 10.0
    seed: int = 0
    max_bad_steps: int = 20
    keep_weight: float = 1.0
    keep_batch: int | None = None  # samples per kept prompt and step (None: ``batch``); many kept prompts → small
    keep_rollouts: int | None = None  # trajectories per kept prompt and refresh (None: ``rollouts``)
    # Samples per adapted forward + backward (None: all of a step's samples in one). A step's gradient is then
    # accumulated over micro-batches: the same step up to float rounding, with the autograd activations of
    # micro_batch samples instead of the whole step's (what dominates memory past the weights on a large UNet).
    micro_batch: int | None = None
    # Primal–dual iterates converge on average, not pointwise: λ keeps oscillating around λ* by the controller's
    # ripple. For the last ``polish_fraction`` of the steps each λ is frozen at its mean over the preceding
    # ``polish_fraction`` of the run, so the adapter converges to p_λ̄ (the reported λ).
    polish_fraction: float = 0.2
    lr_final_ratio: float = 1.0  # < 1: cosine decay of the primal learning rate to lr × this at the last step
    # Fraction of the steps before the first dual update: the adapter first moves to λ_init's minimiser (λ = 0:
    # the anchor's distribution, which already meets a threshold of 1× the separation), so the dual ascent then
    # starts from trajectories like the ones it will end on instead of the concept's own.
    dual_warmup: float = 0.0
    # Every ``checkpoint_every`` steps (0: never) the trainer hands its whole state to ``on_checkpoint`` (see
    # Trainer.state_dict); the interval is rounded up to a multiple of dual_every and refresh_every, where the
    # state is smallest (no half-accumulated dual statistics, trajectories about to be re-drawn).
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "dual_every", "rollouts", "refresh_every", "estimate_samples", "elbo_stride",
                     "calibration_stride"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.rollout_t_max is not None and not (isinstance(self.rollout_t_max, int) and self.rollout_t_max >= 0):
            raise ValueError(f"rollout_t_max must be an integer >= 0 or None, got {self.rollout_t_max!r}")
        for name in ("keep_batch", "keep_rollouts", "micro_batch"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {v!r}")
        if not (self.lr > 0 and self.dual_lr > 0):
            raise ValueError("learning rates must be > 0")
        if self.dual_estimate not in ("network", "fresh", "target"):
            raise ValueError(f"dual_estimate must be 'network', 'fresh' or 'target', got {self.dual_estimate!r}")
        if not (isinstance(self.fresh_samples, int) and self.fresh_samples >= 0):
            raise ValueError(f"fresh_samples must be an integer >= 0, got {self.fresh_samples!r}")
        if not (isinstance(self.fresh_steps, int) and 1 <= self.fresh_steps <= self.refresh_every):
            raise ValueError(f"fresh_steps must be an integer in [1, refresh_every = {self.refresh_every}], got "
                             f"{self.fresh_steps!r}")
        if not (0.0 <= self.polish_fraction < 0.5):
            raise ValueError(f"polish_fraction must be in [0, 0.5), got {self.polish_fraction!r}")
        if not (0.0 <= self.dual_warmup < 1.0 - self.polish_fraction):
            raise ValueError(f"dual_warmup must be in [0, 1 − polish_fraction), got {self.dual_warmup!r}")
        if not (0.0 < self.lr_final_ratio <= 1.0):
            raise ValueError(f"lr_final_ratio must be in (0, 1], got {self.lr_final_ratio!r}")
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0):
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")

    @property
    def checkpoint_interval(self) -> int:
        """``checkpoint_every`` rounded up to a multiple of dual_every and refresh_every (0: no checkpoints)."""
        if self.checkpoint_every == 0:
            return 0
        unit = math.lcm(self.dual_every, self.refresh_every)
        return -(-self.checkpoint_every // unit) * unit

    def fingerprint(self) -> dict:
        """The options a resumed run must share with the run that wrote the checkpoint."""
        out = {}
        for k, v in dataclasses.asdict(self).items():
            if k not in ("checkpoint_every", "micro_batch"):  # neither changes the run (micro_batch: rounding)
                out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
        return out


@dataclass
class TrainResult:
    method: str
    steps_done: int
    cancelled: bool
    lambdas: list[float]
    thresholds: list[float]
    calibration: list[float]
    separation: list[float]
    final_estimates: list[float]
    history: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _Buffer:
    """States of the current model's trajectories at one prompt: (x_t, t, path-KL weight)."""

    def __init__(self) -> None:
        self.x = self.t = self.c = self.final = None
        self.n_jumps = 0

    def fill(self, states: torch.Tensor, ts: torch.Tensor, weights: torch.Tensor) -> None:
        J, n = len(ts) - 1, states.shape[1]
        self.x = states[:-1].reshape(J * n, *states.shape[2:])
        self.t = ts[:-1].repeat_interleave(n)
        self.c = weights.repeat_interleave(n)
        self.final = states[-1]
        self.n_jumps = J

    def draw(self, k: int, g: torch.Generator):
        idx = torch.randint(len(self.t), (k,), generator=g)
        return self.x[idx], self.t[idx], self.c[idx]


class Trainer:
    """Primal–dual unlearning of a :class:`Denoiser`'s adapter.

    ``callbacks`` receive event dicts ({"type": "step" | "dual" | "nan" | "calibration" | "samples" | "done", ...};
    "samples" carries a tensor: one sample of the current model at the first concept wording, at every refresh);
    ``should_stop()`` is polled every step (cancel); a stop returns the result so far with ``cancelled=True``.
    """

    def __init__(self, denoiser: Denoiser, problem: Problem, config: TrainConfig | None = None,
                 callbacks: Sequence[Callable[[dict], None]] = (), should_stop: Callable[[], bool] | None = None,
                 on_checkpoint: Callable[[dict], None] | None = None):
        self.d = denoiser
        self.on_checkpoint = on_checkpoint
        self.p = problem
        self.cfg = config or TrainConfig()
        self.callbacks = list(callbacks)
        self.should_stop = should_stop or (lambda: False)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self._warned_dominance = False
        self._fresh_est: list[float] | None = None  # dual_estimate "fresh": the latest value on unseen states
        self.spec = problem.spec
        if self.spec.kind == "concept" and self.cfg.dual_estimate == "target" and self.spec.objective != "reverse_kl":
            raise ValueError("dual_estimate='target' is available for RU/ESD only")
        params = self.d.trainable_parameters()
        if not params:
            raise ValueError("the denoiser has no trainable adapter parameters")
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr)
        self._encode_all()
        self.constraints: list[Constraint] = []
        self.keep_constraints: list[Constraint] = []
        self.calibration: list[float] = []
        self.separation: list[float] = []
        self.target_solve: dict | None = None  # solve_target_lambdas' reads (lam_init "target")

    # -------------------------------------------------------------------- set-up
    def _encode_all(self) -> None:
        enc = self.d.encode
        if self.spec.kind == "concept":
            self.terms = []  # one per wording; "ci" is the index of the concept's constraint
            for ci, c in enumerate(self.p.concepts):
                ref = c.anchor if c.reference is None else c.reference
                for w in c.wordings:
                    edit = w if c.edit is None else c.edit
                    anchor_key = c.anchor if isinstance(c.anchor, (str, int, float)) else id(c.anchor)
                    self.terms.append({"edit": enc([edit]), "anchor": enc([c.anchor]), "anchor_key": anchor_key,
                                       "concept": enc([w]),
                                       "ref": enc([ref]), "buf": _Buffer(), "name": str(c.wordings[0]), "ci": ci})
            self.keep_terms = [{"cond": enc([k]), "buf": _Buffer(), "name": str(k)} for k in self.p.keep]
            self.null = enc([self.cfg.null_prompt]) if self.cfg.guidance != 1.0 else None
        else:
            self.data_cond = enc([self.p.data.cond])

    def _emit(self, event: dict) -> None:
        for cb in self.callbacks:
            cb(event)

    def _rollout_many(self, conds: list, ns: list[int], adapted: bool, with_eps: bool = False) -> tuple:
        """Trajectories at several prompts from one batched rollout (every jump: one forward for all of them):
        (states, timesteps, path-KL weights[, each prompt's own ε at every state but the last])."""
        jumps = self.cfg.rollout_jumps or self.d.schedule.num_steps
        states, ts, *eps = rollout_many(self.d, conds, ns, jumps, self.gen, adapted=adapted, guidance=self.cfg.guidance,
                                        uncond=self.null, t_max=self.cfg.rollout_t_max, with_eps=with_eps)
        weights = self.d.schedule.path_kl_weight(ts[:-1], ts[1:]).float()
        if not self._warned_dominance:
            self._warned_dominance = True
            ratio = self.d.schedule.first_jump_dominance(ts)
            if ratio > 1e3:
                msg = (f"the rollouts' first jump (t={int(ts[0])}) weighs {ratio:.3g}× the median jump in the path KL; "
                       "the constraint then measures little else. Start the rollouts where your sampler starts "
                       "(TrainConfig.rollout_t_max)")
                log.warning(msg)
                self._emit({"type": "warning", "message": msg})
        return (states, ts, weights, *eps)

    def _path_kl(self, buf: _Buffer, eps_a: torch.Tensor, eps_b: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> float:
        """n_jumps × mean over the jumps kept (t ≥ kl_t_min) of c‖Δε‖²: one trajectory's path KL."""
        keep = t >= self.cfg.kl_t_min
        if not bool(keep.any()):
            return 0.0
        frac = float(keep.float().mean()) if self.cfg.kl_t_min > 0 else 1.0
        return float(path_kl_terms(eps_a[keep], eps_b[keep], c[keep]).mean()) * buf.n_jumps * frac

    def _frozen(self, x: torch.Tensor, t: torch.Tensor, conds: list) -> list[torch.Tensor]:
        with torch.no_grad():
            outs = self.d.predict_many(x, t, conds, adapted=False)
        for o in outs:
            targets.check_finite("the frozen model's ε", o)
        return outs

    # -------------------------------------------------------------------- calibration
    @torch.no_grad()
    def calibrate(self) -> list[float]:
        """The constraint's value under the frozen model (λ = 0's distribution), in estimator units, and the
        anchor–concept separation used for "multiple" thresholds and as the dual step's scale."""
        n = self.cfg.estimate_samples
        self.calibration, self.separation = [], []
        if self.spec.kind == "concept":
            per_term_cal, per_term_sep = [], []
            # wordings that share an anchor (the usual case: "") share its trajectories
            keys = list(dict.fromkeys(term["anchor_key"] for term in self.terms))
            firsts = [next(term for term in self.terms if term["anchor_key"] == k) for k in keys]
            n_cal = max(n // 2, self.cfg.rollouts)
            # the anchor's own ε at every state comes with its rollout; the wordings' are read at every
            # calibration_stride-th jump from an offset per trajectory (own generator: the training draws stay put)
            anchor_states, ts, w, anchor_eps = self._rollout_many([term["anchor"] for term in firsts],
                                                                  [n_cal] * len(keys), adapted=False, with_eps=True)
            offsets = torch.Generator().manual_seed(self.cfg.seed + 7919)
            for states, e_anchor, key in zip(anchor_states, anchor_eps, keys):
                members = [term for term in self.terms if term["anchor_key"] == key]
                J, m = e_anchor.shape[:2]
                k = min(self.cfg.calibration_stride, J)  # every offset reads at least one jump of its trajectory
                jump = torch.arange(J).unsqueeze(1).expand(J, m)
                visit = (jump % k == torch.randint(k, (m,), generator=offsets)) & (ts[:-1] >= self.cfg.kl_t_min).unsqueeze(1)
                on = visit.to(states.device)
                x, e0, t = states[:-1][on], e_anchor[on], ts[:-1].unsqueeze(1).expand(J, m)[visit]
                c = w.unsqueeze(1).expand(J, m)[visit] * k
                seps = [0.0] * len(members)
                for chunk in torch.split(torch.arange(len(t)), self._chunk(len(members))):
                    outs = self._frozen(x[chunk], t[chunk], [mem["concept"] for mem in members])
                    for j in range(len(members)):
                        seps[j] += float(path_kl_terms(e0[chunk], outs[j], c[chunk]).sum())
                for mem, sep in zip(members, seps):
                    mem["calib"] = (sep / m, states[-1])
            for term in self.terms:
                sep, final = term.pop("calib")
                per_term_sep.append(sep)
                if self.spec.constraint == "path_kl":
                    per_term_cal.append(sep)  # λ = 0 gives p = p(anchor)
                else:
                    r = self._log_ratio(final[:n], term, self.cfg.seed, draws=self.cfg.estimate_draws)
                    per_term_cal.append(float(r.mean()))
            self.calibration = self._per_constraint(per_term_cal)
            self.separation = self._per_constraint(per_term_sep)
        else:
            f = self.p.data.forget
            # every FU request is a fraction of this one read: at a timestep stride it takes up to 8 draws (the demo's
            # five forget images at stride 25 read 473–584 nats over three seeds with one draw, 569–579 with eight:
            # docs/benchmarks/frontier-2026-12-07c/d); stride 1 reads every timestep once per draw: estimate_draws
            draws = max(self.cfg.estimate_draws, min(self.cfg.elbo_stride, 8))
            base = nelbo(self.d, f, self.data_cond, adapted=False, draws=draws,
                         t_max=self.cfg.rollout_t_max, t_stride=self.cfg.elbo_stride,
                         generator=torch.Generator().manual_seed(self.cfg.seed))
            self.calibration.append(0.0)  # the increase of the forget-set KL is 0 at the frozen model
            self.separation.append(float(base.mean()))
        self._emit({"type": "calibration", "calibration": self.calibration, "separation": self.separation})
        return self.calibration

    def _log_ratio(self, x0: torch.Tensor, term: dict, seed: int, draws: int = 1) -> torch.Tensor:
        """Per sample of ``x0``, the frozen model's log-ratio log p(x0 | concept) − log p(x0 | reference) of a
        wording, as every LU read takes it: NELBO sums from the sampler's first step down to kl_t_min at the
        configured timestep stride, with the noise of ``seed``."""
        return log_ratio(self.d, x0, term["concept"], term["ref"], adapted=False, draws=draws, t_min=self.cfg.kl_t_min,
                         t_max=self.cfg.rollout_t_max, t_stride=self.cfg.elbo_stride, seed=seed)

    @torch.no_grad()
    def target_estimate(self, lams: Sequence[float], n: int, seed: int) -> list[float]:
        """LU: each constraint's E[log-ratio] over ``n`` samples per wording of its closed-form target at
        ``lams[i]`` — no adapter: the rollout steps with the frozen model's ε combined as the target at every state
        (ε_anchor − λ(ε_concept − ε_reference)), guided against the null prompt as the training rollouts are, then
        reads the dual step's log-ratio on the samples. ``seed`` fixes the rollout noise and the NELBO noise, so
        two λ's values differ by the target's change, not by the draws (common random numbers)."""
        if self.spec.objective != "likelihood_ratio":
            raise ValueError(f"target_estimate reads LU's log-ratio target; method {self.p.method!r} has another")
        lam_of = [float(lams[term["ci"]]) for term in self.terms]

        def cond_eps(parts, e_us):
            groups, slots = [], []  # slots[k]: where each of (anchor, concept, reference) comes from
            for k, ((x, t), term) in enumerate(zip(parts, self.terms)):
                slot = []
                for key in ("anchor", "concept", "ref"):
                    if e_us is not None and same_conditioning(term[key], self.null):
                        slot.append(("u", k))  # the unconditional branch's ε: already paid for
                        continue
                    same = next((j for j, g in enumerate(groups) if g[0] is x and same_conditioning(g[2], term[key])), None)
                    if same is None:
                        groups.append((x, t, term[key]))
                        same = len(groups) - 1
                    slot.append(("g", same))
                slots.append(slot)
            outs = self._predict_micro(groups)
            eps = []
            for k, slot in enumerate(slots):
                e_a, e_q, e_r = (e_us[j] if src == "u" else outs[j] for src, j in slot)
                eps.append(targets.likelihood_ratio_target(e_a, e_q, e_r, lam_of[k]))
            return eps

        gen = torch.Generator().manual_seed(seed)
        jumps = self.cfg.rollout_jumps or self.d.schedule.num_steps
        states, _ts = rollout_many(self.d, [term["edit"] for term in self.terms], [n] * len(self.terms), jumps, gen,
                                   adapted=False, guidance=self.cfg.guidance, uncond=self.null,
                                   t_max=self.cfg.rollout_t_max, cond_eps=cond_eps)
        per_term = []
        for term, st in zip(self.terms, states):
            per_term.append(float(self._log_ratio(st[-1], term, seed + 1).mean()))
        return self._per_constraint(per_term)

    def solve_target_lambdas(self, n: int | None = None, evaluations: int = 3) -> list[float]:
        """LU: per constraint, the λ at which its closed-form target's E[log-ratio] meets the threshold — the dual
        solved where the primal is known in closed form (p_λ ∝ p0·exp(−λ r)), before any training. Secant steps on
        :meth:`target_estimate` (common random numbers; ``n`` samples per wording, default estimate_samples split
        over a concept's wordings, at least 8): the first from λ = 0 and a small tilt (0.05, or λ_max / 2 below
        that), each next one through the two reads nearest the threshold; ``evaluations`` reads in all, the last
        step not read. Clipped to [0, λ_max]. On the toy (E[r] 10 nats down) that lands within 10 % of the exact
        composed sampler's λ* (tested); on the demo the target's E[r] falls close to linearly up to λ ≈ 0.45, then
        flattens (docs/benchmarks/lu-target-2026-12-07.txt). Records each read in ``self.target_solve``."""
        b = self.thresholds()
        hi = self.p.lam_hi
        per = max(len(self.terms) // len(self.p.concepts), 1)
        n = n or max(self.cfg.estimate_samples // per, 8)
        seed = self.cfg.seed + 104729
        reads: list[list[list[float]]] = []  # [λ's, E[r]'s] per read
        t0 = time.perf_counter()

        def read(lams: list[float]) -> list[float]:
            vals = self.target_estimate(lams, n, seed)
            reads.append([list(lams), vals])
            self._emit({"type": "target_solve", "lambdas": list(lams), "estimates": vals, "thresholds": b})
            return vals

        pts = [[] for _ in b]  # per constraint: (λ, E) pairs read so far
        lams = [0.0] * len(b)
        nxt = [min(0.05, hi / 2)] * len(b)  # a small tilt: the first secant step is close to the slope at 0
        for k in range(max(evaluations, 2)):
            vals = read(lams)
            for i, v in enumerate(vals):
                pts[i].append((lams[i], v))
            if k == 0:
                lams = [0.0 if v <= bi else nx for v, bi, nx in zip(vals, b, nxt)]  # met at λ = 0: stays there
                continue
            for i, bi in enumerate(b):
                (l0, e0), (l1, e1) = sorted(pts[i], key=lambda p: abs(p[1] - bi))[:2]  # the two reads nearest b
                if l0 == l1 or e0 == e1:
                    nxt[i] = l0
                else:
                    nxt[i] = min(max(l0 + (bi - e0) * (l1 - l0) / (e1 - e0), 0.0), hi)
            lams = list(nxt)
        self.target_solve = {"samples_per_wording": n, "seed": seed, "reads": reads, "lambdas": lams, "thresholds": b,
                             "seconds": round(time.perf_counter() - t0, 1)}
        return lams

    def _chunk(self, n_conds: int) -> int:
        """States per forward when ``n_conds`` conditionings share one call: the denoiser's ``max_batch`` (a UNet
        on CPU slows down per sample past a few hundred; a toy MLP has no limit) split among them."""
        cap = getattr(self.d, "max_batch", None)
        return max(cap // n_conds, 1) if cap else 1 << 30

    def _per_constraint(self, per_term: list[float]) -> list[float]:
        """Average per-wording values into one value per concept constraint."""
        out = []
        for ci in range(len(self.p.concepts)):
            vals = [v for v, term in zip(per_term, self.terms) if term["ci"] == ci]
            out.append(sum(vals) / len(vals))
        return out

    def thresholds(self) -> list[float]:
        out = []
        for i, x in enumerate(self.p.thresholds):
            base, sep, mode = self.calibration[i], self.separation[i], self.p.threshold_mode
            if self.spec.constraint == "path_kl":
                b = {"increase": base + x, "multiple": x * sep, "raw": x}[mode]
            elif self.spec.constraint == "log_ratio":
                b = {"increase": base - x, "multiple": base - (x - 1.0) * abs(sep), "raw": x}[mode]
            else:
                b = {"increase": x, "multiple": x * abs(sep), "raw": x}[mode]
            out.append(b)
        return out

    def _make_constraints(self) -> None:
        frozen = self.p.frozen_lambda()
        if frozen is not None and not (0 <= frozen <= self.p.lam_hi):
            raise ValueError(f"the fixed weight gives λ = {frozen:.4g}, outside [0, {self.p.lam_hi}]")
        self.constraints = []
        solved = None
        if frozen is None and self.p.lam_init == "target":  # a resumed run has it from its checkpoint
            solved = self.target_solve["lambdas"] if self.target_solve else self.solve_target_lambdas()
        for i, b in enumerate(self.thresholds()):
            lam0 = frozen if frozen is not None else self.p.lam_init
            if lam0 == "target":
                lam0 = solved[i]
            if lam0 == "closed":
                x = b / self.separation[i] if self.separation[i] > 0 else 0.0
                lam0 = min(1.0 - 1.0 / math.sqrt(x), self.p.lam_hi) if x > 1.0 else 0.0
            if ((self.spec.constraint == "path_kl" and self.p.threshold_mode != "raw")
                    or (self.spec.constraint == "log_ratio" and self.p.threshold_mode == "multiple")):
                # the anchor–concept separation, the unit a "multiple" request is stated in: λ's step then grows
                # with the request. Scaled by the request's distance (b − calibration), LU's λ moved at most
                # dual_lr per update whatever it was asked for: on the demo it ended at 0.22 for 4× and 0.27 for
                # 5.5× (forgetting 0.83 both); ESD η = 0.5 forgets 0.92, and LU's target at λ is ESD's at η = λ
                scale = max(abs(self.separation[i]), 1e-8)
            else:
                scale = max(abs(b - self.calibration[i]), abs(b) * 1e-3, 1e-8)
            dual = DualVariable(value=lam0, lr=self.cfg.dual_lr, hi=self.p.lam_hi, frozen=frozen is not None,
                                smoothing=self.cfg.dual_smoothing, scale=scale)
            name = str(self.p.concepts[i].wordings[0]) if self.spec.kind == "concept" else "forget"
            self.constraints.append(Constraint(name, self.spec.sense, b, dual))
        self.keep_constraints = []
        if self.spec.kind == "concept":
            sep = max(min(self.separation), 1e-8)
            for term in self.keep_terms:
                dual = DualVariable(value=0.0, lr=self.cfg.dual_lr, hi=100.0, smoothing=self.cfg.dual_smoothing,
                                    scale=self.p.keep_rho * sep)
                self.keep_constraints.append(Constraint(f"keep:{term['name']}", "upper", self.p.keep_rho * sep, dual))

    # -------------------------------------------------------------------- steps
    def _concept_loss(self, step: int, stats: dict) -> torch.Tensor:
        """Every edited wording and kept prompt contributes; their frozen and adapted forwards are each batched
        into one call (``predict_groups``)."""
        cfg = self.cfg
        if step % cfg.refresh_every == 0:
            conds = [term["edit"] for term in self.terms] + [term["cond"] for term in self.keep_terms]
            ns = [cfg.rollouts] * len(self.terms) + [cfg.keep_rollouts or cfg.rollouts] * len(self.keep_terms)
            all_states, ts, w = self._rollout_many(conds, ns, adapted=True)
            for term, states in zip(self.terms + self.keep_terms, all_states):
                term["buf"].fill(states, ts, w)
            # what the concept's prompt makes now: a sample of the current model (a preview for front ends)
            self._emit({"type": "samples", "step": step, "name": self.terms[0]["name"],
                        "samples": self.terms[0]["buf"].final[:1].detach()})
            if cfg.fresh_samples and cfg.dual_estimate == "fresh" and self.spec.constraint == "path_kl":
                self._fresh_extra(stats, step)
        need_ref = self.spec.objective in ("likelihood_ratio", "likelihood")
        per_wording = max(cfg.batch // max(len(self.terms) // len(self.constraints), 1), 8)
        draws = [term["buf"].draw(per_wording, self.gen) for term in self.terms]
        keep_draws = [term["buf"].draw(cfg.keep_batch or cfg.batch, self.gen) for term in self.keep_terms]
        # frozen: (anchor, concept[, reference]) per wording, the kept prompt's own ε0 per kept prompt
        frozen_groups = []
        for term, (x, t, _) in zip(self.terms, draws):
            frozen_groups += [(x, t, term["anchor"]), (x, t, term["concept"])] + ([(x, t, term["ref"])] if need_ref else [])
        frozen_groups += [(x, t, term["cond"]) for term, (x, t, _) in zip(self.keep_terms, keep_draws)]
        frozen = self._predict_micro(frozen_groups)
        for o in frozen:
            targets.check_finite("the frozen model's ε", o)
        per = 3 if need_ref else 2
        # targets first (they need the frozen ε and λ only), then the adapted forwards + backward in micro-batches
        groups, tgts, weights = [], [], []
        for k, (term, (x, t, _c)) in enumerate(zip(self.terms, draws)):
            lam = self.constraints[term["ci"]].dual.value
            eps = frozen[per * k: per * (k + 1)]
            e_a, e_q = eps[0], eps[1]
            if self.spec.objective == "reverse_kl":
                target = targets.reverse_kl_target(e_a, e_q, lam)
            elif self.spec.objective == "likelihood_ratio":
                target = targets.likelihood_ratio_target(e_a, e_q, eps[2], lam)
            else:
                ratio = self._ratio_at_x0(x, t, e_a, term)
                target = targets.likelihood_target(e_a, e_q, eps[2], lam, ratio)
            groups.append((x, t, term["edit"]))
            tgts.append(target)
            weights.append(1.0)
        base = per * len(self.terms)
        for j, (term, (x, t, _c)) in enumerate(zip(self.keep_terms, keep_draws)):
            groups.append((x, t, term["cond"]))
            tgts.append(frozen[base + j])
            weights.append(cfg.keep_weight * (1 + self.keep_constraints[j].dual.value))
        loss, preds = self._adapted_backward(groups, tgts, weights)
        for k, (term, (_x, t, c)) in enumerate(zip(self.terms, draws)):
            if self.spec.constraint != "path_kl":
                continue
            i, e_q = term["ci"], frozen[per * k + 1]
            if cfg.dual_estimate == "target":
                est = self._path_kl(term["buf"], tgts[k], e_q, t, c)
            else:
                est = self._path_kl(term["buf"], preds[k], e_q, t, c)
            stats.setdefault("est", [[] for _ in self.constraints])[i].append(est)
            if step % cfg.refresh_every < cfg.fresh_steps:  # trajectories the adapter has (almost) not trained on
                stats.setdefault("fresh_est", [[] for _ in self.constraints])[i].append((est, len(t)))
            if cfg.dual_estimate == "target":
                stats.setdefault("net_est", [[] for _ in self.constraints])[i].append(
                    self._path_kl(term["buf"], preds[k], e_q, t, c))
        for j, (term, (_x, t, c)) in enumerate(zip(self.keep_terms, keep_draws)):
            stats.setdefault("keep_est", [[] for _ in self.keep_terms])[j].append(
                self._path_kl(term["buf"], preds[len(self.terms) + j], frozen[base + j], t, c))
        return loss

    def _fresh_extra(self, stats: dict, step: int) -> None:
        """dual_estimate "fresh": the path KL of each wording on ``fresh_samples`` more states of the trajectories
        just drawn (no grad, before the adapter trains on any of them), into ``stats["fresh_est"]`` with its count.
        Not read where no dual step will use it (its window closes inside the warm-up); drawn all the same, so the
        run's random stream, and so the run, is the same either way."""
        n, cfg = self.cfg.fresh_samples, self.cfg
        draws = [term["buf"].draw(n, self.gen) for term in self.terms]
        if (step // cfg.dual_every + 1) * cfg.dual_every <= int(round(cfg.dual_warmup * cfg.steps)):
            return
        frozen = self._predict_micro([(x, t, term["concept"]) for term, (x, t, _) in zip(self.terms, draws)])
        adapted = self._predict_micro([(x, t, term["edit"]) for term, (x, t, _) in zip(self.terms, draws)],
                                      adapted=True)
        for term, (_x, t, c), e_a, e_q in zip(self.terms, draws, adapted, frozen):
            est = self._path_kl(term["buf"], e_a, e_q, t, c)
            stats.setdefault("fresh_est", [[] for _ in self.constraints])[term["ci"]].append((est, n))

    def _micro_parts(self, sizes: list[int]) -> list[list[tuple[int, slice]]]:
        """The samples of groups of ``sizes``, concatenated, in micro-batches of at most ``micro_batch`` (one when
        it is unset): each micro-batch a list of (group index, slice of that group)."""
        n, m = sum(sizes), self.cfg.micro_batch or max(sum(sizes), 1)
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        out = []
        for lo in range(0, n, m):
            hi = min(lo + m, n)
            out.append([(g, slice(max(lo, a) - a, min(hi, a + k) - a))
                        for g, (a, k) in enumerate(zip(starts, sizes)) if max(lo, a) < min(hi, a + k)])
        return out

    def _predict_micro(self, groups: list, adapted: bool = False) -> list[torch.Tensor]:
        """ε of each (x, t, cond) group (no grad; frozen unless ``adapted``), in micro-batches of at most
        ``micro_batch``."""
        pieces: list[list[torch.Tensor]] = [[] for _ in groups]
        with torch.no_grad():
            for parts in self._micro_parts([len(x) for x, _, _ in groups]):
                outs = predict_groups(self.d, [(groups[g][0][s], groups[g][1][s], groups[g][2]) for g, s in parts],
                                      adapted=adapted)
                for (g, _s), o in zip(parts, outs):
                    pieces[g].append(o)
        return [torch.cat(p) if len(p) > 1 else p[0] for p in pieces]

    def _adapted_backward(self, groups: list, tgts: list[torch.Tensor],
                          weights: list[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss Σ_g w_g · mean_i ‖ε_θ(x_gi, t_gi, c_g) − target_gi‖² and its backward, the groups' samples taken in
        micro-batches of at most ``micro_batch`` (each one ``predict_groups`` call and one backward, so only its
        autograd activations are alive at a time). Returns the loss and each group's adapted ε, both detached."""
        sizes = [len(x) for x, _, _ in groups]
        preds: list[list[torch.Tensor]] = [[] for _ in groups]
        total = None
        for parts in self._micro_parts(sizes):
            outs = predict_groups(self.d, [(groups[g][0][s], groups[g][1][s], groups[g][2]) for g, s in parts],
                                  adapted=True)
            terms = []
            for (g, s), pred in zip(parts, outs):
                mse = (pred - tgts[g][s]).pow(2).flatten(1).mean(1).mean()
                frac = (s.stop - s.start) / sizes[g]
                terms.append(weights[g] * (mse if frac == 1.0 else mse * frac))
                preds[g].append(pred.detach())
            loss = torch.stack(terms).sum()
            if bool(torch.isfinite(loss)):
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total, [torch.cat(p) if len(p) > 1 else p[0] for p in preds]

    @torch.no_grad()
    def _ratio_at_x0(self, x: torch.Tensor, t: torch.Tensor, eps_anchor: torch.Tensor, term: dict) -> torch.Tensor:
        """LU likelihood form: r̂ = exp(log-ratio) at the predicted clean sample x̂0 (clipped for stability)."""
        x0 = self.d.schedule.predict_x0(x, t, eps_anchor).clamp(-10, 10)
        r = self._log_ratio(x0, term, int(torch.randint(2**31, (1,), generator=self.gen)))
        return r.clamp(-20, 5).exp().float()

    def _data_loss(self, step: int, stats: dict) -> torch.Tensor:
        cfg, data, sched = self.cfg, self.p.data, self.d.schedule
        T = sched.num_steps
        lam = self.constraints[0].dual.value
        b = cfg.batch
        xr = data.retain[torch.randint(len(data.retain), (b,), generator=self.gen)]
        xf = data.forget[torch.randint(len(data.forget), (b,), generator=self.gen)]
        t = torch.randint(T, (b,), generator=self.gen)
        c_t = sched.path_kl_weight(t, t - 1).float()
        if cfg.rollout_t_max is not None:  # the ELBO counts the steps a sampler takes (see estimate.all_jumps)
            c_t = torch.where(t <= cfg.rollout_t_max, c_t, torch.zeros_like(c_t))
        if self.spec.objective == "siss":
            s = 0.5
            pick = (torch.rand(b, generator=self.gen) < s).reshape(-1, *([1] * (xr.dim() - 1)))
            noise = torch.randn(xr.shape, generator=self.gen)
            x_t = sched.add_noise(torch.where(pick, xf, xr), t, noise)
            abar = sched._abar(t, x_t)
            n_r = (x_t - abar.sqrt() * xr) / (1 - abar).sqrt()
            n_f = (x_t - abar.sqrt() * xf) / (1 - abar).sqrt()
            # kernel log-densities up to the shared constant; weights = kernel / mixture
            lk_r = -0.5 * n_r.pow(2).flatten(1).sum(1)
            lk_f = -0.5 * n_f.pow(2).flatten(1).sum(1)
            lmix = torch.logaddexp(lk_r + math.log(1 - s), lk_f + math.log(s))
            w_r, w_f = (lk_r - lmix).exp(), (lk_f - lmix).exp()
            loss, _ = self._data_backward(
                b, lambda s: self.d.predict(x_t[s], t[s], self.data_cond, adapted=True),
                lambda s, pred: targets.siss_loss(pred, n_r[s], n_f[s], w_r[s], w_f[s], lam) * ((s.stop - s.start) / b))
            pred_f, noise_f, xft = None, None, None
        else:
            nr, nf = torch.randn(xr.shape, generator=self.gen), torch.randn(xf.shape, generator=self.gen)
            xrt, xft = sched.add_noise(xr, t, nr), sched.add_noise(xf, t, nf)
            x_all, t_all = torch.cat([xrt, xft]), t.repeat(2)
            if (cfg.micro_batch or 2 * b) >= 2 * b:  # retain and forget in one forward
                def loss_of(s: slice, pred: torch.Tensor) -> torch.Tensor:
                    pred_r, pred_f = pred.chunk(2)
                    return targets.forward_kl_loss(pred_r, nr, pred_f, nf, lam)
            else:  # the same loss as a weighted sum over the 2b samples, in micro-batches: +1/b retain, −λ/b forget
                n_all = torch.cat([nr, nf])
                w_all = torch.cat([torch.full((b,), 1.0 / b), torch.full((b,), -float(lam) / b)])

                def loss_of(s: slice, pred: torch.Tensor) -> torch.Tensor:
                    return (w_all[s].to(pred.device) * targets._per_sample_mse(pred, n_all[s])).sum()

            loss, preds = self._data_backward(
                2 * b, lambda s: self.d.predict(x_all[s], t_all[s], self.data_cond, adapted=True), loss_of)
            pred_f, noise_f = torch.cat(preds)[b:], nf
        # forget-set KL increase E_q[NELBO_θ − NELBO_0] on this batch (every t equally likely: × T)
        if xft is None:
            nf2 = torch.randn(xf.shape, generator=self.gen)
            xft, noise_f = sched.add_noise(xf, t, nf2), nf2
            with torch.no_grad():
                pred_f = self.d.predict(xft, t, self.data_cond, adapted=True)
        (e0,) = self._frozen(xft, t, [self.data_cond])
        diff = (pred_f.detach() - noise_f).pow(2).flatten(1).sum(1) - (e0 - noise_f).pow(2).flatten(1).sum(1)
        stats.setdefault("est", [[]])[0].append(float((c_t * diff).mean()) * T)
        return loss

    def _data_backward(self, n: int, fwd: Callable[[slice], torch.Tensor],
                       loss_of: Callable[[slice, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A data loss over ``n`` samples that ``loss_of`` splits into the shares of slices, and its backward, in
        micro-batches of at most ``micro_batch`` samples (``fwd(slice)``: their adapted ε). Returns the loss and
        the forwards, detached."""
        total, preds = None, []
        m = self.cfg.micro_batch or n
        for lo in range(0, n, m):
            s = slice(lo, min(lo + m, n))
            pred = fwd(s)
            loss = loss_of(s, pred)
            if bool(torch.isfinite(loss)):
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
            preds.append(pred.detach())
        return total, preds

    # -------------------------------------------------------------------- final estimates
    def achieved_draws(self) -> int:
        """Noise draws of the data methods' achieved read (the forget set's NELBO rise, adapted − frozen): at a
        timestep stride as many as the calibration read that the request is a fraction of (up to 8), else 2. With
        two at the frontier's stride of 25, one run's read sat 0.11 of its request above the mean of three fresh
        ones (their sd 0.05: FU 0.05 seed 1, docs/benchmarks/achieved-noise-fu-2026-12-07.txt); eight quarter the
        variance, at 15–18 s a read on the demo instead of 4 (docs/benchmarks/lu-fu-cost-2026-12-08.txt)."""
        stride = self.cfg.elbo_stride
        return max(self.cfg.estimate_draws, 2 if stride == 1 else min(stride, 8))

    @torch.no_grad()
    def estimate_constraints(self, n: int | None = None) -> list[float]:
        """Fresh, larger-sample estimates of every constraint for the current adapter (the "achieved" values)."""
        n = n or self.cfg.estimate_samples
        out = []
        if self.spec.kind == "concept":
            n_each = max(n // (len(self.terms) // len(self.constraints)), 8)
            all_states, ts, w = self._rollout_many([term["edit"] for term in self.terms], [n_each] * len(self.terms),
                                                   adapted=True)
            for term, states in zip(self.terms, all_states):
                n_term = states.shape[1]
                if self.spec.constraint == "path_kl":
                    buf = _Buffer()
                    buf.fill(states, ts, w)
                    tot = 0.0
                    for chunk in torch.split(torch.arange(len(buf.t)), self._chunk(1)):
                        x, t, c = buf.x[chunk], buf.t[chunk], buf.c[chunk]
                        p = self.d.predict(x, t, term["edit"], adapted=True)
                        (e_q,) = self._frozen(x, t, [term["concept"]])
                        keep = t >= self.cfg.kl_t_min
                        tot += float(path_kl_terms(p[keep], e_q[keep], c[keep]).sum())
                    out.append(tot / n_term)
                else:
                    r = self._log_ratio(states[-1], term, self.cfg.seed + 1, draws=self.cfg.estimate_draws)
                    out.append(float(r.mean()))
            out = self._per_constraint(out)
        else:
            f = self.p.data.forget
            g1, g2 = (torch.Generator().manual_seed(self.cfg.seed + 7) for _ in range(2))
            draws = self.achieved_draws()
            adapted = nelbo(self.d, f, self.data_cond, adapted=True, draws=draws, generator=g1,
                            t_max=self.cfg.rollout_t_max, t_stride=self.cfg.elbo_stride)
            base = nelbo(self.d, f, self.data_cond, adapted=False, draws=draws, generator=g2,
                         t_max=self.cfg.rollout_t_max, t_stride=self.cfg.elbo_stride)
            out.append(float((adapted - base).mean()))
        return out

    # -------------------------------------------------------------------- loop
    def run(self, resume: dict | None = None) -> TrainResult:
        """Train. ``resume``: a state from :meth:`state_dict` (a checkpoint); the run then continues where that
        one stopped and, on the same machine and software, reproduces the uninterrupted run."""
        t0 = time.perf_counter()
        cfg = self.cfg
        history: list[dict] = []
        events: list[dict] = []
        first, elapsed = 0, 0.0
        if resume is not None:
            first, history, events, elapsed = self.load_state_dict(resume)
        else:
            if not self.calibration:
                self.calibrate()
            self._make_constraints()
        good = self._snapshot(first - 1)
        bad_in_a_row = 0
        stats: dict = {}
        cancelled = False
        step = first - 1
        polish_start = cfg.steps - int(round(cfg.polish_fraction * cfg.steps))
        polished = cfg.polish_fraction == 0.0 or first > polish_start
        warmup = int(round(cfg.dual_warmup * cfg.steps))
        every = cfg.checkpoint_interval
        for step in range(first, cfg.steps):
            if self.should_stop():
                cancelled = True
                step -= 1
                break
            if every and self.on_checkpoint is not None and step > first and step % every == 0:
                self.on_checkpoint(self.state_dict(step, history, events, elapsed + time.perf_counter() - t0))
            if cfg.lr_final_ratio < 1.0:
                frac = 0.5 * (1 + math.cos(math.pi * step / max(cfg.steps - 1, 1)))
                for group in self.opt.param_groups:
                    group["lr"] = cfg.lr * (cfg.lr_final_ratio + (1 - cfg.lr_final_ratio) * frac)
            self.opt.zero_grad(set_to_none=True)
            # the loss comes back detached: its backward ran in micro-batches (see _adapted_backward)
            loss = self._concept_loss(step, stats) if self.spec.kind == "concept" else self._data_loss(step, stats)
            ok = bool(torch.isfinite(loss))
            if ok:
                torch.nn.utils.clip_grad_norm_(self.d.trainable_parameters(), cfg.grad_clip)
                self.opt.step()
                ok = all(bool(torch.isfinite(p).all()) for p in self.d.trainable_parameters())
            if not ok:
                bad_in_a_row += 1
                self._restore(good)
                ev = {"type": "nan", "step": step, "restored_to_step": good["step"],
                      "message": f"non-finite loss or weights at step {step}; restored the state of step {good['step']}"}
                log.warning(ev["message"])
                events.append(ev)
                self._emit(ev)
                stats.clear()
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_in_a_row} non-finite steps in a row (last at step {step}); lower the learning rate "
                        f"(now {cfg.lr}) or the λ bound (now {self.p.lam_hi})")
                continue
            bad_in_a_row = 0
            if step >= polish_start and not polished:
                self._freeze_at_average(history, step)
                polished = True
            rec = {"step": step, "loss": float(loss.detach())}
            if polished and cfg.polish_fraction > 0:
                rec["polished"] = True  # λ frozen at its average: not evidence of settling (see unlearn.settled)
            if (step + 1) % cfg.dual_every == 0:
                if step + 1 > warmup:
                    self._dual_update(stats, rec)
                stats = {}
                good = self._snapshot(step)
            history.append(rec)
            self._emit({"type": "step", **rec, "total": cfg.steps})
        final = self.estimate_constraints()
        res = TrainResult(
            method=self.p.method, steps_done=step + 1, cancelled=cancelled,
            lambdas=[c.dual.value for c in self.constraints], thresholds=[c.threshold for c in self.constraints],
            calibration=list(self.calibration), separation=list(self.separation), final_estimates=final,
            history=history, events=events, seconds=elapsed + time.perf_counter() - t0)
        self._emit({"type": "done", "lambdas": res.lambdas, "final_estimates": final, "cancelled": cancelled})
        return res

    def _freeze_at_average(self, history: list[dict], polish_start: int) -> None:
        window = polish_start - int(round(self.cfg.polish_fraction * self.cfg.steps))
        recs = [h for h in history if "lambda" in h and h["step"] >= window]
        if not recs:
            return
        for i, c in enumerate(self.constraints):
            if not c.dual.frozen:
                c.dual.value = sum(h["lambda"][i] for h in recs) / len(recs)
                c.dual.frozen = True
        for j, c in enumerate(self.keep_constraints):
            c.dual.value = sum(h["keep_mu"][j] for h in recs) / len(recs)
            c.dual.frozen = True
        self._emit({"type": "polish", "step": polish_start, "lambdas": [c.dual.value for c in self.constraints]})

    def _dual_update(self, stats: dict, rec: dict) -> None:
        if self.spec.constraint == "log_ratio":
            # E_p[r] on the current model's own samples (the final states of the latest rollouts).
            seeds = [int(torch.randint(2**31, (1,), generator=self.gen)) for _ in self.terms]
            if rec.get("polished"):
                # λ and μ are frozen for the polish: a read would move nothing, and LU's reads are its dearest part
                # (a NELBO sum per state under two prompts: about 6 s a read, 93 of a frontier LU run's 402 s for
                # its 15, 5 of them in the polish — benchmarks/achieved_noise.py prints where a run's time goes). No
                # read, no dual record; the seeds are drawn all the same, so the rest of the run is the one it was
                # with the reads. The final estimate reads where the polish ends.
                return
            per_term = []
            for term, seed in zip(self.terms, seeds):
                per_term.append(float(self._log_ratio(term["buf"].final, term, seed).mean()))
            stats["est"] = [[v] for v in self._per_constraint(per_term)]
        ests = [sum(v) / len(v) for v in stats.get("est", [])]
        if self.cfg.dual_estimate == "fresh" and self.spec.constraint == "path_kl":
            # The states of a refresh stay in the buffer for refresh_every steps and the adapter trains on them:
            # on those it has fitted, its path KL reads higher than on its fresh trajectories (on the demo the
            # 5-step windows without a refresh read 12–20 % above the ones with one, and λ settled short).
            if "fresh_est" in stats:
                self._fresh_est = [sum(e * n for e, n in v) / sum(n for _, n in v) for v in stats["fresh_est"]]
            if self._fresh_est is not None:
                rec["stale_estimate"] = ests
                ests = list(self._fresh_est)
        rec["lambda"] = [c.update(e) for c, e in zip(self.constraints, ests)]
        rec["estimate"] = ests
        rec["slack"] = [c.slack(e) for c, e in zip(self.constraints, ests)]
        if "net_est" in stats:
            rec["network_estimate"] = [sum(v) / len(v) for v in stats["net_est"]]
        if self.keep_constraints:
            kests = [sum(v) / len(v) for v in stats.get("keep_est", [])]
            rec["keep_mu"] = [c.update(e) for c, e in zip(self.keep_constraints, kests)]
            rec["keep_estimate"] = kests
        self._emit({"type": "dual", **rec})

    # -------------------------------------------------------------------- checkpoints
    def state_dict(self, step: int, history: list[dict], events: list[dict], seconds: float) -> dict:
        """Everything the loop needs to continue at ``step`` (taken at a checkpoint boundary: no pending dual
        statistics, trajectories re-drawn by the next step). Tensors, numbers, strings, lists and dicts only, so
        ``torch.load(weights_only=True)`` reads it back."""
        return {"format": "comfyui-unlearn/trainer-state", "version": 1, "step": step, "seconds": seconds,
                "method": self.p.method, "config": self.cfg.fingerprint(),
                "adapter": self.d.adapter_state(), "opt": self.opt.state_dict(),
                "duals": [{**c.dual.state_dict(), "frozen": c.dual.frozen, "threshold": c.threshold,
                           "last_estimate": c.last_estimate} for c in self.constraints],
                "keep_duals": [{**c.dual.state_dict(), "frozen": c.dual.frozen, "threshold": c.threshold,
                                "last_estimate": c.last_estimate} for c in self.keep_constraints],
                "calibration": list(self.calibration), "separation": list(self.separation),
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "warned_dominance": self._warned_dominance, "target_solve": copy.deepcopy(self.target_solve),
                "history": copy.deepcopy(history), "events": copy.deepcopy(events)}

    def load_state_dict(self, state: dict) -> tuple[int, list[dict], list[dict], float]:
        """Restore a :meth:`state_dict`; returns (next step, history, events, seconds so far). Refuses a state
        written for another method or configuration (the resumed run would not be the same run)."""
        if state.get("format") != "comfyui-unlearn/trainer-state" or state.get("version") != 1:
            raise ValueError("not a ComfyUI-Unlearn trainer checkpoint (or one from an incompatible version)")
        if state["method"] != self.p.method:
            raise ValueError(f"the checkpoint is for method {state['method']!r}, this run is {self.p.method!r}")
        mine = self.cfg.fingerprint()
        diff = sorted(k for k in set(mine) | set(state["config"]) if mine.get(k) != state["config"].get(k))
        if diff:
            raise ValueError("the checkpoint was written with other training options: "
                             + ", ".join(f"{k} {state['config'].get(k)!r} → {mine.get(k)!r}" for k in diff[:6]))
        self.calibration, self.separation = list(state["calibration"]), list(state["separation"])
        self.target_solve = state.get("target_solve")
        self._make_constraints()
        if len(state["duals"]) != len(self.constraints) or len(state["keep_duals"]) != len(self.keep_constraints):
            raise ValueError("the checkpoint has a different number of constraints than this problem")
        for c, d in zip(self.constraints + self.keep_constraints, state["duals"] + state["keep_duals"]):
            if not math.isclose(c.threshold, d["threshold"], rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(f"constraint {c.name!r}: the checkpoint's threshold {d['threshold']:.6g} differs "
                                 f"from this run's {c.threshold:.6g}")
            c.dual.load_state_dict(d)
            c.dual.frozen = bool(d["frozen"])
            c.last_estimate = d["last_estimate"]
        self.d.load_adapter_state(state["adapter"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self._warned_dominance = bool(state["warned_dominance"])
        return int(state["step"]), list(state["history"]), list(state["events"]), float(state["seconds"])

    def _snapshot(self, step: int = -1) -> dict:
        return {"step": step, "adapter": self.d.adapter_state(),
                "opt": copy.deepcopy(self.opt.state_dict()),
                "duals": [c.dual.state_dict() for c in self.constraints + self.keep_constraints]}

    def _restore(self, snap: dict) -> None:
        self.d.load_adapter_state(snap["adapter"])
        self.opt.load_state_dict(copy.deepcopy(snap["opt"]))
        for c, s in zip(self.constraints + self.keep_constraints, snap["duals"]):
            c.dual.load_state_dict(s)
