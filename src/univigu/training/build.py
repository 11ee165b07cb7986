"""The model a stage trains: a fresh generator, a model directory, or a Wan checkpoint, grown into
a unified model when the stage needs a text stream; and the text-stream tokenizer it writes with."""

from __future__ import annotations

import copy
from pathlib import Path

from ..config import ExperimentConfig, TokenizerConfig
from ..models.bundle import INDEX_NAME, load_bundle
from ..models.text import TextTokenizer, load_text_tokenizer
from ..models.transformer import UniViGUTransformer
from ..models.unify import TEXT_OPTIONS, unify_video_model

TRAINABLE_GROUPS = {"all": "all", "text": {"text"}, "text_and_shared": {"text", "shared"}, "none": set()}


class TrainingError(ValueError):
    """A training run cannot start: bad stage setup, missing init checkpoint, ..."""


def build_tokenizer(cfg: ExperimentConfig, corpus: list[str]) -> TextTokenizer | None:
    """The init model's tokenizer when it has one, else one for `corpus`; None for the generator."""
    t = cfg.train
    if t.stage == "generator":
        return None
    if t.init_from and (Path(t.init_from) / "tokenizer").is_dir():
        return TextTokenizer.load(Path(t.init_from) / "tokenizer")
    tokenizer = load_text_tokenizer(tokenizer_config(cfg), corpus=corpus)
    if t.manifest and t.val_manifest and (cfg.tokenizer.kind == "trimmed" and not cfg.tokenizer.path):
        check_unknown_rate(tokenizer, t.val_manifest)
    return tokenizer


def tokenizer_config(cfg: ExperimentConfig) -> TokenizerConfig:
    """`tokenizer.kind=auto` made concrete: a vocabulary trimmed to ShapesWorld's texts (they are all
    the model will ever write there); on real videos a subword tokenizer, UMT5's own tokenizer.json
    when the prompt encoder has one, else MiniLM's WordPiece."""
    if cfg.tokenizer.kind != "auto":
        return cfg.tokenizer
    if not cfg.train.manifest:
        return TokenizerConfig(kind="trimmed", path=cfg.tokenizer.path)
    encoder = cfg.prompt_encoder
    if encoder.kind == "umt5" and encoder.path:
        for candidate in (Path(encoder.path) / "tokenizer.json", Path(encoder.path) / "tokenizer" / "tokenizer.json"):
            if candidate.is_file():
                return TokenizerConfig(kind="file", path=str(candidate))
    return TokenizerConfig(kind="minilm")


MAX_UNKNOWN_RATE = 0.01


def check_unknown_rate(tokenizer: TextTokenizer, val_manifest: str) -> None:
    """Refuse a trimmed vocabulary that would read more than 1% of the held-out texts' tokens as UNK."""
    from ..data.manifest import read_manifest

    texts = [text for r in read_manifest(val_manifest, required=("video", "prompt"))
             for text in (r["prompt"], r.get("caption", r["prompt"]))]
    ids = [i for text in texts for i in tokenizer.tokenize(text)]
    unknown = sum(i == tokenizer.unk_id for i in ids)
    if ids and unknown > MAX_UNKNOWN_RATE * len(ids):
        raise TrainingError(f"tokenizer.kind=trimmed reads {unknown / len(ids):.1%} of the tokens of {val_manifest} "
                            f"as unknown (more than {MAX_UNKNOWN_RATE:.0%}): words unseen in training cannot be "
                            f"written; use a subword tokenizer: tokenizer.kind=auto (or minilm, or file with "
                            f"tokenizer.path=.../tokenizer.json)")


def load_init(path: str | Path) -> UniViGUTransformer:
    """The transformer of a model directory, or a Wan checkpoint through the conversion."""
    path = Path(path)
    if not path.exists():
        raise TrainingError(f"train.init_from not found: {path}")
    if (path / INDEX_NAME).is_file():
        return load_bundle(path).transformer
    from ..models.convert import load_wan

    return load_wan(path)


def build_model(cfg: ExperimentConfig, tokenizer: TextTokenizer | None) -> UniViGUTransformer:
    """The stage's starting model (on the CPU, all parameters trainable)."""
    t = cfg.train
    if t.stage == "generator":
        if t.init_from:
            return load_init(t.init_from)
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.vocab_size = 0  # the generator is the video-only backbone
        return UniViGUTransformer(model_cfg)
    if not t.init_from:
        raise TrainingError(f"stage {t.stage!r} starts from a previous stage: set train.init_from "
                            "(a generator or unified model directory, or a Wan checkpoint)")
    base = load_init(t.init_from)
    if base.has_text_stream:
        if base.config.vocab_size != tokenizer.vocab_size:
            raise TrainingError(f"{t.init_from} has a text vocabulary of {base.config.vocab_size}, the "
                                f"tokenizer {tokenizer.vocab_size}")
        return base
    text_options = {name: getattr(cfg.model, name) for name in TEXT_OPTIONS}  # the rest is the video's
    return unify_video_model(base, vocab_size=tokenizer.vocab_size, text_length=cfg.model.text_length,
                             mask_token=cfg.flow.text_source == "mask", init="copy", seed=t.seed, **text_options)


def freeze(model: UniViGUTransformer, trainable: str, lora=None) -> None:
    """Train only the parameter groups `train.trainable` names, plus the LoRA adapters `lora`
    (`train.lora`) adds through peft (the adapted layers' own weights frozen); refuse a choice that
    leaves nothing to train."""
    model.set_trainable(TRAINABLE_GROUPS[trainable])
    if lora is not None and lora.rank > 0:
        from ..models import lora as adapters

        try:
            config = adapters.make_config(model, lora.rank, lora.alpha, lora.dropout, lora.targets)
        except adapters.LoraError as err:
            raise TrainingError(f"train.lora: {err}") from None
        adapters.add_adapter(model, config, train=True)
    if not any(p.requires_grad for p in model.parameters()):
        kind = "unified" if model.has_text_stream else "video-only"
        raise TrainingError(f"train.trainable={trainable!r} leaves nothing to train in a {kind} model")
