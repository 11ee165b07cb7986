"""Loading the published Uni-ViGU checkpoint.

The key names and shapes below are written from docs/PUBLISHED_CHECKPOINT.md (not from our
loader), and `reference_forward` re-implements the published block semantics of its section 3 with
plain torch ops on the published-named state dict, so agreement with our model is evidence that the
renaming and the config quirks (full attention, rotate-half text RoPE, text head eps) are right.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_ordered, network_terms

from univigu.config import ExperimentConfig, from_dict, to_dict
from univigu.models.published import PublishedCheckpointError, load_published_univigu

D, HEADS, FFN, C, TEXT_DIM, FREQ, LAYERS, V, L = 32, 2, 48, 4, 12, 16, 2, 30, 7
PATCH = (1, 2, 2)
EPS = 1e-6


def _lin(name, out_dim, in_dim):
    return {f"{name}.weight": (out_dim, in_dim), f"{name}.bias": (out_dim,)}


def published_shapes(masked: bool = False) -> dict[str, tuple]:
    """Key names and shapes of the released WanUnifiedTransformer (docs/PUBLISHED_CHECKPOINT.md)."""
    rows = V + int(masked)
    shapes = {"vocab_embed.weight": (rows, D),
              "patch_embedding.weight": (D, C, *PATCH), "patch_embedding.bias": (D,),
              "scale_shift_table_v": (1, 2, D), "scale_shift_table_t": (1, 2, D),
              "text_head.norm_final.weight": (D,)}
    for stream in ("v", "t"):
        shapes |= _lin(f"time_embedding_{stream}.time_embedder.linear_1", D, FREQ)
        shapes |= _lin(f"time_embedding_{stream}.time_embedder.linear_2", D, D)
        shapes |= _lin(f"time_embedding_{stream}.time_proj", 6 * D, D)
    shapes |= _lin("cond_text_embedder.linear_1", D, TEXT_DIM) | _lin("cond_text_embedder.linear_2", D, D)
    shapes |= _lin("video_head.proj_out", C * math.prod(PATCH), D) | _lin("text_head.linear", rows, D)
    for n in range(LAYERS):
        b = f"blocks.{n}"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                shapes |= _lin(f"{b}.{attn}.{proj}", D, D)
            shapes |= {f"{b}.{attn}.norm_q.weight": (D,), f"{b}.{attn}.norm_k.weight": (D,)}
        shapes |= {f"{b}.norm2.weight": (D,), f"{b}.norm2.bias": (D,), f"{b}.scale_shift_table": (1, 6, D)}
        for ffn in ("ffn", "ffn_t"):
            shapes |= _lin(f"{b}.{ffn}.net.0.proj", FFN, D) | _lin(f"{b}.{ffn}.net.2", D, FFN)
    return shapes


def random_state(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(shapes.items()):
        base = 1.0 if key.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight", "norm_final.weight")) else 0.0
        state[key] = base + 0.1 * torch.randn(shape, generator=g)
    return state


# --------------------------------------------------------------------------------- reference forward
def _linear(P, name, x):
    return x @ P[f"{name}.weight"].T + P[f"{name}.bias"]


def _rms(x, w):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS) * w


def _layer_norm(x, eps=EPS, weight=None, bias=None):
    mu = x.mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt((x - mu).square().mean(-1, keepdim=True) + eps)
    return y * (weight if weight is not None else 1) + (bias if bias is not None else 0)


def _sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = t.double()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], -1)  # flip_sin_to_cos=True


def _video_rope(x, grid):
    """Wan's 3D RoPE in its original complex form: channel pairs (2i, 2i+1) times e^{i pos w}."""
    f, h, w = grid
    d = x.shape[-1]
    c = d // 2
    sizes = [c - 2 * (c // 3), c // 3, c // 3]
    parts = []
    for n, size, (ff, hh, ww) in zip((f, h, w), sizes, [(f, 1, 1), (1, h, 1), (1, 1, w)]):
        axis_dim = 2 * size
        freqs = 1.0 / 10000 ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
        pos = torch.arange(n, dtype=torch.float64)
        ang = torch.polar(torch.ones(n, size, dtype=torch.float64), pos[:, None] * freqs[None])
        parts.append(ang.view(ff, hh, ww, size).expand(f, h, w, size))
    rot = torch.cat(parts, -1).reshape(f * h * w, 1, c)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], c, 2))
    return torch.view_as_real(xc * rot).flatten(-2)


