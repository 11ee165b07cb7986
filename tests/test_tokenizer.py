"""Text-stream tokenizer: canvases, round trips of the ShapesWorld grammar, trimmed vocabulary."""

import itertools
import re

import pytest
import torch

from univigu.config import TokenizerConfig, WorldConfig
from univigu.data import shapesworld as sw
from univigu.models.text import TextTokenizer, TokenizerError, load_text_tokenizer


def grammar_texts() -> list[str]:
    """Every ShapesWorld prompt and caption phrase: each (size, colour, shape, motion) at each of
    the 9 grid positions, every pairwise relation, plus random multi-object samples."""
    texts = []
    positions = [(x, y) for x in (4.0, 16.0, 28.0) for y in (4.0, 16.0, 28.0)]
    for size, colour, shape, motion in itertools.product(sw.SIZES, sw.COLOURS, sw.SHAPES,
                                                         sw.MOTIONS):
        for x, y in positions:
            scene = sw.Scene(objects=(sw.ObjectSpec(shape, colour, size, motion, x, y),))
            texts += [sw.prompt_text(scene), sw.caption_text(scene)]
    for (ax, ay), (bx, by) in itertools.product(positions, positions):
        if (ax, ay) != (bx, by):
            scene = sw.Scene(objects=(sw.ObjectSpec("star", "cyan", "small", "up", ax, ay),
                                      sw.ObjectSpec("circle", "white", "large", "still", bx, by)))
            texts += [sw.prompt_text(scene), sw.caption_text(scene)]
    for objects in (1, 3):
        world = WorldConfig(min_objects=1, max_objects=objects)
        for s in sw.make_samples(200, seed=objects, world=world):
            texts += [s.prompt, s.caption]
    return list(dict.fromkeys(texts))


TEXTS = grammar_texts()


