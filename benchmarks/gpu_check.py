"""The native-size GPU check: every path users run at 480x832, 81 frames, on one H100 or H200.

Six sections, each in its own subprocess with its own time limit (seconds, `SECTIONS`), so an
out-of-memory error, a crash or a hang in one leaves the others' rows. All weights are random
(nothing is downloaded); every row is one JSON line.

  attn   60  one 1.3B-width layer at 32,760 video + 256 text tokens, for every attention policy the
             config offers (and the learned text_key_bias) and each task (T2V, V2T, joint): forward +
             backward in bf16, peak memory, time, and the SDPA kernels that ran (from the profiler)
  train 130  the 30-layer 1.3B unified model at 81 frames, batch 1: forward + backward + fused AdamW +
             EMA with activation checkpointing, T2V / V2T / joint samples; joint without checkpointing
             (expected not to fit: an out-of-memory error is the expected outcome); joint with every block
             compiled (per-block compile, as train.compile does; dynamo only in a dry run), its MFU
  infer  80  a published-shaped model (vocabulary 256,384, full attention): 2 guided T2V steps (batched
             guidance), 2 V2T steps; a clean_isolated model's prefill + cached text steps (1 and 4
             videos, the cache's bytes); `generate` / `caption` / `joint` through the pipeline with a
             tiny-width random Wan VAE and UMT5 encoder (the wiring, at the native frame size)
  vae    75  a Wan2.1-shaped AutoencoderKLWan through WanVAECodec: decode 21 latent frames -> 81x480x832
             (bf16 and fp32 weights), encode 1 and 4 videos, tiled decode
  umt5   45  a UMT5-XXL-shaped encoder: 4 x 512-token encode in fp32 (what univigu loads) and bf16,
             weights' memory, the bf16 output's error against fp32
  fsdp   75  torchrun on one GPU: NCCL, FSDP2 with the bf16 policy, a generator stage and a few Knowledge
             Recall steps with DCP checkpoints, then a resume compared with an unbroken run (at world size
             1 this checks the wiring and the policy, not sharding)

465 s of section limits in all: by design the whole run stays under 8 minutes. `--dry-run` runs every section at toy
sizes on a CPU (what `tests/test_gpu_check.py` does, so the script cannot rot between GPU runs).

    benchmarks/gpu_check.sh                    # on a GPU machine -> results/gpu/gpu_check_native.json(l)
    benchmarks/gpu_check.sh --only attn train  # some sections
    benchmarks/gpu_check.sh --dry-run          # toy sizes on a CPU

Missing packages (`PACKAGES`: diffusers, transformers, tokenizers, safetensors, ...) are installed first with
`pip install --no-index` from `--wheels` (default `benchmarks/wheels/`), when that folder exists.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent / "src"))  # a GPU machine without the package installed
from common import machine_info, provenance, training_step_flops, write_json  # noqa: E402
from gpu_step import peak_bf16  # noqa: E402

from univigu.config import TransformerConfig  # noqa: E402

#: Section -> its time limit on a GPU, seconds (465 in all).
SECTIONS = {"attn": 60, "train": 130, "infer": 80, "vae": 75, "umt5": 45, "fsdp": 75}
#: Limits of the dry run (toy sizes on a shared CPU).
DRY_LIMITS = {"attn": 60, "train": 60, "infer": 90, "vae": 60, "umt5": 60, "fsdp": 120}
#: Module -> pip name of what the sections import beyond torch.
PACKAGES = {"diffusers": "diffusers", "transformers": "transformers", "tokenizers": "tokenizers",
            "safetensors": "safetensors", "yaml": "pyyaml", "numpy": "numpy"}
#: Fields every case row carries (the dry-run test checks them).
ROW_FIELDS = ("section", "case", "ok", "s", "peak_gib")

W13 = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, in_channels=16,
           out_channels=16, text_dim=4096, freq_dim=256)
TOY = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, in_channels=16,
           out_channels=16, text_dim=32, freq_dim=32)
# The unified preset's text options (docs/ARCHITECTURE.md, Conventions).
UNIFIED = dict(attention_policy="clean_isolated", text_key_bias=-8.0, text_query_projection=True)
PUBLISHED = dict(mask_token=False, attention_policy="full", text_rope="rotate_half", text_position_embedding=False)
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384)
UMT5_TOY = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=300)


def sizes(dry: bool) -> dict:
    """Model, latent and input sizes of the run (dry: toys with the same code paths)."""
    if dry:
        return dict(model=TOY, latent=(16, 3, 4, 6), text_length=8, cond=8, vocab=100, big_vocab=300,
                    frames=5, height=16, width=32, umt5=UMT5_TOY, umt5_batch=2, vae_base_dim=8,
                    tiny_vae_base_dim=8, prompts=2)
    return dict(model=W13, latent=(16, 21, 60, 104), text_length=256, cond=512, vocab=32000, big_vocab=256384,
                frames=81, height=480, width=832, umt5=UMT5_XXL, umt5_batch=4, vae_base_dim=96,
                tiny_vae_base_dim=8, prompts=4)


# ------------------------------------------------------------------------------------------------ rows
class Rows:
    """JSON lines to one file (and stdout); every case row gets ok, s and peak_gib."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def emit(self, section: str, case: str, **fields) -> dict:
        row = {"section": section, "case": case, **fields}
        line = json.dumps(row, default=str)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        return row

    def measure(self, section: str, case: str, fn, expect_oom: bool = False, until: str | None = None,
                **known) -> dict:
        """Run `fn()` once: its time, peak memory and extra fields, or the error it raised. With
        `expect_oom`, an out-of-memory error is the expected outcome (ok, `outcome: "OOM"`). A case
        that needs unfinished work names it in `until`: if it fails, the row says it was expected to
        fail until then (still not ok; the summary lists it apart)."""
        reset()
        start = time.perf_counter()
        try:
            extra = fn() or {}
            sync()
            row = dict(ok=True, outcome="ran", s=round(time.perf_counter() - start, 3), peak_gib=peak_gib(),
                       **known, **extra)
        except torch.OutOfMemoryError as err:
            row = dict(ok=expect_oom, outcome="OOM", s=round(time.perf_counter() - start, 3), peak_gib=peak_gib(),
                       error="OutOfMemoryError", detail=str(err).splitlines()[0][:300], **known)
        except Exception as err:  # recorded; the next case runs
            row = dict(ok=False, outcome="error", s=round(time.perf_counter() - start, 3), peak_gib=peak_gib(),
                       error=type(err).__name__, detail=str(err)[:500], **known)
        if expect_oom:
            row["expected"] = "OOM"
        if until and not row["ok"]:
            row["expected_failure"] = f"expected to fail until {until}"
        reset()
        return self.emit(section, case, **row)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def build(fields: dict, dev: torch.device, **extra):
    from univigu.models.transformer import UniViGUTransformer

    with torch.device(dev):  # initialised on the GPU directly (seconds, not minutes)
        torch.manual_seed(0)
        return UniViGUTransformer(TransformerConfig(**{**fields, **extra}))