def _text_rope(x):
    """SEDD-style rotary: rotate-half pairs (i, i + d/2), theta 10000, positions 0..L-1."""
    n, d = x.shape[1], x.shape[-1]
    freqs = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None]
    ang = torch.cat([ang, ang], -1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotated = torch.cat([-x2, x1], -1)
    return x * ang.cos() + rotated * ang.sin()


def _attention(q, k, v):
    """[B, S, H, d] softmax attention."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)


def reference_forward(P, video, text, t_video, t_text, condition):
    """The published unified forward (docs/PUBLISHED_CHECKPOINT.md) on published key names, in float64 so that
    the comparison measures only our fp32 rounding."""
    P = {k: v.double() for k, v in P.items()}
    video, condition = video.double(), condition.double()
    B = video.shape[0]
    x = F.conv3d(video, P["patch_embedding.weight"], P["patch_embedding.bias"], stride=PATCH)
    grid = tuple(x.shape[2:])
    hv = x.flatten(2).transpose(1, 2)
    ht = P["vocab_embed.weight"][text]
    nv = hv.shape[1]
    ctx = _linear(P, "cond_text_embedder.linear_2",
                  F.gelu(_linear(P, "cond_text_embedder.linear_1", condition), approximate="tanh"))

    def time(stream, t):
        temb = _linear(P, f"time_embedding_{stream}.time_embedder.linear_2",
                       F.silu(_linear(P, f"time_embedding_{stream}.time_embedder.linear_1", _sinusoid(t, FREQ))))
        return temb, _linear(P, f"time_embedding_{stream}.time_proj", F.silu(temb)).view(B, 6, D)

    temb_v, proj_v = time("v", t_video)
    temb_t, proj_t = time("t", t_text)
    for n in range(LAYERS):
        b = f"blocks.{n}"
        mv = (P[f"{b}.scale_shift_table"] + proj_v).chunk(6, 1)
        mt = (P[f"{b}.scale_shift_table"] + proj_t).chunk(6, 1)
        joint = _layer_norm(torch.cat([hv, ht], 1))  # one LayerNorm over [video; text]
        z = torch.cat([joint[:, :nv] * (1 + mv[1]) + mv[0], joint[:, nv:] * (1 + mt[1]) + mt[0]], 1)
        q = _rms(_linear(P, f"{b}.attn1.to_q", z), P[f"{b}.attn1.norm_q.weight"]).unflatten(-1, (HEADS, -1))
        k = _rms(_linear(P, f"{b}.attn1.to_k", z), P[f"{b}.attn1.norm_k.weight"]).unflatten(-1, (HEADS, -1))
        v = _linear(P, f"{b}.attn1.to_v", z).unflatten(-1, (HEADS, -1))
        q = torch.cat([_video_rope(q[:, :nv], grid), _text_rope(q[:, nv:])], 1)
        k = torch.cat([_video_rope(k[:, :nv], grid), _text_rope(k[:, nv:])], 1)
        a = _linear(P, f"{b}.attn1.to_out.0", _attention(q, k, v))
        hv, ht = hv + a[:, :nv] * mv[2], ht + a[:, nv:] * mt[2]
        h = torch.cat([hv, ht], 1)  # ungated cross-attention for both streams
        y = _layer_norm(h, weight=P[f"{b}.norm2.weight"], bias=P[f"{b}.norm2.bias"])
        q = _rms(_linear(P, f"{b}.attn2.to_q", y), P[f"{b}.attn2.norm_q.weight"]).unflatten(-1, (HEADS, -1))
        k = _rms(_linear(P, f"{b}.attn2.to_k", ctx), P[f"{b}.attn2.norm_k.weight"]).unflatten(-1, (HEADS, -1))
        v = _linear(P, f"{b}.attn2.to_v", ctx).unflatten(-1, (HEADS, -1))
        h = h + _linear(P, f"{b}.attn2.to_out.0", _attention(q, k, v))
        hv, ht = h[:, :nv], h[:, nv:]

        def ffn(name, x, m):
            inner = F.gelu(_linear(P, f"{b}.{name}.net.0.proj", _layer_norm(x) * (1 + m[4]) + m[3]), approximate="tanh")
            return x + _linear(P, f"{b}.{name}.net.2", inner) * m[5]

        hv, ht = ffn("ffn", hv, mv), ffn("ffn_t", ht, mt)  # routed by modality
    shift, scale = (P["scale_shift_table_v"] + temb_v[:, None]).chunk(2, 1)
    out = _linear(P, "video_head.proj_out", _layer_norm(hv) * (1 + scale) + shift)
    f, h, w = grid
    out = out.reshape(B, f, h, w, *PATCH, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    out = out.reshape(B, C, f * PATCH[0], h * PATCH[1], w * PATCH[2])
    shift, scale = (P["scale_shift_table_t"] + temb_t[:, None]).chunk(2, 1)
    logits = _linear(P, "text_head.linear",
                     _layer_norm(ht, eps=1e-5, weight=P["text_head.norm_final.weight"]) * (1 + scale) + shift)
    return out.float(), logits.float()


def inputs(seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(2, C, 2, 4, 6, generator=g)
    text = torch.randint(0, vocab, (2, L), generator=g)
    condition = torch.randn(2, 5, TEXT_DIM, generator=g)
    return video, text, torch.tensor([0.0, 730.0]), torch.tensor([1000.0, 250.0]), condition


def assert_matches_reference(model, P, vocab=V):
    video, text, t_video, t_text, condition = inputs(vocab=vocab)
    with torch.no_grad():
        velocity, logits = model(video, text, t_video, t_text, condition)
        ref_velocity, ref_logits = reference_forward(P, video, text, t_video, t_text, condition)
    assert logits.shape == (2, L, V)  # the head predicts V ids, never the mask id
    assert_close_ordered(velocity, ref_velocity, terms=network_terms(model.config))
    assert_close_ordered(logits, ref_logits[..., :V], terms=network_terms(model.config))


def wrap_prefixes(state):
    """Keys as an FSDP-wrapped, torch.compile'd training run saves them."""
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            n, rest = key.split(".", 2)[1:]
            key = f"blocks.{n}._fsdp_wrapped_module.{rest}"
        out["_orig_mod." + key] = value
    return out


# --------------------------------------------------------------------------------- tests
def test_full_checkpoint_loads_and_matches_the_reference_forward(tmp_path):
    P = random_state(published_shapes(), seed=0)
    optimizer_state = {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(5.0)}},
                       "param_groups": [{"lr": 1e-4}]}
    path = tmp_path / "uni_vigu.pth"
    torch.save({"model": wrap_prefixes(P), "step": 1234, "optimizer": optimizer_state}, path)
    model, settings = load_published_univigu(path, num_attention_heads=HEADS, text_length=L)

    assert len(model.state_dict()) == len(P)  # every published tensor used, every parameter filled
    cfg = model.config
    assert (cfg.vocab_size, cfg.mask_token, cfg.attention_policy, cfg.text_rope, cfg.text_norm_eps) == \
        (V, False, "full", "rotate_half", 1e-5)
    assert (cfg.num_layers, cfg.inner_dim, cfg.ffn_dim, cfg.text_ffn_dim, cfg.in_channels) == (LAYERS, D, FFN, None, C)
    assert_matches_reference(model, P)

    assert settings["checkpoint"]["step"] == 1234
    assert settings["codec"]["normalize"] is False and settings["prompt_encoder"]["null_condition"] == "zeros"
    assert settings["flow"]["text_source"] == "uniform"
    sections = {k: v for k, v in settings.items() if k != "checkpoint"}
    merged = to_dict(ExperimentConfig())
    for name, values in sections.items():
        merged[name].update(values)
    experiment = from_dict(ExperimentConfig, merged)  # the settings are valid config values
    assert experiment.codec.normalize is False and experiment.prompt_encoder.null_condition == "zeros"


