"""Where V2T loses an object's shape: probes of a model's clean-video states, and where its text reads.

Two measurements on ShapesWorld clips of a model directory's world (one object per clip):

* `--probe` (on any model, e.g. the shipped generator): the video tokens' hidden states after the
  patch embedding and after every block, for the clean video (timestep 0, null prompt), are read
  by two small classifiers trained on `--train` clips and scored on `--test` others:
  `linear`: logistic regression on the mean- and max-pooled states (LBFGS);
  `mlp_max`: a per-token MLP (width 256), max-pooled over tokens, then linear (AdamW, batch 16,
  `--mlp_steps` steps; accuracy also reported along the way).
* `--attention` (on a unified model): the share of each block's joint self-attention that text
  queries of an all-[MASK] canvas (text timestep 1000) give to the object's video tokens, against
  the share those tokens have of the video (what uniform attention would give them).

    python benchmarks/probe_shape.py --model src/univigu/assets/generator --probe
    python benchmarks/probe_shape.py --model runs/demo/capability_refinement/model --attention
Writes benchmarks/results/probe_shape.json (one entry per model and measurement).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import RESULTS_DIR, machine_info, provenance, write_json
from univigu.data.shapesworld import SHAPES
from univigu.flow.paths import RectifiedFlowPath
from univigu.models.bundle import load_bundle
from univigu.training.data import shapesworld_set


def clips(bundle, num: int, seed: int, split: str):
    data = shapesworld_set(num, seed, bundle.world, split=split, progress=False)
    labels = torch.tensor([SHAPES.index(truth[0]["shape"]) for truth in data.truths])
    latents = data.latents(np.arange(num), bundle.codec)
    null = bundle.null_condition.reshape(1, -1, bundle.null_condition.shape[-1])
    return latents, labels, null


@torch.no_grad()
def video_states(model, latents, null, batch: int = 250, noise_level: float = 0.0,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Hidden states [N, tokens, D] of the video: after the patch embedding and each block. The video
    is clean unless `noise_level` > 0: then it is on the training path at that level (seeded noise)."""
    if noise_level > 0:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        latents = RectifiedFlowPath().sample(latents, torch.full((len(latents),), noise_level), noise=noise).noisy
    states: dict[str, list] = {}
    hooks = [model.patch_embedding.register_forward_hook(
        lambda m, i, out: states.setdefault("patch", []).append(out.flatten(2).transpose(1, 2).float()))]
    for n, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(
            lambda m, i, out, n=n: states.setdefault(f"block{n}", []).append(out[0][0].float())))
    try:
        for start in range(0, len(latents), batch):
            x = latents[start:start + batch]
            model(x, None, torch.full((len(x),), 1000.0 * noise_level), None, null.expand(len(x), -1, -1))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts) for name, parts in states.items()}


