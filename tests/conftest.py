"""Test-wide settings: one torch thread (two threads ran ~20x slower on this shared 2-core machine), offline hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("UNLEARN_TEST_THREADS", "1")))
