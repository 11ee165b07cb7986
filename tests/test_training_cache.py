"""The training data path for real videos: content-keyed latent and prompt caches, buckets."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from univigu.config import CodecConfig, PromptEncoderConfig, WorldConfig
from univigu.data.video_io import frames_to_tensor, read_video, write_video
from univigu.models import text as text_module
from univigu.models.text import PromptEncoder
from univigu.models.vae import load_codec
from univigu.training import cache as cache_module
from univigu.training.cache import (Bucket, BucketSampler, CacheError, SkippedClipsWarning, TensorStore,
                                    assign_bucket, cached_manifest_latents, cached_prompt_embeddings,
                                    epoch_batches)
from univigu.training.trainer import Trainer
from training_helpers import tiny_config


class FakeEncoder(PromptEncoder):
    """A deterministic 8-d prompt encoder: one token state per word, values from the word's sha1."""

    kind = "fake"
    embed_dim = 8
    loads = 0
    calls: list[list[str]] = []

    def _token_states(self, prompts):
        FakeEncoder.calls.append(list(prompts))
        out = []
        for p in prompts:
            words = p.split()[: self.condition_length]
            out.append(torch.tensor([[b / 255 for b in hashlib.sha1(w.encode()).digest()[:8]] for w in words]
                                    ).reshape(len(words), 8))
        return out


@pytest.fixture
def fake_encoder(monkeypatch):
    def load(config, device="cpu", **kwargs):
        FakeEncoder.loads += 1
        return FakeEncoder(config.condition_length, null=config.null_condition)

    FakeEncoder.loads, FakeEncoder.calls = 0, []
    monkeypatch.setattr(text_module, "load_prompt_encoder", load)
    return FakeEncoder


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def test_tensor_store_round_trip(tmp_path):
    store = TensorStore(tmp_path / "s")
    values = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    store.put(values)
    (tmp_path / "s" / ".shard-x.123.tmp").write_bytes(b"half a shard")  # an interrupted writer
    again = TensorStore(tmp_path / "s")
    assert len(again) == 2 and "a" in again and "c" not in again
    for key, value in values.items():
        assert torch.equal(again.get(key), value)
    with pytest.raises(CacheError, match="not in the cache"):
        again.get("c")
    store.put(values)  # the same entries again: the same shard file, no duplicate
    assert len(list((tmp_path / "s").glob("shard-*.safetensors"))) == 1


# --------------------------------------------------------------------------------------------
# Prompt embeddings
# --------------------------------------------------------------------------------------------


def test_prompt_embeddings_are_computed_once_per_text_and_encoder_config(tmp_path, fake_encoder):
    config = PromptEncoderConfig(kind="minilm", condition_length=6)
    prompts = ["a red circle", "a blue square moves left", "a red circle"]
    embeddings, null = cached_prompt_embeddings(prompts, config, tmp_path, progress=False)
    assert fake_encoder.loads == 1 and sorted(fake_encoder.calls[0]) == sorted(set(prompts))
    reference = FakeEncoder(6)
    for p in set(prompts):
        assert torch.equal(embeddings[p], reference.encode([p])[0][0])
    assert torch.equal(null, reference.null_condition()[0][0])

    # Another run (or stage): read, nothing encoded; a reader that may not compute gets the same.
    again, null_again = cached_prompt_embeddings(prompts[:2], config, tmp_path, compute=False)
    assert fake_encoder.loads == 1
    assert all(torch.equal(again[p], embeddings[p]) for p in again) and torch.equal(null_again, null)
    with pytest.raises(CacheError, match="missing"):
        cached_prompt_embeddings(["a green star"], config, tmp_path, compute=False)
    # Only the new prompt is encoded.
    cached_prompt_embeddings(prompts + ["a green star"], config, tmp_path, progress=False)
    assert fake_encoder.loads == 2 and fake_encoder.calls[-1] == ["a green star"]
    # A different encoder config is a different namespace.
    other, _ = cached_prompt_embeddings(prompts, PromptEncoderConfig(kind="minilm", condition_length=3),
                                        tmp_path, progress=False)
    assert other["a blue square moves left"].shape == (3, 8)


