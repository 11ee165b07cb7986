"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), computed the way papers compute them.

The reference implementation is the COCO caption toolkit (`pycocoevalcap`, Java): Stanford's
PTBTokenizer (lower-cased, punctuation dropped), then Bleu(4), Meteor 1.5, Rouge (ROUGE-L, beta 1.2)
and Cider (which is CIDEr-D: clipped n-gram tf-idf, Gaussian length penalty, sigma 6, x10; the idf
comes from the evaluated references, as in COCO).

Without Java a clearly labelled pure-Python fallback runs instead: a regex PTB-style tokenizer,
sacrebleu corpus BLEU (no smoothing, closest reference length), rouge-score's LCS combined as COCO's
ROUGE-L, and our own CIDEr-D; on the same tokens all three equal pycocoevalcap's numbers, so the
fallback differs only where the regex tokenizer differs from Stanford's (on our fixed test set:
nowhere). BLEU differs by COCO's zero guards alone (< 1e-6 when every n-gram order has a match;
where one has none COCO reports a tiny positive number and sacrebleu 0). Its METEOR is `None`: METEOR 1.5 is a Java
program, and nltk's METEOR is a different metric.
SPICE is never computed: it needs Stanford CoreNLP 3.6.0 models that are downloaded at first use,
so it is reported as unavailable instead of faked.

Scores are on pycocoevalcap's native scale (BLEU, METEOR, ROUGE-L in [0, 1]; CIDEr roughly [0, 10]).
"""

from __future__ import annotations

import functools
import math
import re
import shutil
from collections import Counter
from typing import Mapping, Sequence

__all__ = ["CaptionMetricError", "caption_metrics", "cider_d", "java_available", "ptb_tokenize_python"]

SPICE_REASON = (
    "SPICE needs Stanford CoreNLP 3.6.0 models that pycocoevalcap downloads at first use; "
    "they are not available offline, so SPICE is not reported"
)
METEOR_FALLBACK_REASON = (
    "METEOR 1.5 runs only in Java (pycocoevalcap's meteor-1.5.jar), which the pure-Python backend "
    "does not use; no pure-Python METEOR reproduces it, so it is not reported"
)
CIDER_NOTE = "CIDEr is CIDEr-D as in pycocoevalcap (clipped tf-idf n-grams 1-4, length penalty sigma=6, x10)"

# The same punctuation tokens pycocoevalcap's PTBTokenizer wrapper drops after tokenising.
_PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                    ".", "?", "!", ",", ":", "-", "--", "...", ";"}


class CaptionMetricError(ValueError):
    """Predictions and references cannot be scored (empty, mismatched ids, not strings)."""


# --------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------


def _as_dicts(predictions, references) -> tuple[dict, dict]:
    """Accept dicts keyed by sample id or parallel lists; return {id: str}, {id: [str, ...]}."""
    if isinstance(predictions, Mapping):
        preds = dict(predictions)
    elif isinstance(predictions, Sequence) and not isinstance(predictions, str):
        preds = dict(enumerate(predictions))
    else:
        raise CaptionMetricError(
            f"predictions must be a list of strings or a dict id -> string, got {type(predictions).__name__}")
    if isinstance(references, Mapping):
        refs = dict(references)
    elif isinstance(references, Sequence) and not isinstance(references, str):
        refs = dict(enumerate(references))
    else:
        raise CaptionMetricError(
            f"references must be a list of lists of strings or a dict id -> list, got {type(references).__name__}")

    if not preds:
        raise CaptionMetricError("no predictions to score: the prediction list is empty")
    if set(preds) != set(refs):
        missing = sorted(map(str, set(preds) - set(refs)))[:3]
        extra = sorted(map(str, set(refs) - set(preds)))[:3]
        raise CaptionMetricError(
            f"predictions and references must cover the same samples ({len(preds)} predictions, "
            f"{len(refs)} references; without reference: {missing}, without prediction: {extra})")
    for key, text in preds.items():
        if not isinstance(text, str):
            raise CaptionMetricError(f"prediction for sample {key!r} must be a string, got {type(text).__name__}")
    for key, ref_list in refs.items():
        if isinstance(ref_list, str):
            ref_list = [ref_list]  # one reference given as a bare string
        if not ref_list or not all(isinstance(r, str) for r in ref_list):
            raise CaptionMetricError(f"references for sample {key!r} must be a non-empty list of strings")
        refs[key] = list(ref_list)
    return preds, refs


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def java_available() -> bool:
    """True when a `java` executable is on PATH (pycocoevalcap's tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


@functools.lru_cache(maxsize=1)
def _meteor_scorer():
    """One METEOR JVM per process: starting it takes seconds (it loads a paraphrase table)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _coco_metrics(preds: dict, refs: dict) -> tuple[dict, dict]:
    """pycocoevalcap on PTB-tokenised text, exactly as COCOEvalCap.evaluate does it."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Stable string ids: the tokenizer groups lines by id and the scorers iterate dict order.
    # One tokenizer run for references and predictions (one JVM start instead of two; the
    # tokenizer works line by line, so batching them together changes nothing).
    ids = list(preds)
    batch = {("ref", i): [{"caption": r} for r in refs[k]] for i, k in enumerate(ids)}
    batch.update({("hyp", i): [{"caption": preds[k]}] for i, k in enumerate(ids)})
    tokens = PTBTokenizer().tokenize(batch)
    gts = {i: tokens[("ref", i)] for i in range(len(ids))}
    res = {i: tokens[("hyp", i)] for i in range(len(ids))}

    out, per_sample = {}, {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"BLEU-{n + 1}"] = float(bleu[n])
    per_sample["BLEU-4"] = [float(x) for x in bleu_each[3]]
    meteor, meteor_each = _meteor_scorer().compute_score(gts, res)
    out["METEOR"], per_sample["METEOR"] = float(meteor), [float(x) for x in meteor_each]
    rouge, rouge_each = Rouge().compute_score(gts, res)
    out["ROUGE-L"], per_sample["ROUGE-L"] = float(rouge), [float(x) for x in rouge_each]
    cider, cider_each = Cider().compute_score(gts, res)
    out["CIDEr"], per_sample["CIDEr"] = float(cider), [float(x) for x in cider_each]
    return out, per_sample


_CONTRACTION = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"\.\.\.|--|n't|'\w+|[\w]+(?:[-/.&@]\w+)*|[^\w\s]")


