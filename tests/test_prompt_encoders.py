"""Prompt encoders: MiniLM (offline, real weights) and UMT5 (tiny random model from a local dir)."""

import os
import subprocess
import sys

import pytest
import torch

from tolerances import assert_close_ordered
from univigu.config import PromptEncoderConfig
from univigu.models.text import (MiniLMPromptEncoder, PromptEncoderError, UMT5PromptEncoder,
                                 load_null_condition, load_prompt_encoder, minilm_model_dir,
                                 save_null_condition)

# Reduction lengths for comparing two computation orders (tests/tolerances.py): layers x FFN width.
MINILM_TERMS = 6 * 1536  # all-MiniLM-L6-v2
UMT5_TERMS = 2 * 64  # the tiny UMT5 of `umt5_dir`
PROMPTS = ["a small red circle moves to the left",
           "a large blue star stays still and a small green square moves up",
           "a small red circle moves to the left"]  # a repeat: exercises the cache


# --------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return MiniLMPromptEncoder(condition_length=16)


@pytest.fixture(scope="module")
def hf_minilm():
    """Reference: transformers' own tokenizer and model from the package directory."""
    from transformers import AutoModel, AutoTokenizer

    d = str(minilm_model_dir())
    return AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()


def test_minilm_token_states_equal_direct_transformers_call(minilm, hf_minilm):
    tok, model = hf_minilm
    prompts = PROMPTS + ["a white triangle " * 12]  # the last one is truncated to 16 tokens
    emb, mask = minilm.encode(prompts)
    assert emb.shape == (4, 16, 384) and emb.dtype == torch.float32 and minilm.embed_dim == 384
    assert mask.dtype == torch.bool
    for i, p in enumerate(prompts):
        ids = tok(p, truncation=True, max_length=16, return_tensors="pt").input_ids
        assert ids[0, 0] == tok.cls_token_id and ids[0, -1] == tok.sep_token_id
        n = ids.shape[1]
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state[0]
        assert_close_ordered(emb[i, :n], ref, terms=MINILM_TERMS)
        assert mask[i].sum() == n and mask[i, :n].all()
        assert torch.count_nonzero(emb[i, n:]) == 0  # zero-padded beyond the real tokens
    assert mask[3].all()  # truncated prompt fills the condition


def test_minilm_lexical_weight_adds_the_input_embeddings(hf_minilm):
    tok, model = hf_minilm
    encoder = load_prompt_encoder(PromptEncoderConfig(kind="minilm", condition_length=16, lexical_weight=0.5))
    assert encoder.config["lexical_weight"] == 0.5
    emb, mask = encoder.encode(PROMPTS[:2])
    for i, p in enumerate(PROMPTS[:2]):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state[0] + 0.5 * model.embeddings(input_ids=ids)[0]
        assert_close_ordered(emb[i, : ids.shape[1]], ref, terms=MINILM_TERMS)
    with pytest.raises(PromptEncoderError, match="lexical_weight is a MiniLM option"):
        load_prompt_encoder(PromptEncoderConfig(kind="umt5", path="x", lexical_weight=1.0))


def test_minilm_mean_pool_matches_sentence_transformers(minilm):
    """The states are the real all-MiniLM-L6-v2: its sentence embedding (mean over real tokens,
    L2-normalised) equals sentence-transformers' on the same package."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_model_dir()), device="cpu")
    emb, mask = minilm.encode(PROMPTS[:2])
    ref = st.encode(PROMPTS[:2], convert_to_tensor=True)
    pooled = torch.stack([emb[i, mask[i]].mean(0) for i in range(2)])
    assert_close_ordered(torch.nn.functional.normalize(pooled, dim=-1), ref.cpu(), terms=MINILM_TERMS)


def test_minilm_cache_and_batch_independence(minilm):
    emb, _ = minilm.encode(PROMPTS)
    assert torch.equal(emb[0], emb[2])  # repeated prompt
    alone, _ = MiniLMPromptEncoder(16, cache=False).encode([PROMPTS[1]])
    assert_close_ordered(alone[0], emb[1], terms=MINILM_TERMS)


def test_minilm_null_condition(tmp_path, minilm, hf_minilm):
    tok, model = hf_minilm
    null, null_mask = minilm.null_condition()
    with torch.no_grad():
        ref = model(**tok("", return_tensors="pt")).last_hidden_state[0]  # [CLS] [SEP]
    assert null.shape == (1, 16, 384) and null_mask[0].tolist() == [True] * 2 + [False] * 14
    assert_close_ordered(null[0, :2], ref, terms=MINILM_TERMS)
    assert torch.count_nonzero(null[0, 2:]) == 0
    # stored with a checkpoint and read back
    save_null_condition(minilm, tmp_path)
    loaded, loaded_mask = load_null_condition(tmp_path)
    assert torch.equal(loaded, null) and torch.equal(loaded_mask, null_mask)
    zeros = MiniLMPromptEncoder(16, null="zeros")
    z, zm = zeros.null_condition()
    assert z.shape == (1, 16, 384) and torch.count_nonzero(z) == 0 and not zm.any()


def test_minilm_encodes_with_the_hub_disabled(tmp_path):
    """A fresh process with the hub switched off, an empty HF cache and no reachable network."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path),
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    code = ("from univigu.models.text import load_prompt_encoder\n"
            "e, m = load_prompt_encoder().encode(['a red circle'])\n"
            "print(tuple(e.shape), int(m.sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(1, 32, 384) 5"  # [CLS] a red circle [SEP]


# --------------------------------------------------------------------------------------------
# UMT5 (tiny random model + a tokenizer built in code)
# --------------------------------------------------------------------------------------------

WORDS = ("a an the small large red green blue yellow circle square triangle star moves to left "
         "right up down and stays still").split()


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5-style: append </s>
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):  # its num_layers x d_ff make UMT5_TERMS
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8,
                        relative_attention_max_distance=16, dropout_rate=0.0)
    model = UMT5EncoderModel(config).eval()
    path = tmp_path_factory.mktemp("umt5")
    model.save_pretrained(str(path))
    build_tokenizer().save_pretrained(str(path))
    return path


