"""Encode prompts once, for the trainer's prompt-embedding cache, and the content keys of that cache.

Results are keyed by `content_key` (sha1 of the prompt text or of the video tensor's bytes), so
a cache can be filled incrementally and shared between runs that see the same content. Keys do not
name the codec or encoder: keep one cache per codec / encoder config.

bf16 autocast is used only where it is safe and helps: UMT5 on CUDA; the MiniLM default runs in fp32.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from univigu.models.text import PromptEncoder
from univigu.precision import autocast


def content_key(obj) -> str:
    """sha1 hex digest of a prompt (UTF-8 text), bytes, or a tensor / array (dtype, shape and
    values, so equal content gives equal keys whatever the memory layout or device)."""
    h = hashlib.sha1()
    if isinstance(obj, str):
        h.update(b"str:" + obj.encode("utf-8"))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        h.update(b"bytes:" + bytes(obj))
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        # bf16 has no numpy dtype: hash the raw bytes through an int16 view.
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        h.update(raw.numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"array:{a.dtype}:{a.shape}:".encode())
        h.update(a.tobytes())
    else:
        raise TypeError(f"content_key takes str, bytes, a tensor or an array, "
                        f"got {type(obj).__name__}")
    return h.hexdigest()


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def encode_prompts(encoder: PromptEncoder, prompts: Sequence[str], *, batch_size: int = 64,
                   bf16: bool | None = None, progress: bool = True,
                   desc: str = "encoding prompts") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Encode prompts once each. Returns `{content_key(prompt): (embedding [Lc, D] float32,
    mask [Lc] bool)}` on CPU. `bf16=None` means: autocast only for UMT5 on CUDA."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string")
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise ValueError("no prompts to encode")
    device = encoder.device
    if bf16 is None:
        bf16 = encoder.kind == "umt5" and device.type == "cuda"
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with tqdm(total=len(unique), desc=desc, disable=not progress, unit="prompt") as bar:
        for chunk in _batches(unique, batch_size):
            with autocast(device, bf16):
                emb, mask = encoder.encode(chunk)
            emb, mask = emb.float().cpu(), mask.cpu()
            for i, p in enumerate(chunk):
                out[content_key(p)] = (emb[i].clone(), mask[i].clone())
            bar.update(len(chunk))
    return out
