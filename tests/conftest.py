"""Test-wide settings: one torch thread (tiny ops on 2 shared cores are far slower with 2 threads
under load), no hub access, one compile cache per forced CPU capability."""

import getpass
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Inductor vectorises for the ISA that ATEN_CPU_CAPABILITY picks, but its graph cache key leaves that
# out: a graph generated for AVX-512 and reused under avx2 gives wrong gradients or crashes (and the
# other way round). A forced capability gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"))

import torch  # noqa: E402

torch.set_num_threads(1)
