"""Test-wide settings: one torch thread (tiny ops on 2 shared cores are far slower with 2 threads
under load), no hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
