"""Filling the latent and prompt caches ahead of training (`univigu data cache`), over many processes.

The work is cut into chunks that do not depend on the number of processes: the manifest's lines in
chunks of `CLIP_CHUNK`, its distinct prompts (sorted by store key) in chunks of `PROMPT_CHUNK`.
Chunk c belongs to shard `c % num_shards` (under torchrun: the rank, of WORLD_SIZE; for a job
array: `--num_shards/--shard_index`). Each chunk's new entries are written as one store shard,
named by its keys (`cache.TensorStore`), so one process and eight write the same files. A chunk
whose entries are all stored is skipped, so a killed fill resumes at its first unfinished chunk.

Videos are hashed, probed and decoded in worker processes (a `torch.utils.data.DataLoader` with
prefetch); the codec and the prompt encoder run in batches on the device, in fp32 (as Wan2.1 and
diffusers encode). A file that cannot be read is reported, left out and counted; the fill goes on.
Nothing here needs a process group: processes share only the cache folder, so a fill spread over
several nodes needs a cache folder every node sees (docs/ARCHITECTURE.md, "Multi-node").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..atomic import kill_point
from ..config import ExperimentConfig
from ..data.manifest import read_manifest
from ..data.video_io import VideoError, frames_to_tensor, probe_video, read_video
from .cache import (NULL_KEY, CacheError, FileHashes, assign_bucket, bad_key, encode_trimmed, file_sha1, latent_key,
                    null_entry, open_latent_cache, prompt_store, text_key)

CLIP_CHUNK = 64
PROMPT_CHUNK = 256


@dataclass
class FillReport:
    """What one process of a fill did (its share of the manifest)."""

    shard_index: int = 0
    num_shards: int = 1
    clips: int = 0  # clips in this shard's chunks
    encoded: int = 0  # latents written now
    cached: int = 0  # latents found in the cache
    chunks_written: int = 0
    chunks_skipped: int = 0  # finished earlier
    short: int = 0  # shorter than every bucket
    prompts_encoded: int = 0
    prompts_cached: int = 0
    bad: list[str] = field(default_factory=list)  # "path (reason)"

    def summary(self) -> str:
        return (f"shard {self.shard_index + 1}/{self.num_shards}: {self.clips} clips "
                f"({self.encoded} encoded, {self.cached} already cached, {self.short} too short, "
                f"{len(self.bad)} bad); chunks {self.chunks_written} written, {self.chunks_skipped} "
                f"finished before; prompts {self.prompts_encoded} encoded, {self.prompts_cached} cached")


def process_shard(num_shards: int | None = None, shard_index: int | None = None) -> tuple[int, int]:
    """(num_shards, shard_index): the arguments, else torchrun's WORLD_SIZE and RANK, else (1, 0)."""
    if (num_shards is None) != (shard_index is None):
        raise CacheError("give --num_shards and --shard_index together")
    if num_shards is None:
        num_shards, shard_index = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise CacheError(f"--shard_index must be in [0, {num_shards}) and --num_shards at least 1, "
                         f"got {shard_index} of {num_shards}")
    return num_shards, shard_index


def my_chunks(count: int, chunk: int, num_shards: int, shard_index: int) -> list[range]:
    return [range(start, min(start + chunk, count)) for c, start in enumerate(range(0, count, chunk))
            if c % num_shards == shard_index]


