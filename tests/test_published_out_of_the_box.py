"""The published Uni-ViGU checkpoint as a user has it, converted and run with no extra flags.

The fixture lays out what the release needs, tiny and random: a diffusers Wan2.1 pipeline folder
(transformer/, vae/, text_encoder/, tokenizer/) whose tokenizer is T5's kind (SentencePiece
pieces, no BOS, sentinel tokens added after the pieces), and a `.pth` saved the way the released
training code saves it: `{"model": ..., "step": ..., "optimizer": ...}`, torch.compile prefixes,
and the text RoPE's persistent buffer `rotary_emb_text.inv_freq` (docs/PUBLISHED_CHECKPOINT.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_published_checkpoint import (HEADS, D, L, assert_matches_reference, diffusers_to_published,
                                       published_shapes, random_state, wrap_prefixes)

from univigu.cli import main
from univigu.data.video_io import read_video, write_video
from univigu.models.published import TEXT_ROPE_BUFFER, PublishedCheckpointError, load_published_univigu
from univigu.models.text import TextTokenizer, TokenizerError

WIDTH, WAN_HEADS, LAYERS, LATENT, UMT5_DIM = 32, 2, 2, 4, 32
PIECES = "▁a ▁the ▁small ▁large ▁red ▁blue ▁green ▁cir cle ▁square ▁star ▁moves ▁up ▁down ▁left ▁right ▁ ,".split()
SENTINELS = [f"<extra_id_{i}>" for i in range(4)]
PROMPT = "a small red circle moves left"


def inv_freq(head_dim: int, theta: float = 10000.0, dtype=torch.float32) -> torch.Tensor:
    """The released 1D rotary's buffer, written from docs/PUBLISHED_CHECKPOINT.md: 1 / theta^(2i/d)."""
    return (1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(dtype)


def t5_like_tokenizer():
    """A `tokenizers` Unigram tokenizer laid out like UMT5's tokenizer.json: <pad>=0, </s>=1,
    <unk>=2, "▁"-marked pieces, `$A </s>` post-processing, sentinels added after the pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - 0.1 * i) for i, p in enumerate(PIECES)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"] + SENTINELS)
    return tok


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("release")
    wan_dir = root / "Wan2.1-T2V-1.3B-Diffusers"
    tok = t5_like_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            additional_special_tokens=SENTINELS).save_pretrained(str(wan_dir / "tokenizer"))
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=tok.get_vocab_size(), d_model=UMT5_DIM, d_kv=8, d_ff=64, num_layers=1,
                                num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
                     ).save_pretrained(str(wan_dir / "text_encoder"))
    AutoencoderKLWan(base_dim=3, z_dim=LATENT, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(str(wan_dir / "vae"))
    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=WAN_HEADS,
                                attention_head_dim=WIDTH // WAN_HEADS, in_channels=LATENT, out_channels=LATENT,
                                text_dim=UMT5_DIM, freq_dim=16, ffn_dim=48, num_layers=LAYERS, rope_max_seq_len=64)
    wan.save_pretrained(str(wan_dir / "transformer"))
    (wan_dir / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))

    # The released model's vocabulary is the SentencePiece pieces, without the sentinels.
    vocab = 3 + len(PIECES)
    g = torch.Generator().manual_seed(1)
    state = {diffusers_to_published(k): v.detach().clone() for k, v in wan.state_dict().items()}
    for key in list(state):
        if key.startswith("time_embedding_v.") or ".ffn." in key:
            copy = key.replace("time_embedding_v.", "time_embedding_t.").replace(".ffn.", ".ffn_t.")
            state[copy] = state[key] + 0.01 * torch.randn(state[key].shape, generator=g)
    state |= {"scale_shift_table_t": state["scale_shift_table_v"].clone(),
              "vocab_embed.weight": torch.randn(vocab, WIDTH, generator=g),
              "text_head.norm_final.weight": torch.ones(WIDTH),
              "text_head.linear.weight": 0.1 * torch.randn(vocab, WIDTH, generator=g),
              "text_head.linear.bias": torch.zeros(vocab),
              TEXT_ROPE_BUFFER: inv_freq(WIDTH // WAN_HEADS)}
    checkpoint = root / "step-00068000.pth"
    torch.save({"model": {"_orig_mod." + k: v for k, v in state.items()}, "step": 68000,
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5}]}}, checkpoint)
    return wan_dir, checkpoint, state, vocab


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------
# The whole path: convert, then every task
# --------------------------------------------------------------------------------------------


def test_the_released_checkpoint_converts_and_runs_every_task_with_its_defaults(release, tmp_path, monkeypatch,
                                                                                 capsys):
    wan_dir, checkpoint, state, vocab = release
    out = tmp_path / "uni-vigu"
    # Only the stored video size and step count are made small (the released 832x480x81 at 50
    # steps is a GPU job); everything else is what convert picks for the published model.
    code, stdout, err = run(capsys, "convert", "--univigu_checkpoint", checkpoint, "--wan_base", wan_dir,
                            "--out", out, "--size", "32*32", "--frame_num", 5, "--sample_steps", 2)
    assert code == 0, err
    assert "unified" in stdout

    from univigu.models.transformer import UniViGUTransformer

    model = UniViGUTransformer.from_pretrained(out / "transformer")
    assert (model.config.num_attention_heads, model.config.text_rope_theta) == (WAN_HEADS, 10000.0)
    assert torch.equal(model.state_dict()["text_stream.token_embedding.weight"], state["vocab_embed.weight"])
    # The released inference's samplers: Euler video steps on a shift-3 grid, guidance 5, and the
    # discrete Euler solver for uniform-source text.
    sampler = json.loads((out / "sampler.json").read_text())
    assert {k: sampler[k] for k in ("video_solver", "shift", "guidance_scale", "text_sampler", "text_steps")} == \
        {"video_solver": "euler", "shift": 3.0, "guidance_scale": 5.0, "text_sampler": "euler", "text_steps": 50}
    # The text stream keeps the checkpoint's vocabulary: the sentinels past it are left out.
    tokenizer = TextTokenizer.load(out / "tokenizer")
    assert tokenizer.vocab_size == vocab and tokenizer.bos_id is None

    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(capsys, "generate", "--prompt", PROMPT, "--ckpt_dir", out, "--with_caption",
                            "--no-progress")
    assert code == 0, err
    video = tmp_path / stdout.splitlines()[0].removeprefix("video: ")
    assert read_video(video).shape == (5, 32, 32, 3)
    captions = [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("caption: ")]

    clip = tmp_path / "clip.mp4"
    write_video(clip, np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    code, stdout, err = run(capsys, "caption", clip, "--ckpt_dir", out, "--no-progress")
    assert code == 0, err
    captions.append(stdout.strip())

    code, stdout, err = run(capsys, "joint", "--prompt", PROMPT, "--ckpt_dir", out, "--no-progress")
    assert code == 0, err
    captions += [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("caption: ")]
    assert len(captions) == 3
    for caption in captions:  # SentencePiece pieces rejoined into words, not shown as "▁the ▁cir cle"
        assert "▁" not in caption and caption == caption.strip()


def test_a_tokenizer_with_ordinary_words_past_the_checkpoint_vocabulary_is_one_clear_error(release, tmp_path,
                                                                                             capsys):
    wan_dir, checkpoint, _, vocab = release
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(wan_dir / "tokenizer" / "tokenizer.json"))
    tok.add_tokens(["zebra"])  # an ordinary word the checkpoint's embedding has no row for
    tok.save(str(tmp_path / "tokenizer.json"))
    code, _, err = run(capsys, "convert", "--univigu_checkpoint", checkpoint, "--wan_base", wan_dir,
                       "--tokenizer", tmp_path / "tokenizer.json", "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "zebra" in lines[0] and f"only {vocab}" in lines[0]


def test_a_wrong_rope_buffer_stops_convert_with_one_line(release, tmp_path, capsys):
    wan_dir, _, state, _ = release
    wrong = {**state, TEXT_ROPE_BUFFER: inv_freq(WIDTH // WAN_HEADS)[:-1]}  # one frequency short
    torch.save({"model": wrong, "step": 1}, tmp_path / "wrong.pth")
    code, _, err = run(capsys, "convert", "--univigu_checkpoint", tmp_path / "wrong.pth", "--wan_base", wan_dir,
                       "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ")
    assert TEXT_ROPE_BUFFER in lines[0] and "[7]" in lines[0] and "head dim 16" in lines[0]


# --------------------------------------------------------------------------------------------
# The text RoPE buffer
# --------------------------------------------------------------------------------------------


def test_the_rope_buffer_is_accepted_and_the_forward_still_matches_the_reference(tmp_path):
    P = random_state(published_shapes(), seed=11)
    path = tmp_path / "with_buffer.pth"
    torch.save({"model": wrap_prefixes({**P, TEXT_ROPE_BUFFER: inv_freq(D // HEADS)}), "step": 3}, path)
    # No num_attention_heads: width 32 is no multiple of Wan's 128-wide heads, so only the
    # buffer's 8 frequencies (head dim 16) can tell the head count.
    model, settings = load_published_univigu(path, text_length=L)
    assert model.config.num_attention_heads == HEADS and model.config.text_rope_theta == 10000.0
    assert settings["checkpoint"]["text_rope_buffer"] is True
    assert len(model.state_dict()) == len(P)  # the buffer is not a parameter of ours
    assert_matches_reference(model, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rope_base_is_read_from_the_buffer_at_its_own_precision(tmp_path, dtype):
    P = random_state(published_shapes(), seed=12)
    for theta in (10000.0, 500000.0):
        path = tmp_path / f"theta{theta:g}.pth"
        torch.save({"model": {**P, TEXT_ROPE_BUFFER: inv_freq(D // HEADS, theta, dtype)}}, path)
        model, _ = load_published_univigu(path, text_length=L)
        assert model.config.text_rope_theta == pytest.approx(theta, rel=1e-3 if dtype == torch.bfloat16 else 1e-6)


def test_a_rope_buffer_that_does_not_fit_is_refused_clearly(tmp_path):
    P = random_state(published_shapes(), seed=13)
    torch.save({"model": {**P, TEXT_ROPE_BUFFER: inv_freq(D // HEADS)}}, tmp_path / "a.pth")
    with pytest.raises(PublishedCheckpointError, match=r"inv_freq has shape \[8\].*head dim 8 has \[4\]"):
        load_published_univigu(tmp_path / "a.pth", num_attention_heads=4, text_length=L)
    scrambled = inv_freq(D // HEADS)[torch.tensor([0, 3, 1, 2, 4, 5, 7, 6])]
    torch.save({"model": {**P, TEXT_ROPE_BUFFER: scrambled}}, tmp_path / "b.pth")
    with pytest.raises(PublishedCheckpointError, match="not 1 / theta"):
        load_published_univigu(tmp_path / "b.pth", text_length=L)


# --------------------------------------------------------------------------------------------
# T5's tokenizer as the text stream's
# --------------------------------------------------------------------------------------------


def test_a_t5_tokenizer_needs_no_bos_and_decodes_its_pieces_to_text(tmp_path):
    tok = t5_like_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    t5 = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    assert (t5.pad_id, t5.eos_id, t5.bos_id) == (0, 1, None)
    text = "a small red circle moves left, the blue square"
    canvas = t5.encode([text], length=24)
    assert "▁cir" in [tok.id_to_token(int(i)) for i in canvas[0]]  # a word split into pieces
    assert t5.decode(canvas) == [text]
    with pytest.raises(TokenizerError, match="add_bos needs a BOS token"):
        TextTokenizer(tok, pad_token="<pad>", bos_token=None, eos_token="</s>", unk_token="<unk>", add_bos=True)


def test_the_tokenizer_can_stop_before_its_added_sentinels(tmp_path):
    t5 = TextTokenizer.from_file(_saved(t5_like_tokenizer(), tmp_path))
    pieces = 3 + len(PIECES)
    assert t5.vocab_size == pieces + len(SENTINELS)
    limited = t5.with_vocab_size(pieces)
    assert limited.vocab_size == pieces and max(limited.special_ids) < pieces
    text = "the large green star moves down"
    assert limited.decode(limited.encode([text], 16)) == [text]
    with pytest.raises(TokenizerError, match="past the model's"):
        limited.encode([f"a {SENTINELS[0]}"], 16)
    with pytest.raises(TokenizerError, match="would drop ordinary tokens"):
        t5.with_vocab_size(pieces - 1)
    limited.save(tmp_path / "saved")
    reloaded = TextTokenizer.load(tmp_path / "saved")
    assert (reloaded.vocab_size, reloaded.bos_id, reloaded.special_ids) == (pieces, None, limited.special_ids)


def _saved(tok, directory):
    path = directory / "t5.json"
    tok.save(str(path))
    return path