def wan_reference(path, prompts, max_length):
    """Wan's recipe (`WanPipeline._get_t5_prompt_embeds`): pad to max_length with a mask, run,
    trim each prompt to its real tokens, zero-pad back."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(path))
    model = UMT5EncoderModel.from_pretrained(str(path)).eval()
    batch = tok(prompts, padding="max_length", max_length=max_length, truncation=True,
                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    lengths = batch.attention_mask.sum(1)
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.attention_mask).last_hidden_state
    out = torch.zeros_like(hidden)
    for i, n in enumerate(lengths):
        out[i, :n] = hidden[i, :n]
    # and a direct unpadded call per prompt (no attention mask at all)
    singles = []
    for p in prompts:
        ids = tok(p, truncation=True, max_length=max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            singles.append(model(input_ids=ids).last_hidden_state[0])
    return out, lengths, singles


def test_umt5_trims_and_zero_pads_like_wan(umt5_dir):
    enc = load_prompt_encoder(PromptEncoderConfig(kind="umt5", path=str(umt5_dir),
                                                  condition_length=12))
    assert isinstance(enc, UMT5PromptEncoder) and enc.embed_dim == 32
    prompts = PROMPTS + ["a red circle moves to the left and a blue star moves up and a green "
                         "square stays still"]  # 19 words: truncated to 11 + </s>
    emb, mask = enc.encode(prompts)
    ref, lengths, singles = wan_reference(umt5_dir, prompts, 12)
    assert emb.shape == (4, 12, 32)
    assert mask.sum(1).tolist() == lengths.tolist()
    assert_close_ordered(emb, ref, terms=UMT5_TERMS)
    for i, single in enumerate(singles):
        n = single.shape[0]
        assert n == lengths[i]
        assert_close_ordered(emb[i, :n], single, terms=UMT5_TERMS)
        assert torch.count_nonzero(emb[i, n:]) == 0
    assert lengths.tolist() == [len(PROMPTS[0].split()) + 1, 12, len(PROMPTS[0].split()) + 1, 12]


def test_umt5_pipeline_layout_and_null_condition(umt5_dir, tmp_path):
    # Wan pipeline folders keep text_encoder/ and tokenizer/ apart
    import shutil

    root = tmp_path / "wan"
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    for f in umt5_dir.iterdir():
        dest = "text_encoder" if f.name in ("config.json", "model.safetensors") else "tokenizer"
        shutil.copy(f, root / dest / f.name)
    enc = UMT5PromptEncoder(root, condition_length=6)
    null, null_mask = enc.null_condition()
    ref, lengths, _ = wan_reference(umt5_dir, [""], 6)
    assert lengths.tolist() == [1]  # just </s>
    assert null_mask[0].tolist() == [True] + [False] * 5
    assert_close_ordered(null, ref, terms=UMT5_TERMS)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_prompt_encoder_errors(tmp_path, minilm, umt5_dir):
    with pytest.raises(PromptEncoderError, match="not found"):
        load_prompt_encoder(PromptEncoderConfig(kind="umt5", path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptEncoderError, match="missing config.json"):
        load_prompt_encoder(PromptEncoderConfig(kind="umt5", path=str(tmp_path / "empty")))
    (tmp_path / "no_tok").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "no_tok" / name).write_bytes((umt5_dir / name).read_bytes())
    with pytest.raises(PromptEncoderError, match="no tokenizer"):
        UMT5PromptEncoder(tmp_path / "no_tok")
    with pytest.raises(PromptEncoderError, match="missing .*safetensors"):
        MiniLMPromptEncoder(path=tmp_path / "empty")
    with pytest.raises(PromptEncoderError, match="needs prompt_encoder.path"):
        load_prompt_encoder(PromptEncoderConfig(kind="umt5"))
    with pytest.raises(PromptEncoderError, match="empty"):
        minilm.encode([])
    with pytest.raises(PromptEncoderError, match="single string"):
        minilm.encode("a red circle")
    with pytest.raises(PromptEncoderError, match="prompt 1 is a int"):
        minilm.encode(["ok", 3])
    with pytest.raises(PromptEncoderError, match="condition_length"):
        MiniLMPromptEncoder(condition_length=0)
    with pytest.raises(PromptEncoderError, match="not found"):
        load_null_condition(tmp_path / "empty")