def test_prompt_embeddings_are_stored_trimmed_and_looked_up_lazily(tmp_path, fake_encoder):
    config = PromptEncoderConfig(kind="minilm", condition_length=6)
    prompts = ["a red circle", "a blue square moves left now and then", "a"]
    bank, null = cache_module.prompt_lookup(prompts, config, tmp_path, progress=False)
    store = cache_module.prompt_store(tmp_path, config)
    # Stored: the real tokens only (at most the condition length); the padding is rebuilt on lookup.
    assert [store.get(cache_module.text_key(p)).shape for p in prompts] == [(3, 8), (6, 8), (1, 8)]
    reference = FakeEncoder(6)
    assert torch.equal(bank(prompts), reference.encode(prompts)[0])
    assert torch.equal(null, reference.null_condition()[0][0])
    # The bank holds keys, not tensors.
    assert not any(isinstance(v, torch.Tensor) for v in vars(bank).values())
    with pytest.raises(KeyError, match="no embedding"):
        bank(["a green star"])


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------


def test_assign_bucket_by_aspect_ratio_and_length():
    buckets = [Bucket(16, 16, 5), Bucket(24, 16, 5), Bucket(16, 24, 5), Bucket(16, 16, 9)]
    assert assign_bucket(320, 320, 30, buckets) == 3  # square, long enough for 9 frames
    assert assign_bucket(320, 320, 7, buckets) == 0  # square, only 5 frames fit
    assert assign_bucket(640, 400, 30, buckets) == 1  # 1.6 is nearest to 1.5
    assert assign_bucket(300, 480, 9, buckets) == 2
    assert assign_bucket(320, 320, 4, buckets) is None  # shorter than every bucket
    assert assign_bucket(1000, 100, 5, [Bucket(16, 16, 5)]) == 0  # one bucket takes every shape


def test_bucket_batches_are_single_bucket_and_deterministic():
    bucket_of = np.array([0] * 11 + [1] * 7 + [2] * 2)
    sampler = BucketSampler(bucket_of, batch_size=3, seed=5)
    assert sampler.batches_per_epoch == 3 + 2 + 0
    for epoch in range(3):
        batches = [sampler(epoch * 5 + i) for i in range(5)]
        assert all(len(b) == 3 and len(set(bucket_of[b])) == 1 for b in batches)
        flat = np.concatenate(batches)
        assert len(set(flat.tolist())) == 15  # no sample twice in an epoch
        assert [b.tolist() for b in batches] == [b.tolist() for b in epoch_batches(bucket_of, 3, 5, epoch)]
    again = BucketSampler(bucket_of, batch_size=3, seed=5)
    assert [again(s).tolist() for s in range(12)] == [sampler(s).tolist() for s in range(12)]
    other = BucketSampler(bucket_of, batch_size=3, seed=6)
    assert [other(s).tolist() for s in range(10)] != [sampler(s).tolist() for s in range(10)]
    assert [sampler(s).tolist() for s in range(5)] != [sampler(s).tolist() for s in range(5, 10)]
    with pytest.raises(CacheError, match="no bucket holds a full batch"):
        BucketSampler(np.array([0, 0, 1]), batch_size=3, seed=0)


# --------------------------------------------------------------------------------------------
# Latents of a manifest
# --------------------------------------------------------------------------------------------


def _clip(seed: int, frames: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, height, width, 3))
    return np.clip(base + np.arange(frames)[:, None, None, None] * 8, 0, 255).astype(np.uint8)


