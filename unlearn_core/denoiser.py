"""The Denoiser protocol — everything the trainer needs from a diffusion model — and a plain-torch implementation.

A Denoiser predicts ε for a batch of noisy inputs ``x_t`` at integer timesteps ``t`` under a conditioning
``cond`` (an opaque object made by :meth:`Denoiser.encode`), either *adapted* (with the trainable unlearning
adapter) or *frozen* (adapter switched off: the pretrained model, without a second copy of its weights).

Implementations: :class:`TorchDenoiser` here (small MLP/UNet nets, the Gaussian-mixture toy), the diffusers +
peft one for the demo model and SD checkpoints, and the ComfyUI one in ``nodes/``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .schedule import NoiseSchedule

__all__ = ["Denoiser", "TorchDenoiser", "LoRALinear", "add_lora", "predict_groups", "rollout", "rollout_many"]


@runtime_checkable
class Denoiser(Protocol):
    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]

    def encode(self, prompts: Sequence[Any]) -> Any:
        """Conditioning for a list of prompts; batch size = len(prompts)."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, adapted: bool = True) -> torch.Tensor:
        """ε-prediction. ``cond`` has batch 1 (broadcast) or ``len(x_t)``."""

    def predict_many(self, x_t: torch.Tensor, t: torch.Tensor, conds: Sequence[Any], adapted: bool) -> list[torch.Tensor]:
        """ε under several conditionings for the same ``x_t`` (one batched forward where possible)."""

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    # Optional: ``predict_groups(groups, adapted)`` — ε for several ``(x_t, t, cond)`` groups from one forward.
    # Small models on a CPU spend most of their time in per-call overhead; see :func:`predict_groups`.

    def adapter_state(self) -> dict[str, torch.Tensor]: ...

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None: ...


