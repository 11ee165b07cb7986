"""Content-keyed caches of latents and prompt embeddings, and resolution/length buckets for real data.

The data path for manifests is manifest -> decode -> codec -> cache: every clip is decoded and
encoded once, every prompt embedded once, and later stages and runs read the stored tensors.

```
CACHE_DIR/prompts/<encoder key>/shard-*.safetensors   sha1(prompt)               -> embedding [Lc, D]
                                                      "null"                     -> null condition [Lc, D]
CACHE_DIR/latents/<codec key>/shard-*.safetensors     sha1(file sha1, W, H, F)   -> latent [C, F', H', W']
CACHE_DIR/probes/shard-*.safetensors                  file sha1                  -> [width, height, frames]
CACHE_DIR/file-hashes.json                            path -> (size, mtime, sha1 of the bytes)
```

Keys name the content (the bytes of a video file, the text of a prompt) and the settings that
change the result (the decode size and frame count); a namespace folder names the codec or
prompt-encoder config (its own `config.json` says which). The file-hash memo only saves re-reading
unchanged files (same path, size and mtime). Shards are written to a temporary file, fsynced and
renamed, so a killed run leaves no half-written shard.

Bucketing: clips of mixed sizes go to the bucket (width, height, frames) of the nearest aspect
ratio among those they have enough frames for; every batch is drawn from one bucket; the order is
a function of (seed, epoch) only, so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..atomic import atomic_file, atomic_write_text
from ..config import CodecConfig, PromptEncoderConfig, WorldConfig, to_dict
from ..data.manifest import read_manifest
from ..data.video_io import VideoError, frames_to_tensor, probe_video, read_video

NULL_KEY = "null"
SHARD_BYTES = 512 * 2**20


class CacheError(ValueError):
    """The cache is missing an entry it must have, or a bucket setting cannot work."""


class SkippedClipsWarning(UserWarning):
    """Some manifest clips were left out (unreadable, or shorter than every bucket)."""


def default_cache_dir() -> Path:
    """`$UNIVIGU_CACHE_DIR`, else `$XDG_CACHE_HOME/univigu` (`~/.cache/univigu`)."""
    if os.environ.get("UNIVIGU_CACHE_DIR"):
        return Path(os.environ["UNIVIGU_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "univigu"


def text_key(text: str) -> str:
    return hashlib.sha1(b"str:" + text.encode("utf-8")).hexdigest()


def config_key(kind: str, config: dict) -> str:
    """A short stable name for a component config (sorted-key JSON, sha1)."""
    blob = json.dumps({"kind": kind, **config}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def file_sha1(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# A folder of safetensors shards, keyed by string
# --------------------------------------------------------------------------------------------


class TensorStore:
    """Tensors keyed by content, stored as safetensors shards in one folder.

    Opening reads only the shard headers (key -> file, dtype, shape, byte range); `get` reads one
    tensor's bytes with a positioned read. Nothing is memory-mapped or kept, so what a process holds
    does not grow with the number of entries it has read (an mmap's touched pages would count as
    resident memory). Writing adds a new shard, named by the sha1 of its keys, so two writers of the
    same entries write the same file.
    """

    def __init__(self, directory: str | Path, config: dict | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if config is not None and not (self.directory / "config.json").is_file():
            atomic_write_text(self.directory / "config.json", json.dumps(config, indent=2, default=str))
        self._where: dict[str, tuple] = {}  # key -> (shard, dtype, shape, start, end)
        self._shards: set[Path] = set()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the shard headers (entries written by another process)."""
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            if shard in self._shards:
                continue
            for key, entry in _read_header(shard).items():
                self._where.setdefault(key, entry)
            self._shards.add(shard)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shards(self) -> list[Path]:
        return sorted(self._shards)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise CacheError(f"{key} is not in the cache {self.directory}")
        shard, dtype, shape, start, end = self._where[key]
        with open(shard, "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), end - start, start)
        if len(raw) != end - start:
            raise CacheError(f"{shard} is truncated (entry {key})")
        if not raw:
            return torch.zeros(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)

    def put(self, entries: dict[str, torch.Tensor]) -> None:
        """Write `entries` as one or more new shards (atomically)."""
        batch: dict[str, torch.Tensor] = {}
        size = 0
        for key, value in entries.items():
            batch[key] = value.detach().contiguous().cpu()
            size += value.numel() * value.element_size()
            if size >= SHARD_BYTES:
                self._write(batch)
                batch, size = {}, 0
        if batch:
            self._write(batch)

    def _write(self, batch: dict[str, torch.Tensor]) -> None:
        name = hashlib.sha1("\n".join(sorted(batch)).encode()).hexdigest()[:20]
        final = self.directory / f"shard-{name}.safetensors"
        with atomic_file(final) as tmp:
            save_file(batch, str(tmp))
        for key, entry in _read_header(final).items():
            self._where.setdefault(key, entry)
        self._shards.add(final)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_header(shard: Path) -> dict[str, tuple]:
    """A safetensors file's entries: key -> (file, dtype, shape, start byte, end byte)."""
    with open(shard, "rb") as f:
        size = f.read(8)
        header = json.loads(f.read(int.from_bytes(size, "little")) if len(size) == 8 else b"")
    base = 8 + int.from_bytes(size, "little")
    return {key: (shard, _DTYPES[v["dtype"]], _SHAPES.setdefault(tuple(v["shape"]), tuple(v["shape"])),
                  base + v["data_offsets"][0], base + v["data_offsets"][1])
            for key, v in header.items() if key != "__metadata__"}


_SHAPES: dict[tuple, tuple] = {}  # one tuple per distinct shape, shared by every entry of that shape


# --------------------------------------------------------------------------------------------
# Prompt embeddings
# --------------------------------------------------------------------------------------------


def prompt_store(cache_dir: str | Path, encoder_config: PromptEncoderConfig) -> TensorStore:
    config = to_dict(encoder_config)
    return TensorStore(Path(cache_dir) / "prompts" / config_key("prompt_encoder", config), config)


class PromptBank:
    """Prompt embeddings looked up by prompt text, read from the prompt store when asked for.

    Entries are stored trimmed to the prompt's real tokens; a lookup zero-pads them back to the
    condition length (what the encoder itself returns). The bank holds only the prompt -> key
    index, not the embeddings: its memory does not grow with the embeddings' size.
    """

    def __init__(self, store: TensorStore, prompts: Sequence[str], length: int):
        self.store, self.length = store, length
        self.prompts = prompts  # the caller's list (no copy): keys are hashed at lookup

    def __len__(self) -> int:
        return len(self.prompts)

    def __contains__(self, prompt: str) -> bool:
        return text_key(prompt) in self.store

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        keys = [text_key(p) for p in prompts]
        missing = [p for p, k in zip(prompts, keys) if k not in self.store]
        if missing:
            raise KeyError(f"no embedding for prompt {missing[0]!r}")
        return torch.stack([padded(self.store.get(k), self.length) for k in keys])

    def null(self) -> torch.Tensor:
        return padded(self.store.get(NULL_KEY), self.length)


def padded(states: torch.Tensor, length: int) -> torch.Tensor:
    """A trimmed embedding [n, D] as float32 [length, D], zeros after its n real tokens."""
    out = torch.zeros(length, states.shape[-1], dtype=torch.float32)
    out[: min(length, states.shape[0])] = states[:length].float()
    return out


def encode_trimmed(encoder, prompts: Sequence[str], progress: bool = False,
                   desc: str = "encoding prompts") -> dict[str, torch.Tensor]:
    """{store key: embedding trimmed to the prompt's real tokens [n, D] float32} of `prompts`."""
    from ..models.precompute import content_key, encode_prompts

    fresh = encode_prompts(encoder, list(prompts), progress=progress, desc=desc)
    out = {}
    for p in prompts:
        emb, mask = fresh[content_key(p)]
        out[text_key(p)] = emb[: int(mask.sum())].clone()
    return out


def null_entry(encoder) -> dict[str, torch.Tensor]:
    emb, mask = encoder.null_condition()
    return {NULL_KEY: emb[0, : int(mask[0].sum())].float().cpu().clone()}


def prompt_lookup(prompts: Sequence[str], encoder_config: PromptEncoderConfig, cache_dir: str | Path,
                  device: str | torch.device = "cpu", compute: bool = True, progress: bool = True
                  ) -> tuple[PromptBank, torch.Tensor]:
    """(a PromptBank over `prompts`, null condition [Lc, D]) from the prompt cache.

    Prompts not in the cache are encoded (the encoder is loaded only then) and stored, unless
    `compute=False` (processes that only read what rank 0 wrote), which raises CacheError.
    """
    store = prompt_store(cache_dir, encoder_config)
    unique = sorted(set(prompts))
    missing = [p for p in unique if text_key(p) not in store]
    if missing or NULL_KEY not in store:
        if not compute:
            raise CacheError(f"{len(missing)} prompt embeddings missing from {store.directory}")
        from ..models.text import load_prompt_encoder

        encoder = load_prompt_encoder(encoder_config, device=device)
        entries = encode_trimmed(encoder, missing, progress=progress) if missing else {}
        if NULL_KEY not in store:
            entries.update(null_entry(encoder))
        store.put(entries)
        del encoder
    bank = PromptBank(store, prompts, encoder_config.condition_length)
    return bank, bank.null()


def cached_prompt_embeddings(prompts: Sequence[str], encoder_config: PromptEncoderConfig,
                             cache_dir: str | Path, device: str | torch.device = "cpu",
                             compute: bool = True, progress: bool = True
                             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({prompt: embedding [Lc, D] float32}, null condition [Lc, D]): every embedding in memory,
    for small sets; training looks them up lazily (`prompt_lookup`)."""
    bank, null = prompt_lookup(prompts, encoder_config, cache_dir, device, compute, progress)
    return {p: bank([p])[0] for p in bank.prompts}, null


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int
    frames: int


def make_buckets(sizes: Sequence[Sequence[int]], world: WorldConfig) -> list[Bucket]:
    """Buckets from `[width, height, frames]` triples; none given = one bucket at the world size."""
    if not sizes:
        return [Bucket(world.width, world.height, world.frames)]
    buckets = []
    for size in sizes:
        if len(size) != 3 or min(size) < 1:
            raise CacheError(f"a bucket is [width, height, frames] with positive sizes, got {list(size)}")
        buckets.append(Bucket(*(int(v) for v in size)))
    if len(set(buckets)) != len(buckets):
        raise CacheError("train.buckets lists the same bucket twice")
    return buckets


def assign_bucket(width: int, height: int, frames: int, buckets: Sequence[Bucket]) -> int | None:
    """Index of the bucket for a clip: nearest aspect ratio among the buckets it has enough frames
    for (then the most frames, then the largest area); None when it is shorter than all of them.
    With a single bucket every long enough clip goes there (scaled and centre-cropped)."""
    fits = [i for i, b in enumerate(buckets) if b.frames <= frames]
    if not fits:
        return None
    aspect = math.log(width / height)
    return min(fits, key=lambda i: (round(abs(aspect - math.log(buckets[i].width / buckets[i].height)), 9),
                                    -buckets[i].frames, -buckets[i].width * buckets[i].height, i))


def epoch_batches(bucket_of: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch: each bucket shuffled by (seed, epoch, bucket) and cut into full
    batches (the remainder waits for another epoch's shuffle), then the batches shuffled by (seed, epoch)."""
    batches = []
    for b in np.unique(bucket_of):
        members = np.flatnonzero(bucket_of == b)
        members = members[np.random.default_rng([seed, epoch, int(b)]).permutation(len(members))]
        batches += [members[i:i + batch_size] for i in range(0, len(members) - batch_size + 1, batch_size)]
    order = np.random.default_rng([seed, epoch]).permutation(len(batches))
    return [batches[i] for i in order]


class BucketSampler:
    """Global batch `step` -> sample indices, all from one bucket, deterministic by (seed, epoch)."""

    def __init__(self, bucket_of: Sequence[int], batch_size: int, seed: int):
        self.bucket_of = np.asarray(bucket_of)
        self.batch_size, self.seed = batch_size, seed
        counts = np.bincount(self.bucket_of) if len(self.bucket_of) else np.zeros(0, dtype=int)
        self.batches_per_epoch = int(sum(c // batch_size for c in counts))
        if self.batches_per_epoch == 0:
            raise CacheError(f"no bucket holds a full batch of {batch_size} clips (bucket sizes "
                             f"{counts.tolist()}): lower train.batch_size or merge buckets")
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    def __call__(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.bucket_of, self.batch_size, self.seed, epoch))
        return self._epoch[1][position]


# --------------------------------------------------------------------------------------------
# Latents of a manifest
# --------------------------------------------------------------------------------------------


class FileHashes:
    """sha1 of file bytes, memoised by (path, size, mtime) in CACHE_DIR/file-hashes.json.

    A sharded fill (`training/fill.py`) writes one memo per shard (`file-hashes-I-of-N.json`, so
    parallel writers never replace each other's); every memo of the folder is read."""

    def __init__(self, cache_dir: Path, name: str = "file-hashes.json"):
        self.path = cache_dir / name
        self.memo = {}
        for memo in sorted(cache_dir.glob("file-hashes*.json")):
            try:
                self.memo.update(json.loads(memo.read_text()))
            except (OSError, ValueError):  # a memo is only a shortcut: an unreadable one is ignored
                continue
        self.dirty = False

    def known(self, file: str) -> str | None:
        """The memoised sha1 of `file` when it is unchanged, else None (nothing is read)."""
        st = os.stat(file)
        entry = self.memo.get(file)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        return None

    def add(self, file: str, digest: str) -> None:
        st = os.stat(file)
        self.memo[file] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True

    def __call__(self, file: str) -> str:
        st = os.stat(file)
        entry = self.memo.get(file)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        digest = file_sha1(file)
        self.memo[file] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            atomic_write_text(self.path, json.dumps(self.memo))


def bad_key(key: str) -> str:
    """The entry that marks a probe or latent key as unreadable (an empty tensor)."""
    return f"bad:{key}"


def latent_key(file_hash: str, bucket: Bucket) -> str:
    return hashlib.sha1(f"{file_hash}:{bucket.width}x{bucket.height}x{bucket.frames}".encode()).hexdigest()


class LatentSet:
    """A manifest's clips as cached latents: the trainer's data for real videos."""

    def __init__(self, store: TensorStore, keys: list[str], bucket_of: list[int], buckets: list[Bucket],
                 prompts: list[str], captions: list[str], ids: list[str]):
        self.store, self.keys = store, keys
        self.bucket_of, self.buckets = np.asarray(bucket_of, dtype=np.int64), buckets
        self.prompts, self.captions, self.ids = prompts, captions, ids
        self._samplers: dict[tuple[int, int], BucketSampler] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        key = (batch_size, seed)
        if key not in self._samplers:
            self._samplers[key] = BucketSampler(self.bucket_of, batch_size, seed)
        return self._samplers[key](step)

    def latents(self, index: Sequence[int], codec=None) -> torch.Tensor:
        shapes = {int(self.bucket_of[i]) for i in index}
        if len(shapes) > 1:
            raise CacheError(f"a batch mixes buckets {sorted(shapes)}; draw batches with .batch()")
        return torch.stack([self.store.get(self.keys[i]) for i in index]).float()


def open_latent_cache(manifest, codec, codec_config: CodecConfig, world: WorldConfig, cache_dir: Path,
                      bucket_sizes: Sequence[Sequence[int]] = ()):
    """(manifest records, buckets checked against the codec, latent store, probe store)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    records = read_manifest(manifest, required=("video", "prompt"))
    buckets = make_buckets(bucket_sizes, world)
    for b in buckets:
        codec.check_frames(b.frames, b.height, b.width)
    codec_cfg = to_dict(codec_config)
    store = TensorStore(cache_dir / "latents" / config_key("codec", codec_cfg), codec_cfg)
    return records, buckets, store, TensorStore(cache_dir / "probes")


@torch.no_grad()
def cached_manifest_latents(manifest: str | Path, codec, codec_config: CodecConfig, world: WorldConfig,
                            cache_dir: str | Path, bucket_sizes: Sequence[Sequence[int]] = (),
                            device: str | torch.device = "cpu", compute: bool = True,
                            progress: bool = True, encode_batch: int = 8, limit: int | None = None,
                            deadline_s: float | None = None) -> LatentSet:
    """Every readable clip of a JSONL manifest as a cached latent (encoded once, ever).

    Clips are assigned to buckets (`make_buckets`), decoded with `num_frames` evenly spaced frames,
    scaled to cover the bucket size and centre-cropped. Unreadable clips and clips shorter than
    every bucket are left out with one `SkippedClipsWarning`. `compute=False` only reads.
    This in-process fill is for small sets: more than `limit` clips to encode, or encoding for
    longer than `deadline_s` (what is done is kept), raises CacheError naming `univigu data cache`.
    """
    cache_dir = Path(cache_dir)
    records, buckets, store, probes = open_latent_cache(manifest, codec, codec_config, world, cache_dir, bucket_sizes)
    hashes = FileHashes(cache_dir)

    skipped: list[str] = []
    chosen: list[tuple[dict, str, int]] = []  # record, latent key, bucket
    new_probes: dict[str, torch.Tensor] = {}
    for line, record in enumerate(tqdm(records, desc="indexing clips", disable=not progress)):
        record = {**record, "id": str(record.get("id", line))}
        path = record["video"]
        try:
            digest = hashes(path)
            if bad_key(digest) in probes:  # a fill found it unreadable
                skipped.append(f"{path} (unreadable, found by an earlier fill)")
                continue
            if digest in probes:
                width, height, frames = probes.get(digest).tolist()
            else:
                if not compute:
                    raise CacheError(f"clip {path} is not in the cache {cache_dir}")
                meta = probe_video(path)
                width, height, frames = meta["width"], meta["height"], meta["num_frames"]
                new_probes[digest] = torch.tensor([width, height, frames], dtype=torch.int64)
        except (OSError, VideoError) as err:
            skipped.append(f"{path} ({err})")
            continue
        b = assign_bucket(width, height, frames, buckets)
        if b is None:
            skipped.append(f"{path} ({frames} frames, fewer than every bucket)")
            continue
        chosen.append((record, latent_key(digest, buckets[b]), b))
    if compute:
        if new_probes:
            probes.put(new_probes)
        hashes.save()

    failed = {k for _, k, _ in chosen if bad_key(k) in store}  # a fill could not decode them
    skipped += [f"{r['video']} (undecodable, found by an earlier fill)" for r, k, _ in chosen if k in failed]
    todo = [(r, k, b) for r, k, b in chosen if k not in store and k not in failed]
    if todo and not compute:
        raise CacheError(f"{len(todo)} clip latents missing from the cache {store.directory}")
    fix = f"fill the cache first: univigu data cache --config CONFIG --manifest {manifest} --out {cache_dir}"
    if limit is not None and len(todo) > limit:
        raise CacheError(f"{len(todo)} clips of {manifest} are not in the cache, more than train.inline_cache_limit="
                         f"{limit} a training run encodes itself: {fix}")
    began = time.monotonic()
    pending: dict[str, torch.Tensor] = {}
    home = next((p.device for p in codec.parameters()), None)  # learned codecs encode on `device`
    if todo and home is not None:
        codec.to(device)
    by_bucket: dict[int, list[tuple[dict, str]]] = {}
    for r, k, b in todo:
        by_bucket.setdefault(b, []).append((r, k))
    with tqdm(total=len(todo), desc="encoding clips", disable=not progress or not todo) as bar:
        for b, items in by_bucket.items():
            bucket = buckets[b]
            for start in range(0, len(items), encode_batch):
                videos, keys = [], []
                for r, k in items[start:start + encode_batch]:
                    try:
                        frames = read_video(r["video"], num_frames=bucket.frames, size=(bucket.width, bucket.height))
                    except VideoError as err:
                        skipped.append(f"{r['video']} ({err})")
                        failed.add(k)
                        continue
                    videos.append(frames_to_tensor(frames))
                    keys.append(k)
                if videos:
                    latents = codec.encode(torch.stack(videos).to(device)).float().cpu()
                    pending.update(zip(keys, latents))
                bar.update(len(items[start:start + encode_batch]))
                late = deadline_s is not None and time.monotonic() - began > deadline_s
                if late or sum(v.numel() for v in pending.values()) * 4 >= SHARD_BYTES:
                    store.put(pending)
                    pending = {}
                if late:
                    raise CacheError(f"encoding {len(todo)} clips inside the training run took over {deadline_s:.0f} s "
                                     f"(the other processes wait at a barrier; what is done is kept): {fix}")
    if pending:
        store.put(pending)
    if todo and home is not None:
        codec.to(home)
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(records)} clips left out, e.g. {skipped[0]}",
                      SkippedClipsWarning, stacklevel=2)
    kept = [(r, k, b) for r, k, b in chosen if k not in failed]
    if not kept:
        raise CacheError(f"no usable clip in {manifest}")
    return LatentSet(store, [k for _, k, _ in kept], [b for _, _, b in kept], buckets,
                     prompts=[r["prompt"] for r, _, _ in kept],
                     captions=[r.get("caption", r["prompt"]) for r, _, _ in kept],
                     ids=[r["id"] for r, _, _ in kept])