def linear_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, pools=("mean", "max")) -> float:
    feats = torch.cat([x.mean(1) if pool == "mean" else x.amax(1) for pool in pools], 1)
    feats = (feats - feats[train].mean(0)) / (feats[train].std(0) + 1e-5)
    weight = torch.zeros(feats.shape[1], len(SHAPES), requires_grad=True)
    bias = torch.zeros(len(SHAPES), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(feats[train] @ weight + bias, y[train]) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((feats[~train] @ weight + bias).argmax(1) == y[~train]).float().mean().item()


def mlp_max_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int, seed: int) -> dict[int, float]:
    x = (x - x[train].mean((0, 1))) / (x[train].std((0, 1)) + 1e-5)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x.shape[-1], 256), nn.GELU(), nn.Linear(256, 256), nn.GELU())
    head = nn.Linear(256, len(SHAPES))
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=1e-3, weight_decay=1e-2)
    rows = torch.nonzero(train)[:, 0]
    checkpoints = {s for s in (100, 250, 500, 1000, steps) if s <= steps}
    curve = {}
    for step in range(1, steps + 1):
        pick = rows[torch.randint(len(rows), (16,))]
        loss = nn.functional.cross_entropy(head(net(x[pick]).amax(1)), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in checkpoints:
            with torch.no_grad():
                curve[step] = (head(net(x[~train]).amax(1)).argmax(1) == y[~train]).float().mean().item()
    return curve


def probe(bundle, args) -> dict:
    latents, labels, null = clips(bundle, args.train + args.test, args.seed, "train")
    train = torch.arange(len(labels)) < args.train
    out = {}
    states = video_states(bundle.transformer.eval(), latents, null, noise_level=args.noise_level, seed=args.seed)
    for name, x in states.items():
        curve = mlp_max_probe(x, labels, train, args.mlp_steps, args.seed)
        out[name] = {"linear_mean_max": linear_probe(x, labels, train),
                     "linear_mean": linear_probe(x, labels, train, pools=("mean",)), "mlp_max": curve}
        print(f"{name}: linear(mean+max) {out[name]['linear_mean_max']:.3f}, "
              f"linear(mean) {out[name]['linear_mean']:.3f}, mlp+max {curve}", flush=True)
    return out


@torch.no_grad()
def attention(bundle, args) -> dict:
    model = bundle.transformer.eval()
    if not model.has_text_stream:
        raise SystemExit(f"{args.model} has no text stream: --attention needs a unified model")
    latents, _, null = clips(bundle, args.test, args.seed, "val")
    n = len(latents)
    background = latents.flatten(2).median(-1).values[:, :, None, None, None]
    occupied = ((latents - background).abs().sum(1) > 1e-2).float()[:, None]  # [N, 1, F, H, W]
    pt, ph, pw = model.config.patch_size
    on_object = nn.functional.max_pool3d(occupied, (pt, ph, pw)).flatten(1) > 0  # [N, video tokens]
    n_video = on_object.shape[1]
    weights = []
    originals = [block.attn1.attend for block in model.blocks]

    def recording(original):
        def attend(q, k, v, mask=None):
            logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
            weights.append(logits.softmax(-1))
            return original(q, k, v, mask)
        return attend

    for block, original in zip(model.blocks, originals):
        block.attn1.attend = recording(original)
    try:
        canvas = torch.full((n, model.config.text_length), model.config.vocab_size)
        model(latents, canvas, torch.zeros(n), torch.full((n,), 1000.0), null.expand(n, -1, -1))
    finally:
        for block, original in zip(model.blocks, originals):
            block.attn1.attend = original
    out = {"object_share_of_video_tokens": on_object.float().mean().item(), "blocks": []}
    for n_block, w in enumerate(weights):
        to_video = w[:, :, n_video:, :n_video]  # text queries -> video keys
        on_video = to_video.sum(-1)
        on_obj = (to_video * on_object[:, None, None, :]).sum(-1) / on_video.clamp(min=1e-9)
        row = {"mass_on_video": on_video.mean().item(), "object_share_per_head": on_obj.mean((0, 2)).tolist(),
               "max_weight_on_one_video_token": to_video.amax(-1).mean().item()}
        out["blocks"].append(row)
        print(f"block {n_block}: {json.dumps({k: np.round(v, 3).tolist() for k, v in row.items()})}", flush=True)
    print(f"object tokens are {out['object_share_of_video_tokens']:.3f} of the video tokens", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--probe", action="store_true", help="shape probes of the clean-video states")
    parser.add_argument("--attention", action="store_true", help="where text queries attend (unified model)")
    parser.add_argument("--train", type=int, default=3000, help="probe training clips")
    parser.add_argument("--test", type=int, default=1000, help="probe test clips / attention clips")
    parser.add_argument("--mlp_steps", type=int, default=1500)
    parser.add_argument("--noise_level", type=float, default=0.0,
                        help="probe the video noised to this level in [0, 1) instead of the clean one")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--result", default=str(RESULTS_DIR / "probe_shape.json"))
    args = parser.parse_args()
    if not (args.probe or args.attention):
        parser.error("choose --probe and/or --attention")
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    entry = {"settings": {k: getattr(args, k) for k in ("train", "test", "mlp_steps", "seed")}}
    if args.probe:
        entry["probe" if args.noise_level == 0 else f"probe_noise_{args.noise_level:g}"] = probe(bundle, args)
    if args.attention:
        entry["attention"] = attention(bundle, args)
    path = Path(args.result)
    results = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    results["provenance"] = entry["provenance"] = provenance()  # the file's latest invocation, and this entry's
    results["machine"] = machine_info()
    results["models"].setdefault(args.model, {}).update(entry)
    write_json(path, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