# ---------------------------------------------------------------------------------------------------- adapters
class LoRALinear(nn.Module):
    """``y = W x + b + scale · B A x`` with frozen W, b. ``rank=None`` makes the delta a full trainable matrix.

    B starts at zero, so a fresh adapter leaves the model unchanged. ``enabled=False`` gives the frozen model.
    """

    def __init__(self, base: nn.Linear, rank: int | None, alpha: float | None = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.enabled = True
        self.rank = rank
        if rank is None:
            self.delta = nn.Parameter(torch.zeros_like(base.weight))
            self.scale = 1.0
        else:
            if rank < 1:
                raise ValueError(f"LoRA rank must be >= 1, got {rank}")
            self.down = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
            self.up = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
            self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        if self.rank is None:
            return y + nn.functional.linear(x, self.delta)
        return y + self.scale * nn.functional.linear(nn.functional.linear(x, self.down), self.up)


def add_lora(module: nn.Module, rank: int | None, targets: str | Callable[[str], bool] = r".*", alpha: float | None = None) -> list[str]:
    """Wrap every ``nn.Linear`` whose qualified name matches ``targets`` (regex or predicate). Returns the names."""
    match = targets if callable(targets) else (lambda name, rx=re.compile(targets): rx.fullmatch(name) is not None)
    wrapped = []
    for name, sub in list(module.named_modules()):
        for child_name, child in list(sub.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and match(full):
                setattr(sub, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(full)
    if not wrapped:
        raise ValueError(f"no nn.Linear in the model matches the LoRA targets {targets!r}")
    return wrapped


class TorchDenoiser:
    """A Denoiser around a plain torch ε-network ``net(x_t, t, cond) -> ε`` carrying :class:`LoRALinear` adapters.

    ``cond`` is a tensor (e.g. prompt ids or embeddings) whose first dimension is the batch.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, sample_shape: Sequence[int],
                 encoder: Callable[[Sequence[Any]], torch.Tensor] | None = None):
        self.net = net
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self._encoder = encoder
        self.adapters = [m for m in net.modules() if isinstance(m, LoRALinear)]
        if not self.adapters:
            raise ValueError("the network has no LoRALinear adapters; call add_lora(net, ...) first")
        for p in net.parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters_iter():
            p.requires_grad_(True)

    def encode(self, prompts: Sequence[Any]) -> torch.Tensor:
        if self._encoder is None:
            return torch.as_tensor(list(prompts))
        return self._encoder(prompts)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        prev = [a.enabled for a in self.adapters]
        try:
            for a in self.adapters:
                a.enabled = False
            yield
        finally:
            for a, e in zip(self.adapters, prev):
                a.enabled = e

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, adapted: bool = True) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        cond = cond.expand(x_t.shape[0], *cond.shape[1:]) if cond.shape[0] == 1 else cond
        if adapted:
            return self.net(x_t, t, cond)
        with self.adapter_disabled():
            return self.net(x_t, t, cond)

    def predict_many(self, x_t: torch.Tensor, t: torch.Tensor, conds: Sequence[torch.Tensor], adapted: bool) -> list[torch.Tensor]:
        n, k = x_t.shape[0], len(conds)
        t = torch.as_tensor(t, device=x_t.device).long().expand(n)
        big = torch.cat([c.expand(n, *c.shape[1:]) if c.shape[0] == 1 else c for c in conds])
        out = self.predict(x_t.repeat(k, *([1] * (x_t.dim() - 1))), t.repeat(k), big, adapted)
        return list(out.chunk(k))

    def predict_groups(self, groups: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                       adapted: bool) -> list[torch.Tensor]:
        sizes = [x.shape[0] for x, _, _ in groups]
        x = torch.cat([x for x, _, _ in groups])
        t = torch.cat([torch.as_tensor(t, device=x.device).long().reshape(-1).expand(n)
                       for (_, t, _), n in zip(groups, sizes)])
        cond = torch.cat([c.expand(n, *c.shape[1:]) if c.shape[0] == 1 else c for (_, _, c), n in zip(groups, sizes)])
        return list(self.predict(x, t, cond, adapted).split(sizes))

    def trainable_parameters_iter(self) -> Iterator[nn.Parameter]:
        for a in self.adapters:
            yield from (p for n, p in a.named_parameters() if not n.startswith("base."))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.trainable_parameters_iter())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()
                if k.endswith((".delta", ".down", ".up"))}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.net.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise KeyError(f"adapter state has unknown keys: {missing.unexpected_keys[:5]}")


def predict_groups(denoiser: Denoiser, groups: Sequence[tuple[torch.Tensor, torch.Tensor, Any]],
                   adapted: bool) -> list[torch.Tensor]:
    """ε for each ``(x_t, t, cond)`` group: one batched forward when the denoiser offers ``predict_groups``,
    else one call per group. Gradients flow through either way."""
    groups = [g for g in groups]
    if not groups:
        return []
    fn = getattr(denoiser, "predict_groups", None)
    if fn is not None and len(groups) > 1:
        return fn(groups, adapted)
    return [denoiser.predict(x, t, c, adapted) for x, t, c in groups]


@torch.no_grad()
def rollout(denoiser: Denoiser, cond: Any, n: int, num_jumps: int, generator: torch.Generator | None = None,
            adapted: bool = True, guidance: float = 1.0, uncond: Any = None,
            device: torch.device | str = "cpu", t_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n`` trajectories of the (adapted or frozen) model with the stochastic reverse step.

    Returns ``(states, timesteps)``: ``states[k]`` is the batch at ``timesteps[k]`` (the last entry, timestep −1,
    is the final sample). With ``guidance != 1`` the ε is classifier-free guided against ``uncond``. ``t_max``: the
    first timestep (default the noisiest; see :meth:`NoiseSchedule.rollout_timesteps`).
    """
    (states,), ts = rollout_many(denoiser, [cond], [n], num_jumps, generator, adapted, guidance, uncond, device, t_max)
    return states, ts


@torch.no_grad()
def rollout_many(denoiser: Denoiser, conds: Sequence[Any], ns: Sequence[int], num_jumps: int,
                 generator: torch.Generator | None = None, adapted: bool = True, guidance: float = 1.0,
                 uncond: Any = None, device: torch.device | str = "cpu", t_max: int | None = None,
                 with_eps: bool = False, cond_eps: Callable | None = None) -> tuple:
    """:func:`rollout` for several prompts at once (``ns[i]`` trajectories at ``conds[i]``), every jump one batched
    forward over all of them (with the unconditional branch when guided). One prompt draws the same random
    numbers as :func:`rollout`. A guided prompt equal to ``uncond`` needs no second branch (its guided ε is its
    own): its trajectories cost one sample-forward per jump, not two.

    ``with_eps``: also return, per prompt, the *conditional* ε at every state but the last, shape ``(J, n, …)``:
    the prompt's own ε there (before guidance), which a caller would otherwise pay another forward for.

    ``cond_eps``: the prompts' conditional ε comes from ``cond_eps(parts, e_u)`` instead of the denoiser — ``parts``
    is each prompt's ``(x, t)``, ``e_u`` each prompt's slice of the unconditional ε (``None`` unguided), and it
    returns one ε per prompt (e.g. a closed-form target combined from frozen predictions). ``conds`` then only
    count the prompts; the unconditional branch is still the denoiser's."""
    if len(conds) != len(ns) or not conds:
        raise ValueError("rollout_many needs one trajectory count per conditioning")
    sched = denoiser.schedule
    ts = sched.rollout_timesteps(num_jumps, t_max)
    total = int(sum(ns))
    x = torch.randn((total, *denoiser.sample_shape), generator=generator, device=device)
    states = [x]
    bounds = torch.tensor([0, *ns]).cumsum(0).tolist()
    # guided prompts that are the unconditional one: e_c = e_u, read off the unconditional branch
    own = [guidance != 1.0 and cond_eps is None and same_conditioning(c, uncond) for c in conds]
    all_eps = []
    for t, s in zip(ts[:-1].tolist(), ts[1:].tolist()):
        tt = torch.full((total,), t, dtype=torch.long, device=device)
        parts = [(x[a:b], tt[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        if cond_eps is not None:
            e_u = None if guidance == 1.0 else denoiser.predict(x, tt, uncond, adapted)
            e_c = torch.cat(cond_eps(parts, None if e_u is None else [e_u[a:b] for a, b in zip(bounds[:-1], bounds[1:])]))
            eps = e_c if e_u is None else e_u + guidance * (e_c - e_u)
        elif guidance == 1.0:
            eps = e_c = torch.cat(predict_groups(denoiser, [(xi, ti, c) for (xi, ti), c in zip(parts, conds)], adapted))
        else:
            groups = [(xi, ti, c) for (xi, ti), c, o in zip(parts, conds, own) if not o] + [(x, tt, uncond)]
            out = (denoiser.predict_many(x, tt, [conds[0], uncond], adapted) if len(conds) == 1 and not own[0]
                   else predict_groups(denoiser, groups, adapted))
            e_u, conditional = out[-1], iter(out[:-1])
            e_c = torch.cat([e_u[a:b] if o else next(conditional) for a, b, o in zip(bounds[:-1], bounds[1:], own)])
            eps = e_u + guidance * (e_c - e_u)
        if with_eps:
            all_eps.append(e_c)
        noise = torch.randn(x.shape, generator=generator, device=device) if s >= 0 or sched.variance == "large" else None
        x = sched.reverse_step(x, tt, torch.full((total,), s, dtype=torch.long, device=device), eps, noise)
        states.append(x)
    stacked = torch.stack(states)
    split = [stacked[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if not with_eps:
        return split, ts
    eps_all = torch.stack(all_eps)
    return split, ts, [eps_all[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def same_conditioning(a: Any, b: Any) -> bool:
    """Whether two conditionings are the same values (tensors, or tuples / lists / dicts of them, or ``None``)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_conditioning(u, v) for u, v in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_conditioning(a[k], b[k]) for k in a)
    return False