# PTBTokenizer escapes brackets (-LRB- ...); with -lowerCase they become "-lrb-" and, not being in the
# wrapper's (upper-case) punctuation list, survive as tokens. We reproduce that quirk.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def ptb_tokenize_python(text: str) -> str:
    """A regex approximation of pycocoevalcap's PTB tokenisation: lower-case, split clitics
    ("doesn't" -> "does n't"), split punctuation off words, then drop punctuation tokens."""
    text = _CONTRACTION.sub(r"\1 \2", text.replace("\n", " ").lower())
    tokens = [_BRACKETS.get(t, t) for t in _TOKEN.findall(text)]
    return " ".join(t for t in tokens if t not in _PTB_PUNCTUATION and t != '"')


def _ngrams(words: list[str], n: int = 4) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def cider_d(predictions: list[str], references: list[list[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D over tokenised captions (Vedantam et al. 2015, as pycocoevalcap computes it).

    Per n-gram order: tf-idf vectors (idf over the evaluated references' samples), similarity
    sum_g min(h_g, r_g) r_g / (|h| |r|) (the "clipped" cosine), times exp(-(len_h - len_r)^2 / 2 sigma^2);
    averaged over orders and references, times 10. Returns (corpus mean, per-sample scores).
    """
    hyp_counts = [_ngrams(h.split(), n) for h in predictions]
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in ref_counts:
        document_frequency.update({g for counts in refs for g in counts})
    log_num_docs = math.log(float(len(ref_counts)))

    def tfidf(counts: Counter):
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            weight = tf * (log_num_docs - math.log(max(1.0, document_frequency[gram])))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight * weight
        length = sum(tf for gram, tf in counts.items() if len(gram) == 1)
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        vec_h, norm_h, len_h = tfidf(hyp)
        total = 0.0
        for ref in refs:
            vec_r, norm_r, len_r = tfidf(ref)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
                if norm_h[k] != 0 and norm_r[k] != 0:
                    dot /= norm_h[k] * norm_r[k]
                total += dot * penalty / n
        scores.append(10.0 * total / len(refs))
    return sum(scores) / len(scores), scores


class _SpaceTokenizer:
    """Split on single spaces, as pycocoevalcap's Rouge does with already tokenised text."""

    def tokenize(self, text: str) -> list[str]:
        return text.split(" ")


def _rouge_l_coco(precision: float, recall: float, beta: float = 1.2) -> float:
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def _python_metrics(preds: dict, refs: dict) -> tuple[dict, dict]:
    """The no-Java fallback: sacrebleu BLEU, rouge-score ROUGE-L, own CIDEr-D, no METEOR."""
    try:
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import BLEU
    except ImportError as err:
        raise CaptionMetricError(
            f"the pure-Python caption metrics need sacrebleu and rouge-score ({err}); "
            "install them with `pip install sacrebleu rouge-score`, or install Java for pycocoevalcap") from None

    ids = list(preds)
    hyps = [ptb_tokenize_python(preds[k]) for k in ids]
    ref_lists = [[ptb_tokenize_python(r) for r in refs[k]] for k in ids]

    # sacrebleu on our tokens: no re-tokenisation, no smoothing, closest reference length (as COCO).
    max_refs = max(len(r) for r in ref_lists)
    streams = [[r[j] if j < len(r) else None for r in ref_lists] for j in range(max_refs)]
    bleu = BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(hyps, streams)
    out, per_sample = {}, {}
    bp = bleu.bp
    precisions = [p / 100.0 for p in bleu.precisions]
    for n in range(1, 5):
        head = precisions[:n]
        out[f"BLEU-{n}"] = 0.0 if min(head) == 0 else bp * math.exp(sum(map(math.log, head)) / n)

    # rouge-score finds the LCS on our tokens; COCO's ROUGE-L then combines the best precision and
    # the best recall over the references with beta = 1.2 (not rouge-score's per-reference F1).
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_SpaceTokenizer())
    rouge_each = []
    for hyp, ref_list in zip(hyps, ref_lists):
        pairs = [scorer.score(ref, hyp)["rougeL"] for ref in ref_list]
        rouge_each.append(_rouge_l_coco(max(p.precision for p in pairs), max(p.recall for p in pairs)))
    out["ROUGE-L"], per_sample["ROUGE-L"] = sum(rouge_each) / len(rouge_each), rouge_each

    out["METEOR"] = None
    cider, cider_each = cider_d(hyps, ref_lists)
    out["CIDEr"], per_sample["CIDEr"] = cider, cider_each
    return out, per_sample


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def caption_metrics(predictions: Mapping | Sequence[str], references: Mapping | Sequence[Sequence[str]],
                    backend: str = "auto", per_sample: bool = False) -> dict:
    """Score generated captions against reference captions.

    Args:
        predictions: one generated caption per sample: a list, or a dict sample id -> caption.
        references: the reference captions per sample: a list of lists (or a dict id -> list);
            a bare string counts as one reference.
        backend: "pycocoevalcap" (Java; the field's reference numbers), "python" (labelled fallback)
            or "auto" (pycocoevalcap when Java is present).
        per_sample: also return per-sample scores (BLEU-4 where available, METEOR, ROUGE-L, CIDEr)
            in sample order under "per_sample".

    Returns:
        {"backend", "n", "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE": None,
         "unavailable": {metric: reason}, "notes": [...]} (+ "per_sample").
    """
    preds, refs = _as_dicts(predictions, references)
    if backend not in ("auto", "pycocoevalcap", "python"):
        raise CaptionMetricError(f"unknown caption metric backend {backend!r} (use auto, pycocoevalcap or python)")
    if backend == "auto":
        backend = "pycocoevalcap" if java_available() else "python"
    if backend == "pycocoevalcap" and not java_available():
        raise CaptionMetricError("backend 'pycocoevalcap' needs Java (`java` not found on PATH); "
                                 "install a JRE or use backend='python'")

    scores, each = _coco_metrics(preds, refs) if backend == "pycocoevalcap" else _python_metrics(preds, refs)
    unavailable = {"SPICE": SPICE_REASON}
    notes = [CIDER_NOTE]
    if backend == "python":
        unavailable["METEOR"] = METEOR_FALLBACK_REASON
        notes.append("pure-Python fallback, not the reference implementation: regex PTB-style tokens, "
                     "sacrebleu BLEU, rouge-score LCS combined as COCO's ROUGE-L, own CIDEr-D")
    result = {"backend": backend, "n": len(preds)}
    result.update({k: scores[k] for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")})
    result["SPICE"] = None
    result["unavailable"] = unavailable
    result["notes"] = notes
    if per_sample:
        result["per_sample"] = {"ids": list(preds), **each}
    return result