def inputs(z: dict, dev: torch.device, t_video: float, t_text: float, batch: int = 1, vocab: int | None = None):
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(batch, *z["latent"], generator=gen)
    text = torch.randint(0, vocab or z["vocab"], (batch, z["text_length"]), generator=gen)
    cond = torch.randn(batch, z["cond"], z["model"]["text_dim"], generator=gen)
    tv, tt = torch.full((batch,), float(t_video)), torch.full((batch,), float(t_text))
    return [x.to(dev) for x in (video, text, tv, tt, cond)]


#: Task -> (video timestep, text timestep): 0 is clean (in T2V the text, in V2T the video).
TASKS = {"t2v": (500.0, 0.0), "v2t": (0.0, 500.0), "joint": (500.0, 500.0)}
def task_loss(velocity, logits, task: str):
    """What a training sample of `task` is scored on: the noisy modalities only."""
    loss = velocity.float().square().mean() if task != "v2t" else 0.0
    if task != "t2v":
        loss = loss + logits.float().logsumexp(-1).mean()
    return loss


def sdpa_kernels(fn) -> list[str]:
    """The attention operators `fn()` ran (aten names: flash, efficient, cudnn, math), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "attention" in n and n.startswith("aten::"))


def attention_policies() -> tuple[str, ...]:
    """Every attention policy `TransformerConfig` accepts (new policies join the `attn` section)."""
    hints = typing.get_type_hints(TransformerConfig)
    return tuple(typing.get_args(hints["attention_policy"]))


# ------------------------------------------------------------------------------------------------ sections
def sec_attn(z: dict, rows: Rows, dry: bool) -> None:
    dev = device()
    one = dict(z["model"], num_layers=1)
    variants = [(policy, {"attention_policy": policy}) for policy in attention_policies()]
    variants.append(("clean_isolated+text_key_bias", UNIFIED))
    n_video = z["latent"][1] * (z["latent"][2] // 2) * (z["latent"][3] // 2)
    rows.emit("attn", "sizes", ok=True, s=0.0, peak_gib=None, video_tokens=n_video, text_tokens=z["text_length"],
              policies=list(attention_policies()),
              sdpa_backends_enabled=cuda_sdpa_flags() if dev.type == "cuda" else None)
    for name, extra in variants:
        try:
            model = build(one, dev, vocab_size=z["vocab"], text_length=z["text_length"], **extra).train()
        except Exception as err:  # e.g. a policy whose config needs more options
            rows.emit("attn", name, ok=False, outcome="error", s=0.0, peak_gib=None, error=type(err).__name__,
                      detail=str(err)[:300])
            continue
        for task, (tv, tt) in TASKS.items():
            batch = inputs(z, dev, tv, tt)

            def step():
                with autocast(dev):
                    velocity, logits = model(*batch)
                task_loss(velocity, logits, task).backward()

            def case():
                if not dry:  # warm-up (kernel selection, allocator)
                    step()
                    model.zero_grad(set_to_none=True)
                sync()
                start = time.perf_counter()
                step()
                sync()
                elapsed = time.perf_counter() - start
                kernels = sdpa_kernels(step)
                model.zero_grad(set_to_none=True)
                return {"fwd_bwd_s": round(elapsed, 4), "sdpa_kernels": kernels}

            rows.measure("attn", f"{name}/{task}", case, policy=name, task=task)
        model = None  # frees its memory before the next one is built


def cuda_sdpa_flags() -> dict:
    b = torch.backends.cuda
    return {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
            "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}


def sec_train(z: dict, rows: Rows, dry: bool) -> None:
    from univigu.training.optim import EMA

    dev = device()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build(z["model"], dev, vocab_size=z["vocab"], text_length=z["text_length"], **UNIFIED).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    ema = EMA(model, decay=0.999, warmup_steps=0)
    config = model.config
    n_video = z["latent"][1] * (z["latent"][2] // config.patch_size[1]) * (z["latent"][3] // config.patch_size[2])
    flops = training_step_flops(config, 1, n_video, z["text_length"], z["cond"])
    name = torch.cuda.get_device_name() if dev.type == "cuda" else None
    peak = peak_bf16(name) if name else None
    rows.emit("train", "model", ok=True, s=0.0, peak_gib=peak_gib(), gpu=name,
              cudnn=torch.backends.cudnn.version() if name else None,
              parameters=sum(p.numel() for p in model.parameters()),
              video_tokens=n_video, text_tokens=z["text_length"], joint_step_flops=flops,
              peak_bf16_tflop_per_s=peak / 1e12 if peak else None)

    def steps(task: str, count: int = 2):
        batch = inputs(z, dev, *TASKS[task])

        def run():
            times = []
            for i in range(count):  # the first includes allocator warm-up (and compiles, when compiled)
                sync()
                start = time.perf_counter()
                with autocast(dev):
                    velocity, logits = model(*batch)
                task_loss(velocity, logits, task).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update(i + 1)
                sync()
                times.append(round(time.perf_counter() - start, 4))
            out = {"step_s": times}
            if task == "joint":
                achieved = flops / times[-1]
                out.update(tflop_per_s=round(achieved / 1e12, 2), mfu=round(achieved / peak, 4) if peak else None)
            return out
        return run

    model.enable_gradient_checkpointing(True)
    for task in TASKS:
        rows.measure("train", f"{task}_checkpointed", steps(task),
                     task=task, checkpointing=True, compiled=False)
    model.enable_gradient_checkpointing(False)
    rows.measure("train", "joint_no_checkpointing", steps("joint", 1), expect_oom=True, task="joint",
                 checkpointing=False, compiled=False)
    optimizer.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing(True)
    # A CPU dry run traces the blocks with dynamo only (backend "eager"): inductor would take minutes.
    model.compile_blocks(**({"backend": "eager"} if dry else {}))
    rows.measure("train", "joint_checkpointed_compiled_blocks", steps("joint", 3), task="joint", checkpointing=True,
                 compiled="blocks" + (" (dynamo only)" if dry else ""))


def sec_infer(z: dict, rows: Rows, dry: bool) -> None:
    from univigu.config import FlowConfig
    from univigu.flow.options import TextSamplerOptions, VideoSamplerOptions
    from univigu.flow.paths import MixtureTextPath
    from univigu.flow.samplers import sample_text, sample_video

    dev = device()
    model = build(z["model"], dev, vocab_size=z["big_vocab"], text_length=z["text_length"], **PUBLISHED)
    model.eval().requires_grad_(False)
    path = MixtureTextPath.from_config(FlowConfig(text_source="uniform"), z["big_vocab"], [0, 1, 2])
    video, text, _, _, cond = inputs(z, dev, 0.0, 0.0, vocab=z["big_vocab"])
    null = torch.zeros_like(cond)

    def t2v():
        with torch.no_grad(), autocast(dev):
            out = sample_video(model, video.shape, cond, null, text=text, text_path=path, seeds=[0], device=dev,
                               options=VideoSamplerOptions(steps=2, guidance_scale=5.0, batch_guidance=True))
        return {"steps": 2, "nfe": out.nfe}

    def v2t():
        with torch.no_grad(), autocast(dev):
            out = sample_text(model, video, null, path, z["text_length"], eos_id=1, seeds=[0],
                              options=TextSamplerOptions(steps=2, sampler="euler"))
        return {"steps": 2, "nfe": out.nfe}

    rows.measure("infer", "published_t2v_2_steps_guided", t2v)
    rows.measure("infer", "published_v2t_2_steps", v2t)
    model = None  # frees its memory before the next one is built
    reset()

    model = build(z["model"], dev, vocab_size=z["vocab"], text_length=z["text_length"], **UNIFIED)
    model.eval().requires_grad_(False)
    text = inputs(z, dev, 0.0, 0.0)[1]

    def cached(videos: int):
        def run():
            v, c = video.expand(videos, -1, -1, -1, -1), null.expand(videos, -1, -1)
            with torch.no_grad(), autocast(dev):
                sync()
                start = time.perf_counter()
                cache = model.prefill("video", video=v, condition=c)
                sync()
                prefill_s = time.perf_counter() - start
                kv = sum(t.numel() * t.element_size() for t in list(cache.keys) + list(cache.values))
                start = time.perf_counter()
                for _ in range(2):
                    model.step_text(text.expand(videos, -1), torch.full((videos,), 500.0, device=dev), cache)
                sync()
            return {"videos": videos, "prefill_s": round(prefill_s, 4),
                    "step_text_s": round((time.perf_counter() - start) / 2, 4), "kv_cache_gib": round(kv / 2**30, 3)}
        return run

    rows.measure("infer", "clean_isolated_prefill_step_text_1", cached(1))
    rows.measure("infer", "clean_isolated_prefill_step_text_4", cached(4))
    model = None  # frees its memory before the next one is built
    reset()
    rows.measure("infer", "pipeline_generate_caption_joint", lambda: pipeline_round(z, dev))


def pipeline_round(z: dict, dev: torch.device) -> dict:
    """`generate`, `caption` and `joint` through UniViGUPipeline at the native frame size, with a tiny-width
    random Wan VAE and UMT5 encoder (the wiring: codec, prompt encoder, tokenizer, samplers, decode)."""
    from diffusers import AutoencoderKLWan

    from univigu.config import PromptEncoderConfig, SamplerConfig, WorldConfig
    from univigu.models.text import TextTokenizer, UMT5PromptEncoder
    from univigu.models.vae import WanVAECodec
    from univigu.pipeline import UniViGUPipeline

    work = Path(tempfile.mkdtemp(prefix="gpu-check-umt5-"))
    try:
        umt5_dir = tiny_umt5(work / "umt5")
        encoder = UMT5PromptEncoder(umt5_dir, condition_length=16, device=dev)
        words = "a the small large red blue green circle square moves up down left right".split()
        tokenizer = TextTokenizer.train_from_corpus([" ".join(words)])
        fields = dict(TOY, text_dim=encoder.embed_dim)
        model = build(fields, dev, vocab_size=tokenizer.vocab_size, text_length=16, **UNIFIED)
        torch.manual_seed(0)
        codec = WanVAECodec(AutoencoderKLWan(base_dim=z["tiny_vae_base_dim"]).to(dev))
        world = WorldConfig(width=z["width"], height=z["height"], frames=z["frames"])
        sampler = SamplerConfig(video_steps=2, guidance_scale=5.0, text_steps=2, caption_candidates=1)
        pipe = UniViGUPipeline(model, codec, PromptEncoderConfig(kind="umt5", path=str(umt5_dir), condition_length=16),
                               encoder.null_condition()[0], tokenizer, world, sampler, prompt_encoder=encoder,
                               device=dev)
        prompts = ["a small red circle moves left", "a large blue square moves up"]
        times = {}
        start = time.perf_counter()
        generated = pipe.generate(prompts, seed=[0, 1])
        times["generate_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        captions = pipe.caption(generated.frames, seed=0)
        times["caption_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        joint = pipe.joint(prompts[:1], seed=0)
        times["joint_s"] = round(time.perf_counter() - start, 3)
        shape = list(generated.frames[0].shape)
        assert shape == [z["frames"], z["height"], z["width"], 3], shape
        assert len(captions.captions) == 2 and len(joint.captions) == 1
        return {**times, "frames_shape": shape, "latents_shape": list(generated.latents.shape),
                "nfe": {"generate": generated.nfe, "caption": captions.nfe, "joint": joint.nfe}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sec_vae(z: dict, rows: Rows, dry: bool) -> None:
    from diffusers import AutoencoderKLWan

    from univigu.models.vae import WanVAECodec

    dev = device()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=z["vae_base_dim"]).to(dev)
    codec = WanVAECodec(vae)  # normalised latents, as the pipeline uses it
    c, f, h, w = 3, z["frames"], z["height"], z["width"]
    latent = torch.randn(1, codec.latent_channels, codec.latent_frames(f), h // 8, w // 8, device=dev)
    rows.emit("vae", "model", ok=True, s=0.0, peak_gib=peak_gib(), parameters=sum(p.numel() for p in vae.parameters()),
              latent=list(latent.shape), video=[c, f, h, w])

    def decode():
        frames = codec.decode(latent)
        assert list(frames.shape) == [1, c, f, h, w], list(frames.shape)
        return {"shape": list(frames.shape), "dtype": str(next(vae.parameters()).dtype)}

    def encode(batch: int):
        def run():
            x = torch.rand(batch, c, f, h, w, device=dev) * 2 - 1
            z_ = codec.encode(x)
            return {"shape": list(z_.shape), "videos": batch}
        return run

    vae.to(torch.bfloat16)
    rows.measure("vae", "decode_bf16", decode)
    rows.measure("vae", "encode_1_bf16", encode(1))
    vae.enable_tiling()
    rows.measure("vae", "decode_bf16_tiled", decode)
    vae.disable_tiling()
    rows.measure("vae", "encode_4_bf16", encode(4))
    vae.to(torch.float32)
    rows.measure("vae", "decode_fp32", decode)


def sec_umt5(z: dict, rows: Rows, dry: bool) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    dev = device()
    state = {}

    def build_fp32():
        torch.manual_seed(0)
        with torch.device(dev):
            state["model"] = UMT5EncoderModel(UMT5Config(**z["umt5"])).eval().requires_grad_(False)
        model = state["model"]
        return {"parameters": sum(p.numel() for p in model.parameters()),
                "weights_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3)}

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, z["umt5"]["vocab_size"], (z["umt5_batch"], z["cond"]), generator=gen).to(dev)

    def encode(dtype):
        def run():
            model = state["model"].to(dtype)
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float()
            sync()
            out = {"encode_s": round(time.perf_counter() - start, 4), "prompts": ids.shape[0], "tokens": ids.shape[1],
                   "weights_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3),
                   "finite": bool(torch.isfinite(hidden).all())}
            if dtype == torch.float32:
                state["reference"] = hidden.cpu()
            else:
                ref = state["reference"].to(hidden.device)
                out["max_abs_err"] = float((hidden - ref).abs().max())
                out["rel_err"] = float((hidden - ref).norm() / ref.norm())
                out["cosine_min"] = float(F.cosine_similarity(hidden, ref, dim=-1).min())
            return out
        return run

    rows.measure("umt5", "build_fp32", build_fp32)
    if "model" in state:
        rows.measure("umt5", "encode_fp32", encode(torch.float32))
        if "reference" in state:
            rows.measure("umt5", "encode_bf16", encode(torch.bfloat16))


def tiny_umt5(directory: Path) -> Path:
    """A tiny random UMT5 encoder folder (config + safetensors + tokenizer) that UMT5PromptEncoder loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = ["<pad>", "</s>", "<unk>"] + ("a the small large red blue green circle square star triangle moves up "
                                         "down left right").split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(directory))
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(**dict(UMT5_TOY, vocab_size=len(words)))).save_pretrained(str(directory))
    return directory


