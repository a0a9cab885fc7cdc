"""Test-wide settings: one torch thread (two threads ran ~20x slower on this shared 2-core machine), offline hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("UNLEARN_TEST_THREADS", "1")))

import pytest  # noqa: E402


@pytest.fixture
def record_trained_forwards(monkeypatch):
    """``record(trainer_module)`` wraps that module's ``predict_groups`` and returns a list that collects, for every
    forward with gradients through the adapter, how many samples it saw. Pass the trainer module the code under
    test calls (the ComfyUI nodes load their own copy of the package)."""

    def record(trainer_module) -> list[int]:
        sizes: list[int] = []
        real = trainer_module.predict_groups

        def recording(denoiser, groups, adapted):
            if adapted and torch.is_grad_enabled():
                sizes.append(sum(len(x) for x, _, _ in groups))
            return real(denoiser, groups, adapted)

        monkeypatch.setattr(trainer_module, "predict_groups", recording)
        return sizes

    return record