class _Indexer(torch.utils.data.Dataset):
    """Worker side of indexing: (line, sha1 of the bytes, [width, height, frames]) or the error."""

    def __init__(self, items: list[tuple[int, str, str | None]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        line, path, digest = self.items[i]
        try:
            digest = digest or file_sha1(path)
            meta = probe_video(path)
            return line, digest, [meta["width"], meta["height"], meta["num_frames"]], None
        except (OSError, VideoError) as err:
            return line, digest, None, str(err)


class _Decoder(torch.utils.data.Dataset):
    """Worker side of encoding: one clip decoded to a float video [3, F, H, W], or the error."""

    def __init__(self, items: list[tuple[int, str, str, tuple[int, int, int]]]):
        self.items = items  # (chunk, latent key, path, (width, height, frames))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        chunk, key, path, (width, height, frames) = self.items[i]
        try:
            return chunk, key, path, frames_to_tensor(read_video(path, num_frames=frames, size=(width, height))), None
        except (OSError, VideoError) as err:
            return chunk, key, path, None, str(err)


def _loader(dataset, batches, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       collate_fn=list, prefetch_factor=4 if workers else None)


@torch.no_grad()
def fill_latents(manifest: str | Path, codec, codec_config, world, cache_dir: str | Path,
                 bucket_sizes: Sequence[Sequence[int]] = (), device: str | torch.device = "cpu",
                 num_shards: int = 1, shard_index: int = 0, workers: int = 0, encode_batch: int = 8,
                 progress: bool = True, report: FillReport | None = None, chunk: int = CLIP_CHUNK) -> FillReport:
    """Encode this shard's chunks of `manifest` into the latent cache (what is stored is skipped)."""
    report = report or FillReport(shard_index=shard_index, num_shards=num_shards)
    cache_dir = Path(cache_dir)
    records, buckets, store, probes = open_latent_cache(manifest, codec, codec_config, world, cache_dir, bucket_sizes)
    hashes = FileHashes(cache_dir, "file-hashes.json" if num_shards == 1
                        else f"file-hashes-{shard_index}-of-{num_shards}.json")
    chunks = my_chunks(len(records), chunk, num_shards, shard_index)
    desc = "" if num_shards == 1 else f" [{shard_index + 1}/{num_shards}]"

    # Index: the sha1 and size of every clip of this shard (memoised and stored probes first).
    found: dict[int, tuple[str, list[int]]] = {}
    todo: list[tuple[int, str, str | None]] = []
    for line in (i for c in chunks for i in c):
        path = records[line]["video"]
        try:
            digest = hashes.known(path)
        except OSError as err:
            report.bad.append(f"{path} ({err.strerror or err})")
            continue
        if digest is not None and bad_key(digest) in probes:
            report.bad.append(f"{path} (unreadable, found by an earlier fill)")
        elif digest is not None and digest in probes:
            found[line] = (digest, probes.get(digest).tolist())
        else:
            todo.append((line, path, digest))
    new_probes: dict[int, dict[str, torch.Tensor]] = {}  # per chunk, so their shards are the same files too
    batches = [list(range(i, min(i + 16, len(todo)))) for i in range(0, len(todo), 16)]
    with tqdm(total=len(todo), desc=f"indexing clips{desc}", disable=not progress or not todo) as bar:
        for batch in _loader(_Indexer(todo), batches, workers):
            for line, digest, size, error in batch:
                if digest is not None:
                    hashes.add(records[line]["video"], digest)
                if error is not None:
                    report.bad.append(f"{records[line]['video']} ({error})")
                    if digest is not None:  # readers then skip it without probing it again
                        new_probes.setdefault(line // chunk, {})[bad_key(digest)] = torch.zeros(0)
                    continue
                found[line] = (digest, size)
                new_probes.setdefault(line // chunk, {})[digest] = torch.tensor(size, dtype=torch.int64)
            bar.update(len(batch))
    for c in sorted(new_probes):
        probes.put(new_probes[c])
    hashes.save()

    # Encode: per chunk, the clips whose latents are missing, in batches of one bucket.
    items, per_chunk = [], {}
    for c, lines in enumerate(chunks):
        missing = {}
        for line in lines:
            if line not in found:
                continue
            digest, (width, height, frames) = found[line]
            b = assign_bucket(width, height, frames, buckets)
            if b is None:
                report.short += 1
                continue
            report.clips += 1
            key = latent_key(digest, buckets[b])
            if bad_key(key) in store:
                report.bad.append(f"{records[line]['video']} (undecodable, found by an earlier fill)")
            elif key in store:
                report.cached += 1
            else:
                missing.setdefault(key, (b, records[line]["video"]))
        if not missing:
            report.chunks_skipped += 1 if any(line in found for line in lines) else 0
            continue
        per_chunk[c] = 0
        for b in sorted({b for b, _ in missing.values()}):
            keys = [k for k, (kb, _) in missing.items() if kb == b]
            bucket = buckets[b]
            for start in range(0, len(keys), encode_batch):
                per_chunk[c] += 1
                items.append([(c, k, missing[k][1], (bucket.width, bucket.height, bucket.frames))
                              for k in keys[start:start + encode_batch]])
    flat = [item for batch in items for item in batch]
    batches, start = [], 0
    for batch in items:
        batches.append(list(range(start, start + len(batch))))
        start += len(batch)
    home = next((p.device for p in codec.parameters()), None)  # learned codecs encode on `device`
    if flat and home is not None:
        codec.to(device)
    pending: dict[str, torch.Tensor] = {}
    with tqdm(total=len(flat), desc=f"encoding clips{desc}", disable=not progress or not flat) as bar:
        for batch in _loader(_Decoder(flat), batches, workers):
            chunk = batch[0][0]
            good = [(key, video) for _, key, _, video, _ in batch if video is not None]
            for _, key, path, video, error in batch:
                if video is None:
                    report.bad.append(f"{path} ({error})")
                    pending[bad_key(key)] = torch.zeros(0)
            if good:
                latents = codec.encode(torch.stack([v for _, v in good]).to(device)).float().cpu()
                pending.update(zip([k for k, _ in good], latents))
                report.encoded += len(good)
            bar.update(len(batch))
            per_chunk[chunk] -= 1
            if per_chunk[chunk] == 0:  # the chunk's last batch: its shard
                if pending:
                    store.put(pending)
                pending = {}
                report.chunks_written += 1
                kill_point("cache-chunk")
    if flat and home is not None:
        codec.to(home)
    return report


@torch.no_grad()
def fill_prompts(prompts: Sequence[str], encoder_config, cache_dir: str | Path,
                 device: str | torch.device = "cpu", num_shards: int = 1, shard_index: int = 0,
                 progress: bool = True, report: FillReport | None = None, chunk: int = PROMPT_CHUNK) -> FillReport:
    """Embed this shard's chunks of the distinct `prompts` (trimmed; what is stored is skipped);
    shard 0 also stores the null condition."""
    report = report or FillReport(shard_index=shard_index, num_shards=num_shards)
    store = prompt_store(cache_dir, encoder_config)
    unique = sorted(set(prompts), key=text_key)
    chunks = my_chunks(len(unique), chunk, num_shards, shard_index)
    missing = [[unique[i] for i in c if text_key(unique[i]) not in store] for c in chunks]
    report.prompts_cached += sum(len(c) for c in chunks) - sum(len(m) for m in missing)
    need_null = shard_index == 0 and NULL_KEY not in store
    if not need_null and not any(missing):
        return report
    from ..models.text import load_prompt_encoder

    encoder = load_prompt_encoder(encoder_config, device=device)
    if need_null:
        store.put(null_entry(encoder))
    with tqdm(total=sum(len(m) for m in missing), desc="encoding prompts", disable=not progress) as bar:
        for texts in filter(None, missing):
            store.put(encode_trimmed(encoder, texts))
            report.prompts_encoded += len(texts)
            bar.update(len(texts))
    return report


def fill_cache(cfg: ExperimentConfig, cache_dir: str | Path, manifests: Sequence[str] | None = None,
               device: str | torch.device = "cpu", num_shards: int = 1, shard_index: int = 0,
               workers: int = 0, encode_batch: int = 8, progress: bool = True, chunk: int = CLIP_CHUNK) -> FillReport:
    """This shard's part of every cache entry a training run of `cfg` reads: the latents of
    train.manifest (in train.buckets) and train.val_manifest (at the world size), and the prompt
    embeddings of both. `manifests` replaces train.manifest (the validation manifest stays).
    `chunk` clips (and `4 * chunk` prompts) make one shard file: the unit of resuming."""
    from ..models.vae import load_codec

    t = cfg.train
    train = list(manifests) if manifests else ([t.manifest] if t.manifest else [])
    if not train:
        raise CacheError("no manifest: give --manifest or set train.manifest")
    codec = load_codec(cfg.codec)
    report = FillReport(shard_index=shard_index, num_shards=num_shards)
    jobs = [(m, t.buckets) for m in train] + ([(t.val_manifest, ())] if t.val_manifest else [])
    prompts: list[str] = []
    for manifest, buckets in jobs:
        fill_latents(manifest, codec, cfg.codec, cfg.world, cache_dir, buckets, device=device,
                     num_shards=num_shards, shard_index=shard_index, workers=workers,
                     encode_batch=encode_batch, progress=progress, report=report, chunk=chunk)
        prompts += [r["prompt"] for r in read_manifest(manifest, required=("video", "prompt"))]
    return fill_prompts(prompts, cfg.prompt_encoder, cache_dir, device=device, num_shards=num_shards,
                        shard_index=shard_index, progress=progress, report=report, chunk=4 * chunk)