def test_safetensors_checkpoint_loads_identically(tmp_path):
    from safetensors.torch import save_file

    P = random_state(published_shapes(), seed=1)
    torch.save({"model": P}, tmp_path / "a.pth")
    save_file(wrap_prefixes(P), str(tmp_path / "a.safetensors"))
    a, _ = load_published_univigu(tmp_path / "a.pth", num_attention_heads=HEADS, text_length=L)
    b, _ = load_published_univigu(tmp_path / "a.safetensors", num_attention_heads=HEADS, text_length=L)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mask_source_checkpoint_drops_the_mask_logit(tmp_path):
    P = random_state(published_shapes(masked=True), seed=2)
    torch.save({"model": P}, tmp_path / "masked.pth")
    model, settings = load_published_univigu(tmp_path / "masked.pth", masked=True, num_attention_heads=HEADS,
                                             text_length=L)
    assert model.config.mask_token and model.config.vocab_size == V
    assert settings["flow"]["text_source"] == "mask"
    assert_matches_reference(model, P, vocab=V + 1)  # inputs include the mask id V


# Diffusers Wan names -> published names (docs/PUBLISHED_CHECKPOINT.md), for building the reference dict.
def diffusers_to_published(key: str) -> str:
    for ours, theirs in [("condition_embedder.time_embedder.", "time_embedding_v.time_embedder."),
                         ("condition_embedder.time_proj.", "time_embedding_v.time_proj."),
                         ("condition_embedder.text_embedder.", "cond_text_embedder."),
                         ("proj_out.", "video_head.proj_out.")]:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return "scale_shift_table_v" if key == "scale_shift_table" else key