def reference_words(text: str) -> list[str]:
    """Independent split: lowercase words and single punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


@pytest.fixture(scope="module")
def trimmed():
    return TextTokenizer.train_from_corpus(TEXTS)


@pytest.fixture(scope="module")
def minilm():
    return TextTokenizer.minilm()


def test_grammar_corpus_is_complete():
    # sanity of the test corpus itself: every attribute word appears
    words = {w for t in TEXTS for w in reference_words(t)}
    assert set(sw.SHAPES) | set(sw.COLOURS) | set(sw.SIZES) <= words
    assert {"above", "below", "centre", "background", "."} <= words


def test_trimmed_vocabulary_covers_the_corpus(trimmed):
    words = {w for t in TEXTS for w in reference_words(t)}
    vocab = trimmed.tokenizer.get_vocab()
    assert set(vocab) == words | {"[PAD]", "[BOS]", "[EOS]", "[UNK]"}
    assert trimmed.vocab_size == len(words) + 4 == len(vocab)
    assert sorted(vocab.values()) == list(range(trimmed.vocab_size))
    assert (trimmed.pad_id, trimmed.bos_id, trimmed.eos_id) == (0, 1, 2)
    assert trimmed.special_ids == [0, 1, 2, 3]
    assert trimmed.mask_id == trimmed.vocab_size  # not a vocabulary entry
    print(f"trimmed ShapesWorld vocabulary: {trimmed.vocab_size} ids "
          f"({len(words)} words + 4 specials) + 1 mask id")
    ids = trimmed.encode(TEXTS, length=96)
    assert not (ids == trimmed.tokenizer.token_to_id("[UNK]")).any()
    # one id per reference word, then EOS, then PAD
    for row, text in zip(ids[:50], TEXTS[:50]):
        n = len(reference_words(text))
        assert row[:n].tolist() == [trimmed.tokenizer.token_to_id(w) for w in
                                    reference_words(text)]
        assert row[n] == trimmed.eos_id and (row[n + 1:] == trimmed.pad_id).all()


@pytest.mark.parametrize("which", ["trimmed", "minilm"])
def test_every_shapesworld_text_round_trips(which, trimmed, minilm):
    tok = trimmed if which == "trimmed" else minilm
    ids = tok.encode(TEXTS, length=96)
    assert ids.shape == (len(TEXTS), 96) and ids.dtype == torch.long
    decoded = tok.decode(ids)
    mismatches = [(t, d) for t, d in zip(TEXTS, decoded) if d != t.lower()]
    assert not mismatches, mismatches[:3]


def test_minilm_tokenizer_matches_transformers(minilm):
    from transformers import AutoTokenizer

    from univigu.models.text import minilm_model_dir

    hf = AutoTokenizer.from_pretrained(str(minilm_model_dir()))
    assert minilm.vocab_size == 30522 == hf.vocab_size
    assert (minilm.pad_id, minilm.bos_id, minilm.eos_id) == (hf.pad_token_id, hf.cls_token_id,
                                                             hf.sep_token_id)
    assert set(minilm.special_ids) == set(hf.all_special_ids)
    for text in TEXTS[:40]:
        expected = hf(text, add_special_tokens=False).input_ids
        row = minilm.encode([text], length=len(expected) + 3)[0].tolist()
        assert row == expected + [hf.sep_token_id, hf.pad_token_id, hf.pad_token_id]


def test_decode_stops_at_eos_and_skips_specials(trimmed):
    t = trimmed
    red, circle, dot = (t.tokenizer.token_to_id(w) for w in ("red", "circle", "."))
    ids = torch.tensor([[t.bos_id, red, t.mask_id, circle, dot, t.eos_id, red, red, t.pad_id],
                        [red, t.pad_id, circle, t.pad_id, t.pad_id, t.pad_id, t.pad_id,
                         t.pad_id, t.pad_id]])
    assert t.decode(ids) == ["red circle.", "red circle"]
    assert t.decode(ids[0]) == ["red circle."]  # one canvas
    assert t.decode([[red, t.eos_id, circle]]) == ["red"]


def test_canvas_overflow_raises_or_truncates(trimmed):
    text = "a small red circle moves to the left"  # 8 tokens + EOS = 9
    assert trimmed.encode([text], length=9)[0, 8] == trimmed.eos_id
    with pytest.raises(TokenizerError, match="needs 9 tokens .* canvas holds 8"):
        trimmed.encode([text], length=8)
    cut = trimmed.encode([text], length=5, truncate=True)
    assert cut[0, 4] == trimmed.eos_id
    assert trimmed.decode(cut) == ["a small red circle"]


def test_bos_option_and_save_load(trimmed, tmp_path):
    with_bos = TextTokenizer.train_from_corpus(TEXTS, add_bos=True)
    ids = with_bos.encode(TEXTS[:5], length=96)
    assert (ids[:, 0] == with_bos.bos_id).all()
    assert with_bos.decode(ids) == [t.lower() for t in TEXTS[:5]]
    trimmed.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = TextTokenizer.load(tmp_path / "tok")
    assert torch.equal(loaded.encode(TEXTS, 96), trimmed.encode(TEXTS, 96))
    assert loaded.special_ids == trimmed.special_ids
    from_cfg = load_text_tokenizer(TokenizerConfig(kind="file",
                                                   path=str(tmp_path / "tok" / "tokenizer.json")))
    assert torch.equal(from_cfg.encode(TEXTS[:9], 96), trimmed.encode(TEXTS[:9], 96))
    assert load_text_tokenizer(TokenizerConfig(kind="minilm")).vocab_size == 30522
    built = load_text_tokenizer(TokenizerConfig(kind="trimmed"), corpus=TEXTS)
    assert built.tokenizer.get_vocab() == trimmed.tokenizer.get_vocab()  # deterministic


def test_tokenizer_errors(trimmed, tmp_path):
    with pytest.raises(TokenizerError, match="empty"):
        trimmed.encode([], length=8)
    with pytest.raises(TokenizerError, match="single string"):
        trimmed.encode("a red circle", length=8)
    with pytest.raises(TokenizerError, match="not found"):
        TextTokenizer.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        TextTokenizer.load(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        TextTokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(TokenizerError, match="empty corpus"):
        TextTokenizer.train_from_corpus([])
    with pytest.raises(TokenizerError, match="needs a corpus"):
        load_text_tokenizer(TokenizerConfig(kind="trimmed"))