def _write_manifest(folder, clips: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, (seed, frames, height, width) in clips.items():
        write_video(folder / f"{name}.mp4", _clip(seed, frames, height, width), fps=8)
        lines.append(json.dumps({"video": f"{name}.mp4", "prompt": f"clip {name}", "caption": f"the clip {name}"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "train.jsonl")


BUCKETS = [[16, 16, 5], [24, 16, 5], [16, 24, 5]]
CLIPS = {"sq": (1, 9, 32, 32), "wide": (2, 9, 32, 48), "tall": (3, 9, 48, 32), "short": (4, 3, 32, 32),
         "sq2": (5, 7, 40, 40)}


def test_manifest_latents_are_cached_by_content(tmp_path, monkeypatch):
    manifest = _write_manifest(tmp_path / "data", CLIPS)
    codec_cfg, world = CodecConfig(spatial_factor=4), WorldConfig(width=16, height=16, frames=5)
    codec = load_codec(codec_cfg)
    cache = tmp_path / "cache"
    with pytest.warns(SkippedClipsWarning, match="1 of 5 clips"):
        data = cached_manifest_latents(manifest, codec, codec_cfg, world, cache, BUCKETS, progress=False)
    assert data.prompts == ["clip sq", "clip wide", "clip tall", "clip sq2"]
    assert data.bucket_of.tolist() == [0, 1, 2, 0]
    for i, name in enumerate(["sq", "wide", "tall", "sq2"]):
        b = BUCKETS[data.bucket_of[i]]
        frames = read_video(tmp_path / "data" / f"{name}.mp4", num_frames=b[2], size=(b[0], b[1]))
        assert torch.equal(data.latents([i]), codec.encode(frames_to_tensor(frames)[None]))
    with pytest.raises(CacheError, match="mixes buckets"):
        data.latents([0, 1])

    # Later runs decode nothing: the same manifest, and a copy of a clip under another name.
    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached clip was decoded again")

    monkeypatch.setattr(cache_module, "read_video", no_decoding)
    monkeypatch.setattr(cache_module, "probe_video", no_decoding)
    shutil.copy(tmp_path / "data" / "sq.mp4", tmp_path / "data" / "copy.mp4")
    (tmp_path / "data" / "copy.jsonl").write_text(json.dumps({"video": "copy.mp4", "prompt": "p"}) + "\n")
    again = cached_manifest_latents(tmp_path / "data" / "copy.jsonl", codec, codec_cfg, world, cache, BUCKETS,
                                    compute=False, progress=False)
    assert torch.equal(again.latents([0]), data.latents([0]))
    # New content under an old name is new: a read-only process cannot serve it.
    write_video(tmp_path / "data" / "copy.mp4", _clip(9, 9, 32, 32), fps=8)
    with pytest.raises(CacheError, match="not in the cache"):
        cached_manifest_latents(tmp_path / "data" / "copy.jsonl", codec, codec_cfg, world, cache, BUCKETS,
                                compute=False, progress=False)
    # A different codec config is a different cache.
    with pytest.raises(CacheError):
        cached_manifest_latents(manifest, load_codec(CodecConfig(spatial_factor=2)), CodecConfig(spatial_factor=2),
                                world, cache, BUCKETS, compute=False, progress=False)


def test_the_inline_fill_is_bounded_and_names_the_cache_command(tmp_path):
    manifest = _write_manifest(tmp_path / "data", {f"c{i}": (i, 9, 32, 32) for i in range(3)})
    codec_cfg, world = CodecConfig(spatial_factor=4), WorldConfig(width=16, height=16, frames=5)
    codec = load_codec(codec_cfg)
    with pytest.raises(CacheError, match="3 clips .* more than train.inline_cache_limit=2 .*univigu data cache"):
        cached_manifest_latents(manifest, codec, codec_cfg, world, tmp_path / "cache", limit=2, progress=False)
    with pytest.raises(CacheError, match="took over 0 s .*what is done is kept.*univigu data cache"):
        cached_manifest_latents(manifest, codec, codec_cfg, world, tmp_path / "cache", encode_batch=1,
                                deadline_s=0, progress=False)
    data = cached_manifest_latents(manifest, codec, codec_cfg, world, tmp_path / "cache", limit=2, progress=False)
    assert len(data) == 3  # the first clip was kept: two were left to encode


def test_trainer_on_a_bucketed_manifest(tmp_path, fake_encoder):
    clips = {f"c{i}": (i, 9, *[(32, 32), (32, 48)][i % 2]) for i in range(8)}
    manifest = _write_manifest(tmp_path / "data", clips)
    val = _write_manifest(tmp_path / "val", {"v0": (20, 9, 32, 32), "v1": (21, 9, 32, 32)})
    cfg = tiny_config(tmp_path / "run", tmp_path / "cache", f"train.manifest={manifest}", f"train.val_manifest={val}", "train.batch_size=2",
                      "train.buckets=[[16, 16, 5], [24, 16, 5]]", "model.text_dim=8", "train.steps=4")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedClipsWarning)
        trainer = Trainer(cfg, progress=False)
    shapes = set()
    for step in range(4):
        batch = trainer.make_batch(step)
        shapes.add(tuple(batch.video.shape[2:]))
        assert batch.video.shape[0] == 2
    assert shapes == {(5, 4, 4), (5, 4, 6)}
    out = trainer.run()
    assert (out / "model_index.json").is_file()
    record = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["val.video_loss"] > 0 and "t2v.all_correct" not in record  # no oracle for real data


class _Stop(Exception):
    pass


def test_a_resumed_run_on_the_cached_loader_is_exact(tmp_path, fake_encoder):
    from univigu.training import checkpoint as ckpt
    from univigu.training.logging import read_metrics

    manifest = _write_manifest(tmp_path / "data", {f"c{i}": (i, 9, 32, 32) for i in range(6)})

    def cfg(name, workers):
        return tiny_config(tmp_path / name, tmp_path / "cache", f"train.manifest={manifest}", "train.batch_size=2",
                           "model.text_dim=8", "train.steps=4", "train.save_every=2", "train.eval_samples=0",
                           "train.lr=0.003", f"train.loader_workers={workers}")

    Trainer(cfg("inline", 0), progress=False).run()  # fills the cache, reads in the loop
    Trainer(cfg("full", 1), progress=False).run()

    def stop_at_3(trainer, logs):
        if trainer.step == 3:
            raise _Stop  # killed after step 3: checkpoint 2 is the newest

    with pytest.raises(_Stop):
        Trainer(cfg("part", 1), progress=False).run(on_step=stop_at_3)
    resumed = Trainer(cfg("part", 1), progress=False)
    assert resumed.step == 2
    resumed.run()

    keys = ("loss", "video_loss", "grad_norm", "lr")
    logs = {name: [[r[k] for k in keys] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
            for name in ("inline", "full", "part")}
    assert len(logs["full"]) == 4 and logs["part"] == logs["full"] == logs["inline"]
    final = [ckpt.read_weights(tmp_path / name / "checkpoints" / "ckpt-00000004", "model") for name in ("full", "part")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_real_videos_get_a_subword_tokenizer_and_a_trimmed_one_that_misses_words_is_refused(tmp_path):
    from univigu.training.build import TrainingError, build_tokenizer

    root = tmp_path / "data"
    root.mkdir()
    (root / "train.jsonl").write_text(json.dumps({"video": "a.mp4", "prompt": "a red ball rolls"}) + "\n")
    (root / "val.jsonl").write_text(json.dumps({"video": "b.mp4", "prompt": "a red ball",
                                                "caption": "a crimson sphere glides slowly"}) + "\n")
    corpus = ["a red ball rolls"]

    def cfg(*extra):
        return tiny_config(tmp_path / "run", tmp_path / "cache", f"train.manifest={root / 'train.jsonl'}",
                           f"train.val_manifest={root / 'val.jsonl'}", *extra, stage="knowledge_recall")

    assert build_tokenizer(cfg(), corpus).vocab_size > 30000  # auto on real videos: MiniLM's WordPiece
    with pytest.raises(TrainingError, match=r"reads 50.0% of the tokens .* as unknown .*tokenizer.kind=auto"):
        build_tokenizer(cfg("tokenizer.kind=trimmed"), corpus)
    shapes = tiny_config(tmp_path / "run", tmp_path / "cache", stage="knowledge_recall")
    assert build_tokenizer(shapes, corpus).vocab_size < 100  # ShapesWorld: still trimmed
