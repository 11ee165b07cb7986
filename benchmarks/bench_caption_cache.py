"""Captioning (V2T) speed-up from the clean-video cache, against its analytic bound.

The published Uni-ViGU samples a caption by running the whole joint sequence (N video + L text
tokens) through the model at every text step. Under the `clean_isolated` attention policy the clean
video never attends to the text, so its per-layer keys/values are computed once (`prefill`) and
every step runs only the L text tokens against them (`step_text`). Both paths run the same sampler
(`sample_text`, same steps and seeds) and must give identical tokens; this script asserts that.

With S steps and per-token forward FLOPs f_v (video) and f_t (text, which also pays for the
vocabulary head), caching can at best save::

    bound = S (N f_v + L f_t) / (N f_v + S L f_t)

(`common.cache_speedup_bound`; f_v and f_t from `common.per_token_flops` at the joint sequence
length). Target: the measured speed-up reaches >= 80% of the bound at video:text token
ratios 8, 32 and 128. For reference, the uncached path is also timed under the `full` policy (no
isolation mask; what the published model runs), with the same weights.

    python benchmarks/bench_caption_cache.py            # ratios 8, 32, 128 at batch 1 and 8
    python benchmarks/bench_caption_cache.py --quick    # fewer repetitions
    python benchmarks/bench_caption_cache.py --model small --batches 1   # a real-size vocabulary
Writes benchmarks/results/caption_cache.json: caption_cache_<model>.json for `--model small` or
`wide`, with `_batch<B>` added when `--batches` is one size other than 1 (caption_cache_small_batch8.json
for `--model small --batches 8`); `--out` overrides. The JSON starts with a "provenance" block.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from common import (
    RESULTS_DIR,
    cache_speedup_bound,
    forward_flops,
    load_average,
    machine_info,
    median,
    per_token_flops,
    prefill_flops,
    step_text_flops,
    timed_both,
    write_json,
)
from univigu.config import TransformerConfig
from univigu.flow.paths import MixtureTextPath
from univigu.flow.samplers import TextSamplerOptions, sample_text
from univigu.models.transformer import UniViGUTransformer

EOS_ID = 2
CONDITION_LENGTH = 24  # the ShapesWorld presets' prompt length
# Two model sizes, each with its text canvas and, per video:text ratio, a latent (C, F, H, W)
# (patch 1x2x2 gives F * H/2 * W/2 video tokens):
#   tiny: 4 x 32 heads, 4 layers, 1000 words, 16 text tokens (the first measured; a step is a few
#         hundred small ops);
#   small: the backbone benchmarks' small config (4 x 64 heads, 6 layers, FFN 1024) with the
#         untrimmed 30522-word WordPiece vocabulary of the project's tokenizer and 32 text tokens,
#         where reading out a text token costs as a real vocabulary makes it cost;
#   wide: the small setup's text canvas and vocabulary on two blocks of Wan2.1-T2V-1.3B's width
#         (12 x 128 heads, FFN 8960), where a step's GEMMs are large enough that per-op cost fades.
SETUPS = {
    "tiny": (dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=4, in_channels=16,
                  out_channels=16, text_dim=384, vocab_size=1000, text_length=16, attention_policy="clean_isolated"),
             {8: (16, 2, 16, 16), 32: (16, 8, 16, 16), 128: (16, 8, 32, 32)}),
    "small": (dict(num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=6, in_channels=16,
                   out_channels=16, text_dim=384, vocab_size=30522, text_length=32, attention_policy="clean_isolated"),
              {8: (16, 4, 16, 16), 32: (16, 4, 32, 32), 128: (16, 16, 32, 32)}),
    "wide": (dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=2, in_channels=16,
                  out_channels=16, text_dim=384, vocab_size=30522, text_length=32, attention_policy="clean_isolated"),
             {8: (16, 4, 16, 16), 32: (16, 4, 32, 32), 128: (16, 16, 32, 32)}),
}
RATIOS = (8, 32, 128)


def build_model(fields: dict, seed: int = 0) -> UniViGUTransformer:
    """A random model whose every weight is non-zero (the zero-initialised heads would make every
    logit 0 and the comparison of the two paths empty)."""
    model = UniViGUTransformer(TransformerConfig(**fields)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        head = model.text_stream.proj_out.weight  # peaked posteriors: confidence order matters
        head.copy_(torch.randn(head.shape, generator=gen) * 3.0 / head.shape[1] ** 0.5)
    return model


def make_inputs(latent, batch: int, text_dim: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, *latent, generator=gen)
    condition = torch.randn(batch, CONDITION_LENGTH, text_dim, generator=gen)
    return video, condition


def caption(model, video, condition, path, steps, use_cache, seeds):
    options = TextSamplerOptions(steps=steps, sampler="confidence", use_cache=use_cache)
    return sample_text(model, video, condition, path, model.config.text_length, eos_id=EOS_ID, options=options,
                       seeds=seeds)


def component_times(model, video, condition, steps, repeats, clock: int):
    """Median seconds (clock 0: wall, 1: process CPU) of the model calls alone: prefill, one
    step_text, one joint forward; and the largest logit difference of step_text against forward."""
    batch = video.shape[0]
    cfg = model.config
    text = torch.randint(0, cfg.vocab_size + 1, (batch, cfg.text_length), generator=torch.Generator().manual_seed(2))
    t_text = torch.full((batch,), 500.0)
    t_video = torch.zeros(batch)
    cache = model.prefill(clean="video", video=video, condition=condition)
    out = {"prefill_s": [], "step_text_s": [], "forward_s": []}
    for _ in range(repeats):
        out["prefill_s"].append(timed_both(lambda: model.prefill(clean="video", video=video,
                                                                   condition=condition))[clock])
        out["step_text_s"].append(median([timed_both(lambda: model.step_text(text, t_text, cache))[clock]
                                          for _ in range(steps)]))
        out["forward_s"].append(timed_both(lambda: model(video, text, t_video, t_text, condition))[clock])
    cached_logits = model.step_text(text, t_text, cache)
    joint_logits = model(video, text, t_video, t_text, condition)[1]
    diff = float((cached_logits - joint_logits).abs().max())
    return {k: median(v) for k, v in out.items()}, diff


def bench_case(setup: str, ratio: int, steps: int, batch: int, warmup: int, repeats: int, with_full: bool) -> dict:
    fields, cases = SETUPS[setup]
    latent = cases[ratio]
    model = build_model(fields)
    full_model = None
    if with_full:  # same weights, published attention (no isolation mask, no cache)
        full_model = UniViGUTransformer(replace(model.config, attention_policy="full")).eval()
        full_model.load_state_dict(model.state_dict())
    video, condition = make_inputs(latent, batch, fields["text_dim"])
    n_video = model.patch_embedding(video[:1]).flatten(2).shape[2]
    n_text = fields["text_length"]
    path = MixtureTextPath(vocab_size=fields["vocab_size"], source="mask", special_ids=(0, 1, EOS_ID))
    seeds = list(range(batch))
    runs = {"cached": lambda: caption(model, video, condition, path, steps, True, seeds),
            "recompute": lambda: caption(model, video, condition, path, steps, False, seeds)}
    if full_model is not None:
        runs["recompute_full_policy"] = lambda: caption(full_model, video, condition, path, steps, False, seeds)

    # Both clocks: wall, and this process's CPU time (with one thread, immune to preemption by the
    # other processes of a shared machine; the primary clock then).
    times = {clock: {name: [] for name in runs} for clock in ("wall", "cpu")}
    tokens = {}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in runs.values():
                fn()
        for rep in range(repeats):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))  # load drift hits all paths
            for name in order:
                out = {}
                wall, cpu = timed_both(lambda: out.setdefault("sample", runs[name]()))
                times["wall"][name].append(wall)
                times["cpu"][name].append(cpu)
                if name != "recompute_full_policy":
                    sample = out["sample"]
                    if name in tokens and not torch.equal(tokens[name], sample.tokens):
                        raise AssertionError(f"{name}: the same seeds gave different tokens")
                    tokens[name] = sample.tokens
        identical = torch.equal(tokens["cached"], tokens["recompute"])
        if not identical:
            raise AssertionError(f"ratio {ratio}: cached and recomputed captions differ under clean_isolated")
        primary = "cpu" if torch.get_num_threads() == 1 else "wall"
        components, logit_diff = component_times(model, video, condition, steps, 3,
                                                 clock=1 if primary == "cpu" else 0)

    cfg = model.config
    keys = n_video + n_text
    f_v = per_token_flops(cfg, "video", keys, CONDITION_LENGTH)
    f_t = per_token_flops(cfg, "text", keys, CONDITION_LENGTH)
    bound = cache_speedup_bound(steps, n_video, n_text, f_v, f_t)
    recompute_flops = steps * forward_flops(cfg, batch, n_video, n_text, CONDITION_LENGTH)
    cached_flops = (prefill_flops(cfg, batch, n_video, CONDITION_LENGTH)
                    + steps * step_text_flops(cfg, batch, n_text, n_video, CONDITION_LENGTH))
    medians = {clock: {name: median(ts) for name, ts in t.items()} for clock, t in times.items()}
    med = medians[primary]
    speedup = med["recompute"] / med["cached"]
    # Where the cached path's time goes: prefill, S model steps, and the sampler's own work.
    sampler_overhead = (med["cached"] - components["prefill_s"] - steps * components["step_text_s"]) / steps
    row = {
        "ratio": ratio, "video_tokens": n_video, "text_tokens": n_text, "steps": steps, "batch": batch,
        "latent": list(latent), "f_video": f_v, "f_text": f_t,
        "clock": primary,
        "bound": bound,
        "speedup": speedup,
        "fraction_of_bound": speedup / bound,
        "speedup_wall_clock": medians["wall"]["recompute"] / medians["wall"]["cached"],
        "analytic_flop_ratio": recompute_flops / cached_flops,
        "speedup_vs_full_policy": med["recompute_full_policy"] / med["cached"] if with_full else None,
        "identical_tokens": identical,
        "max_abs_logit_diff_step_vs_forward": logit_diff,
        "cached_s": med["cached"], "recompute_s": med["recompute"],
        "recompute_full_policy_s": med.get("recompute_full_policy"),
        "caption_tokens_per_s": {name: batch * n_text / t for name, t in med.items()},
        "model_gflop_per_s": {"cached": cached_flops / med["cached"] / 1e9,
                              "recompute": recompute_flops / med["recompute"] / 1e9},
        "components_s": {**components, "sampler_overhead_per_step_s": sampler_overhead},
        "all_s": times,
    }
    print(f"ratio {ratio:4d} (N={n_video}, L={n_text}, S={steps}, B={batch}): cached {med['cached']:.3f} s  "
          f"recompute {med['recompute']:.3f} s  speed-up {speedup:.2f}x  bound {bound:.2f}x  "
          f"({100 * speedup / bound:.0f}% of bound)  identical={identical}", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(SETUPS), default="tiny",
                        help="tiny: 4 x 32 heads, 4 layers, 1000 words, 16 text tokens; small: 4 x 64 heads, "
                             "6 layers, 30522 words, 32 text tokens; wide: two Wan2.1-1.3B-shaped blocks "
                             "(12 x 128 heads, FFN 8960), 30522 words, 32 text tokens")
    parser.add_argument("--ratios", nargs="+", type=int, default=list(RATIOS), choices=RATIOS)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8],
                        help="videos captioned at once: 1 = latency, 8 = throughput")
    parser.add_argument("--quick", action="store_true", help="5 timed repetitions, 1 warm-up")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--full-policy-batches", nargs="*", type=int, default=[1],
                        help="batches at which the uncached path is also timed under the 'full' policy")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/caption_cache[_<model>][_batch<B>].json")
    args = parser.parse_args(argv)
    if args.out is None:
        name = "caption_cache" + ("" if args.model == "tiny" else f"_{args.model}")
        if len(args.batches) == 1 and args.batches[0] != 1:
            name += f"_batch{args.batches[0]}"
        args.out = str(RESULTS_DIR / f"{name}.json")
    repeats = args.repeats or (5 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if repeats < 5:
        parser.error("--repeats must be >= 5 (the median of fewer says little)")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    rows = [bench_case(args.model, r, args.steps, b, warmup, repeats, b in args.full_policy_batches)
            for b in args.batches for r in args.ratios]
    payload = {
        "benchmark": "caption_cache",
        "description": "V2T with the clean-video cache vs recomputing the joint sequence every step, "
                       "same sampler, steps and seeds, clean_isolated policy; fp32",
        "target": "speedup >= 0.8 * bound at video:text ratios 8, 32, 128",
        "model": {"setup": args.model, **SETUPS[args.model][0], "condition_length": CONDITION_LENGTH},
        "sampler": {"sampler": "confidence", "steps": args.steps, "temperature": 1.0, "source": "mask"},
        "repeats": repeats, "warmup": warmup,
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "note": "measured on a shared, loaded machine (see the load averages); with one torch thread "
                "the times are process CPU time (immune to preemption; wall-clock ratios beside them), "
                "and ratios measured in the same run (paths alternated) are the valid figures, "
                "absolute times are not",
        "results": rows,
    }
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