@pytest.fixture(scope="module")
def wan_base(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    wan = diffusers.WanTransformer3DModel(
        patch_size=PATCH, num_attention_heads=HEADS, attention_head_dim=D // HEADS, in_channels=C,
        out_channels=C, text_dim=TEXT_DIM, freq_dim=FREQ, ffn_dim=FFN, num_layers=LAYERS, eps=EPS,
        rope_max_seq_len=64)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(wan.named_parameters()):
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("wan")  # laid out like a diffusers Wan pipeline directory
    wan.save_pretrained(root / "transformer")
    return root, {k: v.detach().clone() for k, v in wan.state_dict().items()}


@pytest.mark.parametrize("omit_text_copies", [False, True])
def test_partial_checkpoint_loads_as_a_delta_over_a_wan_base(tmp_path, wan_base, omit_text_copies):
    directory, base = wan_base
    P = random_state(published_shapes(), seed=3)
    # A delta without the untouched video-only parts: patch embedding, video timestep embedding,
    # prompt projection, video FFNs, video head.
    untouched = ("patch_embedding.", "time_embedding_v.", "cond_text_embedder.", "video_head.", "scale_shift_table_v")
    delta = {k: v for k, v in P.items() if not k.startswith(untouched) and ".ffn." not in k}
    copies = {}
    if omit_text_copies:  # the text parts the released code created as copies of Wan's and never trained
        copies = {k: v for k, v in delta.items()
                  if k.startswith(("time_embedding_t.", "scale_shift_table_t")) or ".ffn_t." in k}
        delta = {k: v for k, v in delta.items() if k not in copies}
    torch.save({"model": wrap_prefixes(delta), "step": 9}, tmp_path / "delta.pth")

    with pytest.raises(PublishedCheckpointError, match="wan_base_dir"):
        load_published_univigu(tmp_path / "delta.pth", num_attention_heads=HEADS, text_length=L)
    model, settings = load_published_univigu(tmp_path / "delta.pth", wan_base_dir=directory, text_length=L)

    # The reference: the delta's tensors, Wan's for what it lacks, Wan's originals for the text copies.
    expected = {diffusers_to_published(k): v for k, v in base.items()}
    expected.update(delta)
    for key in copies:
        source = key.replace("time_embedding_t.", "time_embedding_v.").replace("_table_t", "_table_v")
        expected[key] = expected[source.replace(".ffn_t.", ".ffn.")]
    assert expected.keys() == P.keys()
    assert_matches_reference(model, expected)
    assert model.config.num_attention_heads == HEADS  # taken from the base's config.json
    from_base = set(settings["checkpoint"]["from_base"])
    assert from_base == {k for k in base if diffusers_to_published(k) not in delta}
    assert len(settings["checkpoint"]["filled_from_wan_copies"]) == len(copies)
    # filled text parts are copies, not aliases of the video weights
    assert model.blocks[0].text_ffn.net[2].weight.data_ptr() != model.blocks[0].ffn.net[2].weight.data_ptr()


def test_a_diffusers_wan_unifies_with_its_video_output_unchanged(wan_base):
    # The other entry point: a Wan video model grown into a unified one (convert + unify). With no
    # text its velocity must be diffusers' own WanTransformer3DModel output.
    from diffusers import WanTransformer3DModel

    from univigu.models.convert import load_diffusers_wan
    from univigu.models.unify import unify_video_model

    directory = wan_base[0] / "transformer"
    model = unify_video_model(load_diffusers_wan(directory), V, L)
    wan = WanTransformer3DModel.from_pretrained(directory)
    video, text, t_video, _, condition = inputs()
    with torch.no_grad():
        expected = wan(video, t_video, condition, return_dict=False)[0]
        velocity, logits = model(video, text[:, :0], t_video, None, condition)
    assert logits is None
    assert_close_ordered(velocity, expected, terms=network_terms(model.config))


PAYLOAD_RUNS: list[str] = []


def _payload(message):
    PAYLOAD_RUNS.append(message)
    return message


class CodeRunningObject:
    def __reduce__(self):
        return _payload, ("pickle ran code",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": random_state(published_shapes(), seed=4), "extra": CodeRunningObject()}, path)
    torch.load(path, weights_only=False)  # control: unpickling this file does run the payload
    assert PAYLOAD_RUNS == ["pickle ran code"]
    PAYLOAD_RUNS.clear()
    with pytest.raises(PublishedCheckpointError, match="(?s)refusing to load.*safetensors"):
        load_published_univigu(path, num_attention_heads=HEADS, text_length=L)
    assert PAYLOAD_RUNS == []


def test_checkpoints_that_do_not_fit_are_refused_clearly(tmp_path):
    P = random_state(published_shapes(), seed=5)
    torch.save({"model": {**P, "vision_tower.weight": torch.zeros(3)}}, tmp_path / "unknown.pth")
    with pytest.raises(PublishedCheckpointError, match="vision_tower.weight"):
        load_published_univigu(tmp_path / "unknown.pth", num_attention_heads=HEADS, text_length=L)
    bad = dict(P)
    bad["blocks.1.ffn_t.net.2.weight"] = torch.zeros(D, FFN + 1)
    torch.save({"model": bad}, tmp_path / "shape.pth")
    with pytest.raises(PublishedCheckpointError, match=r"shape mismatch.*blocks\.1\.ffn_t\.net\.2\.weight"):
        load_published_univigu(tmp_path / "shape.pth", num_attention_heads=HEADS, text_length=L)
    torch.save({"model": {**P, "text_head.linear.weight": torch.zeros(V + 1, D)}}, tmp_path / "rows.pth")
    with pytest.raises(PublishedCheckpointError, match="check the `masked` option"):
        load_published_univigu(tmp_path / "rows.pth", num_attention_heads=HEADS, text_length=L)
    with pytest.raises(PublishedCheckpointError, match="does not exist"):
        load_published_univigu(tmp_path / "missing.pth")
