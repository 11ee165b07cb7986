"""Caption metrics against pycocoevalcap's own numbers, and the pure-Python fallback's tolerance.

The reference numbers come from calling pycocoevalcap directly (PTBTokenizer, Bleu(4), Meteor,
Rouge, Cider) in this file. METEOR's JVM takes seconds to start, so one Meteor process is shared by
the module (the reference and `caption_metrics` use the same pycocoevalcap instance).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from univigu.evaluation import captions
from univigu.evaluation.captions import CaptionMetricError, caption_metrics, cider_d, ptb_tokenize_python

# A fixed hypothesis/reference set: ShapesWorld-style captions and ordinary English with
# punctuation, contractions, brackets, hyphens, quotes, and 1 to 3 references per sample.
HYPOTHESES = [
    "a small red circle moves to the left.",
    "A big blue square doesn't move!",
    "a green triangle moves up and to the right",
    "Two objects: a yellow star (large) moving down, and a small cyan circle staying still",
    "a man is riding a horse on the beach",
    "The white square starts at the top left and moves down.",
    "a dog",
    "someone's cooking pasta in a kitchen; it's boiling",
]
REFERENCES = [
    ["A small red circle starts at the centre and moves to the left.", "a red circle, small, moving left"],
    ["A large blue square stays still.", "a big blue square that does not move", "blue square, large - still"],
    ["A small green triangle moves up-right."],
    ["a large yellow star moves down; a small cyan circle stays still",
     "A large yellow star starts at the top right and moves down. A small cyan circle stays still."],
    ["a person rides a horse along the beach", "a man riding a brown horse on a sandy beach"],
    ["A large white square starts at the top left and moves down. The background is black."],
    ["a dog runs across a green field", "a small dog is running"],
    ["a woman is cooking pasta in the kitchen", "someone boils \"pasta\" in a pot"],
]
BLEU_TOLERANCE = 1e-6  # stated tolerance of the fallback where tokenizers agree (COCO adds 1e-9/1e-15 guards)
EXACT_TOLERANCE = 1e-9  # ROUGE-L and CIDEr-D: same arithmetic as pycocoevalcap

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")


@pytest.fixture(scope="module")
def coco():
    """pycocoevalcap's own scores on the fixed set, plus its tokens; shares one Meteor JVM."""
    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap needs Java")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(REFERENCES)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(HYPOTHESES)})
    meteor = Meteor()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    scores["METEOR"], _ = meteor.compute_score(gts, res)
    scores["ROUGE-L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], cider_each = Cider().compute_score(gts, res)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(captions, "_meteor_scorer", lambda: meteor)  # the same JVM for our call
        ours = caption_metrics(HYPOTHESES, REFERENCES, backend="pycocoevalcap", per_sample=True)
    yield {"scores": scores, "gts": gts, "res": res, "cider_each": cider_each, "ours": ours}


@needs_java
def test_pycocoevalcap_backend_equals_pycocoevalcap(coco):
    ours = coco["ours"]
    assert ours["backend"] == "pycocoevalcap"
    assert ours["n"] == len(HYPOTHESES)
    for name, value in coco["scores"].items():
        assert ours[name] == pytest.approx(float(value), abs=1e-12), name
    np.testing.assert_allclose(ours["per_sample"]["CIDEr"], coco["cider_each"], atol=1e-12)
    # Sanity of the set itself: not degenerate, so the comparison means something.
    assert 0.05 < ours["BLEU-4"] < 0.9 and 0.1 < ours["METEOR"] < 0.9 and ours["CIDEr"] > 0.1


@needs_java
def test_spice_reported_unavailable_not_faked(coco):
    for result in (coco["ours"], caption_metrics(HYPOTHESES, REFERENCES, backend="python")):
        assert result["SPICE"] is None
        assert "CoreNLP" in result["unavailable"]["SPICE"]


@needs_java
def test_python_tokenizer_matches_ptb_tokenizer(coco):
    for i, refs in enumerate(REFERENCES):
        assert [ptb_tokenize_python(r) for r in refs] == coco["gts"][i]
        assert ptb_tokenize_python(HYPOTHESES[i]) == coco["res"][i][0]


@needs_java
def test_python_fallback_within_stated_tolerance(coco):
    fallback = caption_metrics(HYPOTHESES, REFERENCES, backend="python")
    assert fallback["backend"] == "python"
    assert any("fallback" in note for note in fallback["notes"])
    for n in range(1, 5):
        assert fallback[f"BLEU-{n}"] == pytest.approx(coco["scores"][f"BLEU-{n}"], abs=BLEU_TOLERANCE)
    assert fallback["ROUGE-L"] == pytest.approx(coco["scores"]["ROUGE-L"], abs=EXACT_TOLERANCE)
    assert fallback["CIDEr"] == pytest.approx(coco["scores"]["CIDEr"], abs=EXACT_TOLERANCE)
    assert fallback["METEOR"] is None and "Java" in fallback["unavailable"]["METEOR"]


def test_own_cider_d_equals_pycocoevalcap_cider():
    """On already-tokenised text (no Java needed), over a larger random set of captions."""
    from pycocoevalcap.cider.cider import Cider

    rng = np.random.default_rng(0)
    words = "a the small large red blue green circle square star moves left right up down stays still and".split()
    hyps, refs = [], []
    for _ in range(40):
        hyps.append(" ".join(rng.choice(words, rng.integers(3, 12))))
        refs.append([" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(rng.integers(1, 4))])
    expected, expected_each = Cider().compute_score({i: r for i, r in enumerate(refs)},
                                                    {i: [h] for i, h in enumerate(hyps)})
    ours, ours_each = cider_d(hyps, refs)
    assert ours == pytest.approx(float(expected), abs=1e-12)
    np.testing.assert_allclose(ours_each, expected_each, atol=1e-12)


def test_dict_and_list_inputs_agree():
    ids = [f"video{i}" for i in range(len(HYPOTHESES))]
    as_lists = caption_metrics(HYPOTHESES, REFERENCES, backend="python")
    as_dicts = caption_metrics(dict(zip(ids, HYPOTHESES)), dict(zip(reversed(ids), reversed(REFERENCES))),
                               backend="python")
    for name in ("BLEU-4", "ROUGE-L", "CIDEr"):
        assert as_dicts[name] == pytest.approx(as_lists[name], abs=1e-12)


def test_identical_captions_score_perfectly():
    # Independent expectation: a hypothesis equal to its only reference has BLEU = ROUGE-L = 1
    # and CIDEr-D = 10 (cosine 1 for every n-gram order, no length penalty, x10).
    texts = ["a small red circle moves left", "a large blue square stays still", "a green star moves up"]
    result = caption_metrics(texts, [[t] for t in texts], backend="python")
    assert result["BLEU-4"] == pytest.approx(1.0) and result["ROUGE-L"] == pytest.approx(1.0)
    assert result["CIDEr"] == pytest.approx(10.0)


@pytest.mark.parametrize("predictions, references, message", [
    ([], [], "empty"),
    (["a red circle"], [["a"], ["b"]], "same samples"),
    ({"a": "x"}, {"b": ["x"]}, "same samples"),
    ([3], [["a red circle"]], "must be a string"),
    (["a red circle"], [[]], "non-empty list"),
    ("a red circle", [["a red circle"]], "list of strings"),
])
def test_bad_input_gives_one_clear_error(predictions, references, message):
    with pytest.raises(CaptionMetricError, match=message):
        caption_metrics(predictions, references, backend="python")


def test_unknown_backend():
    with pytest.raises(CaptionMetricError, match="unknown caption metric backend"):
        caption_metrics(["a"], [["a"]], backend="java")
