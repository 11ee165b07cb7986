"""The published Uni-ViGU checkpoint as the released training code saves it, with its tokenizer.

The released model registers its text RoPE's frequencies as a persistent buffer, so its
`state_dict()` carries `rotary_emb_text.inv_freq` (reference notes, section 12) beside the weights.
Its text stream uses Wan's UMT5 tokenizer: SentencePiece pieces, no BOS, sentinel tokens added
after the pieces.
"""

from __future__ import annotations

import pytest
import torch
from test_published_checkpoint import (HEADS, D, L, assert_matches_reference, published_shapes, random_state,
                                       wrap_prefixes)

from univigu.models.published import TEXT_ROPE_BUFFER, PublishedCheckpointError, load_published_univigu
from univigu.models.text import TextTokenizer, TokenizerError

PIECES = "▁a ▁the ▁small ▁large ▁red ▁blue ▁green ▁cir cle ▁square ▁star ▁moves ▁up ▁down ▁left ▁right ▁ ,".split()
SENTINELS = [f"<extra_id_{i}>" for i in range(4)]


def inv_freq(head_dim: int, theta: float = 10000.0, dtype=torch.float32) -> torch.Tensor:
    """The released 1D rotary's buffer, written from the reference notes: 1 / theta^(2i/d)."""
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