def sec_fsdp(z: dict, rows: Rows, dry: bool) -> None:
    """`torchrun --nproc_per_node=1 -m univigu train`: on a GPU NCCL, FSDP2 with the bf16 policy and DCP
    (CI runs them only on gloo in fp32); a Knowledge Recall run resumed from its DCP checkpoint must log the
    losses of an unbroken one."""
    work = Path(tempfile.mkdtemp(prefix="gpu-check-fsdp-"))
    try:
        umt5 = tiny_umt5(work / "umt5")
        dev = "cpu" if dry else "cuda"
        common = ["--config", "tiny", "--device", dev, "--no-progress", "model.text_dim=32",
                  "prompt_encoder.kind=umt5", f"prompt_encoder.path={umt5}", "prompt_encoder.condition_length=8",
                  f"train.cache_dir={work / 'cache'}", "train.eval_samples=0", "train.num_train_videos=8",
                  "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1", "train.save_every=2",
                  "train.oracle_eval=false", "train.tensorboard=false", f"train.bf16={'false' if dry else 'true'}"]
        kr = ["train.stage=knowledge_recall", f"train.init_from={work / 'gen' / 'model'}",
              "train.trainable=text_and_shared", "train.mixture.t2v=0.3", "train.mixture.v2t=0.4",
              "train.mixture.joint=0.3"]
        runs = [("generator_2_steps", "gen", 2, []),
                ("knowledge_recall_4_steps", "kr", 4, kr),
                ("knowledge_recall_resumed_from_2", "kr_part", 4, kr)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
        for case, folder, steps, extra in runs:
            run_dir = work / folder
            if folder == "kr_part":  # the unbroken run as it stood after its step-2 checkpoint
                stopped_at_2(work / "kr", run_dir)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "univigu",
                   "train", *common, f"train.output_dir={run_dir}", f"train.steps={steps}", *extra]
            start = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            losses = read_losses(run_dir)
            states = sorted((run_dir / "checkpoints").glob("ckpt-*/state.json")) if run_dir.is_dir() else []
            state = json.loads(states[-1].read_text()) if states else {}
            row = dict(ok=done.returncode == 0, s=round(time.perf_counter() - start, 2), peak_gib=None,
                       rc=done.returncode, logged_steps=sorted(losses), checkpoints=[p.parent.name for p in states],
                       checkpoint_format=state.get("format"), world_size=state.get("world_size"))
            row["ok"] = row["ok"] and state.get("format") == "dcp" and sorted(losses)[-1:] == [steps]
            if done.returncode != 0:
                row["tail"] = (done.stdout + done.stderr)[-1500:]
            if folder == "kr_part":
                reference = read_losses(work / "kr")
                diffs = [abs(losses[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in (3, 4)
                         if s in losses and s in reference]
                row.update(resume_max_rel_diff=max(diffs) if len(diffs) == 2 else None,
                           resume_exact=len(diffs) == 2 and max(diffs) == 0.0)
                row["ok"] = row["ok"] and len(diffs) == 2 and max(diffs) <= (0.0 if dry else 1e-3)
            rows.emit("fsdp", case, **row)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def stopped_at_2(source: Path, target: Path) -> None:
    """Copy run `source` as it was when its step-2 checkpoint was its newest: later checkpoints, the
    exports and the metrics after step 2 left out (what a run killed after step 2 leaves)."""
    if not (source / "checkpoints" / "ckpt-00000002").is_dir():
        return  # the unbroken run failed; the resume reports it
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "ckpt-00000002", target / "checkpoints" / "ckpt-00000002")
    lines = [line for line in (source / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("step", 0) <= 2]
    (target / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of a run's metrics.jsonl (a resumed run's own rows replace earlier ones)."""
    path = run_dir / "metrics.jsonl"
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row and "step" in row:
                out[int(row["step"])] = float(row["loss"])
    return out


FUNCTIONS = {"attn": sec_attn, "train": sec_train, "infer": sec_infer, "vae": sec_vae, "umt5": sec_umt5,
             "fsdp": sec_fsdp}


# ------------------------------------------------------------------------------------------------ launcher
def ensure_packages(wheels: Path) -> dict:
    """Which of PACKAGES import; install the missing ones from `wheels` (`pip install --no-index`)."""
    missing = [m for m in PACKAGES if importlib.util.find_spec(m) is None]
    installed, error = [], None
    if missing and wheels.is_dir():
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
               *[PACKAGES[m] for m in missing]]
        # A GPU machine's system python may be marked externally managed (PEP 668): install anyway.
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1"})
        if done.returncode == 0:
            installed = missing
            importlib.invalidate_caches()
        else:
            error = (done.stdout + done.stderr)[-600:]
        missing = [m for m in PACKAGES if importlib.util.find_spec(m) is None]
    versions = {}
    for m in PACKAGES:
        if m not in missing:
            try:
                versions[m] = importlib.metadata.version(PACKAGES[m])
            except importlib.metadata.PackageNotFoundError:  # importable, but not installed by pip
                versions[m] = "?"
    return {"versions": versions, "missing": missing, "installed": installed, "pip_error": error}


def run_sections(names, out: Path, dry: bool) -> list[dict]:
    """Each section in its own subprocess under its time limit; one `run` row per section."""
    limits = DRY_LIMITS if dry else SECTIONS
    rows = Rows(out)
    results = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    if dry:
        env.setdefault("OMP_NUM_THREADS", "1")
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--jsonl", str(out)]
        cmd += ["--dry-run"] if dry else []
        start = time.perf_counter()
        # Its own process group: a section stopped at its limit takes its torchrun workers with it.
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 start_new_session=True)
        try:
            _, stderr = child.communicate(timeout=limits[name])
            status = "ok" if child.returncode == 0 else "failed"
            detail = None if child.returncode == 0 else f"rc={child.returncode}: {stderr[-800:]}"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            status, detail = "timeout", f"stopped after its {limits[name]} s limit"
        results.append(rows.emit("run", name, status=status, limit_s=limits[name],
                                 s=round(time.perf_counter() - start, 1), detail=detail))
    return results


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on a CPU: checks the script")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), metavar="SECTION",
                        help=f"sections to run (default all: {' '.join(SECTIONS)})")
    parser.add_argument("--out", default=None, help="folder for gpu_check_native.json and .jsonl "
                        "(default $OUT, else benchmarks/results/gpu/; a dry run: a temporary folder)")
    parser.add_argument("--wheels", default=str(HERE / "wheels"), help="wheels to install missing packages from")
    parser.add_argument("--section", choices=list(SECTIONS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--jsonl", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:  # a child: one section, its rows appended to --jsonl
        FUNCTIONS[args.section](sizes(args.dry_run), Rows(Path(args.jsonl)), args.dry_run)
        return None
    if not torch.cuda.is_available() and not args.dry_run:
        parser.error("no CUDA device: this check needs a GPU (use --dry-run to test the script on a CPU)")
    default = Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) if args.dry_run else HERE / "results" / "gpu"
    out_dir = Path(args.out or os.environ.get("OUT") or default)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_native" + ("_dry_run" if args.dry_run else "")
    jsonl = out_dir / f"{stem}.jsonl"
    jsonl.unlink(missing_ok=True)
    began = time.perf_counter()
    packages = ensure_packages(Path(args.wheels))
    env_row = {"machine": machine_info(), "packages": packages, "dry_run": args.dry_run}
    if torch.cuda.is_available():  # nvidia-smi, not torch: this process keeps no CUDA context while sections run
        smi = shutil.which("nvidia-smi")
        query = [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"] if smi else None
        env_row.update(cuda=torch.version.cuda, nvidia_smi=subprocess.run(query, capture_output=True, text=True)
                       .stdout.strip() if query else None)
    Rows(jsonl).emit("env", "machine", **env_row)
    runs = run_sections(args.only, jsonl, args.dry_run)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    summary = {
        "benchmark": "gpu_check",
        "dry_run": args.dry_run,
        "provenance": provenance(),
        "limits_s": DRY_LIMITS if args.dry_run else SECTIONS,
        "sections": {r["case"]: r["status"] for r in runs},
        "cases_failed": [f"{r['section']}/{r['case']}" for r in rows
                         if r.get("ok") is False and "expected_failure" not in r],
        "cases_failed_as_expected": [f"{r['section']}/{r['case']}" for r in rows if "expected_failure" in r],
        "wall_s": round(time.perf_counter() - began, 1),
        "rows": rows,
    }
    print(f"wrote {write_json(out_dir / f'{stem}.json', summary)} ({summary['wall_s']} s): {summary['sections']}")
    return summary


if __name__ == "__main__":
    main()
