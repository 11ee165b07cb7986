"""Evaluation: caption metrics (pycocoevalcap), ShapesWorld oracle metrics, reports.

* `captions.caption_metrics` — BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D); SPICE reported unavailable.
* `shapesworld_metrics` — `understanding_metrics` (v2t), `generation_metrics` (t2v),
  `joint_metrics` (joint), with 95% Wilson intervals, as flat dicts (`t2v.all_correct`, ...).
* `report.write_report` — metrics.json plus a self-contained report.html with GIFs.
* `harness.evaluate` — running a model (an `Evaluatee`, e.g. `PipelineEvaluatee`) over manifest
  samples, scoring every split and writing the report; `univigu eval` and `univigu demo` call it.
Names are imported lazily so `import univigu.evaluation` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "caption_metrics": "captions",
    "CaptionMetricError": "captions",
    "understanding_metrics": "shapesworld_metrics",
    "generation_metrics": "shapesworld_metrics",
    "joint_metrics": "shapesworld_metrics",
    "wilson_interval": "shapesworld_metrics",
    "ShapesWorldMetricError": "shapesworld_metrics",
    "write_report": "report",
    "render_html": "report",
    "evaluate": "harness",
    "Evaluatee": "harness",
    "EvalError": "harness",
    "PipelineEvaluatee": "harness",
    "load_samples": "harness",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
