"""Evaluation reports: `metrics.json` for scripts and a static, self-contained `report.html` for people.

The HTML page needs no server and no network: GIFs are embedded as base64 data URIs at their native
size and enlarged by CSS with nearest-neighbour scaling (tiny ShapesWorld videos stay crisp and the
file stays small). It shows headline figures, the metrics table (one column per split, rates with
their 95% intervals) and one section per task with cards: the generated video beside its prompt
(T2V), the caption beside its video (V2T), and for joint generation the caption beside the video it
was generated with.

`metrics` is `{"meta": {...}, "<split>": {flat metric name: value}}`; `examples` maps a task
("t2v", "v2t", "joint") to a list of dicts with "video" (uint8 [F, H, W, 3]) and any of "id",
"split", "ok", "prompt", "caption", "reference", "reading", "truth".
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from univigu.atomic import atomic_write_text
from univigu.data.video_io import write_gif

__all__ = ["describe_objects", "gif_data_uri", "render_html", "to_jsonable", "write_report"]

TASK_TITLES = {
    "t2v": ("Text → video", "Generated videos beside their prompts; the oracle's reading of the pixels below."),
    "v2t": ("Video → text", "Generated captions beside the videos they describe, with the reference caption."),
    "joint": ("Joint video + text", "Video and caption generated together from one prompt, side by side."),
}
FIELD_LABELS = (  # (key, label) in display order
    ("prompt", "prompt"),
    ("caption", "generated caption"),
    ("reference", "reference caption"),
    ("reading", "oracle reads video"),
    ("parsed", "caption says"),
    ("truth", "ground truth"),
)
HEADLINES = (("t2v.all_correct", "T2V all-correct"), ("v2t.all_correct", "V2T all-correct"),
             ("joint.all_correct", "Joint all-correct"))

_CSS = """
:root { --ok: #1a7f37; --bad: #cf222e; --muted: #57606a; --line: #d0d7de; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 0 auto; max-width: 1200px; padding: 24px; }
h1 { margin: 0 0 4px; font-size: 26px; } h2 { margin: 36px 0 4px; font-size: 20px; }
.sub { color: var(--muted); margin: 0 0 16px; }
.headline { display: flex; gap: 16px; flex-wrap: wrap; margin: 16px 0; }
.tile { border: 1px solid var(--line); border-radius: 8px; padding: 12px 18px; min-width: 180px;
        background: var(--bg); }
.tile .v { font-size: 28px; font-weight: 600; } .tile .k, .tile .ci { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 6px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: var(--bg); position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fbfcfd; }
tr.group td { background: #eef1f4; font-weight: 600; text-align: left; }
.ci { color: var(--muted); font-size: 12px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 14px; }
.card { display: flex; gap: 12px; border: 1px solid var(--line); border-radius: 8px; padding: 10px; }
.card img { image-rendering: pixelated; flex: none; border-radius: 4px; background: #000; }
.card .text { min-width: 0; font-size: 13.5px; }
.card .meta { color: var(--muted); font-size: 12px; margin-bottom: 4px; }
.card .lab { color: var(--muted); font-size: 11.5px; text-transform: uppercase; letter-spacing: .03em; }
.card p { margin: 0 0 6px; overflow-wrap: anywhere; }
.badge { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 12px; color: #fff; }
.badge.ok { background: var(--ok); } .badge.bad { background: var(--bad); }
.notes { color: var(--muted); font-size: 13px; } code { font-size: 13px; }
"""


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays -> Python, NaN/inf -> None, tuples -> lists (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def gif_data_uri(frames: np.ndarray, fps: float = 8) -> str:
    """uint8 frames [F, H, W, 3] -> 'data:image/gif;base64,...' (encoded by video_io.write_gif)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.gif"
        write_gif(path, frames, fps=fps)
        data = path.read_bytes()
    return "data:image/gif;base64," + base64.b64encode(data).decode("ascii")


def describe_objects(objects: Sequence[Mapping] | str | None) -> str:
    """[{"size", "colour", "shape", "motion"}] -> 'small red circle (left); ...' for display."""
    if objects is None:
        return ""
    if isinstance(objects, str):
        return objects
    if not objects:
        return "no objects"
    parts = []
    for obj in objects:
        noun = " ".join(str(obj.get(k) or "?") for k in ("size", "colour", "shape"))
        parts.append(f"{noun} ({obj.get('motion') or '?'})")
    return "; ".join(parts)


def _format_value(name: str, value: Any, ci: Any = None) -> str:
    if value is None:
        return '<span class="ci">n/a</span>'
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if ci is not None:  # a rate: percent with its interval
        lo, hi = ci
        return f"{100 * value:.1f}%<br><span class=\"ci\">[{100 * lo:.1f}, {100 * hi:.1f}]</span>"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def _metric_rows(splits: Mapping[str, Mapping]) -> list[str]:
    """Metric names in display order: n, then per task (t2v, v2t, joint, others) in first-seen order."""
    names: list[str] = []
    for flat in splits.values():
        for key in flat:
            if key.endswith("_ci95") or key in names or isinstance(flat[key], (list, dict)):
                continue
            names.append(key)
    order = {"n": 0, "t2v": 1, "v2t": 2, "joint": 3}
    return sorted(names, key=lambda k: (order.get(k.split(".")[0], 4), names.index(k)))


def _metrics_table(splits: Mapping[str, Mapping]) -> str:
    if not splits:
        return "<p class=\"notes\">No metrics.</p>"
    heads = "".join(f"<th>{html.escape(s)}</th>" for s in splits)
    rows, group = [], None
    for name in _metric_rows(splits):
        task = name.split(".")[0] if "." in name else ""
        if task != group and task:
            title = TASK_TITLES.get(task, (task,))[0]
            rows.append(f"<tr class=\"group\"><td colspan=\"{len(splits) + 1}\">{html.escape(title)}</td></tr>")
            group = task
        cells = "".join(
            f"<td>{_format_value(name, flat.get(name), flat.get(name + '_ci95'))}</td>" for flat in splits.values()
        )
        rows.append(f"<tr><td><code>{html.escape(name)}</code></td>{cells}</tr>")
    return f"<table><thead><tr><th>metric</th>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _headline(splits: Mapping[str, Mapping]) -> str:
    tiles = []
    for split, flat in splits.items():
        for key, label in HEADLINES:
            if flat.get(key) is None:
                continue
            lo, hi = flat.get(key + "_ci95") or (0.0, 1.0)
            tiles.append(
                f"<div class=\"tile\"><div class=\"k\">{html.escape(label)} · {html.escape(split)}</div>"
                f"<div class=\"v\">{100 * flat[key]:.1f}%</div>"
                f"<div class=\"ci\">95% CI [{100 * lo:.1f}, {100 * hi:.1f}] · n={flat.get('n', '?')}</div></div>"
            )
    return f"<div class=\"headline\">{''.join(tiles)}</div>" if tiles else ""


def _card(example: Mapping, fps: float, scale: int) -> str:
    frames = np.asarray(example["video"])
    height, width = frames.shape[1:3]
    img = (f"<img src=\"{gif_data_uri(frames, fps)}\" width=\"{width * scale}\" height=\"{height * scale}\" "
           f"alt=\"{html.escape(str(example.get('prompt') or example.get('caption') or 'video'))}\">")
    meta = " · ".join(html.escape(str(example[k])) for k in ("id", "split") if example.get(k) is not None)
    if example.get("ok") is not None:
        ok = bool(example["ok"])
        meta += f" <span class=\"badge {'ok' if ok else 'bad'}\">{'all correct' if ok else 'wrong'}</span>"
    lines = [f"<div class=\"meta\">{meta}</div>"]
    for key, label in FIELD_LABELS:
        if example.get(key) is None:
            continue
        text = describe_objects(example[key]) if key in ("reading", "parsed", "truth") else str(example[key])
        lines.append(f"<div class=\"lab\">{label}</div><p>{html.escape(text)}</p>")
    return f"<div class=\"card\">{img}<div class=\"text\">{''.join(lines)}</div></div>"


def render_html(metrics: Mapping, examples: Mapping[str, Sequence[Mapping]] | None = None,
                title: str = "univigu evaluation", fps: float = 8, scale: int = 4) -> str:
    """The report page as one self-contained HTML string."""
    meta = metrics.get("meta", {})
    splits = {k: v for k, v in metrics.items() if k != "meta" and isinstance(v, Mapping)}
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    sub = [f"{k}: {v}" for k, v in meta.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)]
    if sub:
        parts.append(f"<p class=\"sub\">{html.escape(' · '.join(sub))}</p>")
    parts.append(_headline(splits))
    parts.append("<h2>Metrics</h2><p class=\"sub\">Rates in percent with 95% Wilson intervals; per-attribute "
                 "rates are over objects, all-correct over samples. Caption metrics on pycocoevalcap's scale.</p>")
    parts.append(_metrics_table(splits))
    notes = list(meta.get("notes", [])) + [f"{k}: {v}" for k, v in meta.get("unavailable", {}).items()]
    if notes:
        parts.append("<ul class=\"notes\">" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>")
    for task, items in (examples or {}).items():
        if not items:
            continue
        heading, blurb = TASK_TITLES.get(task, (task, ""))
        parts.append(f"<h2 id=\"{html.escape(task)}\">{html.escape(heading)}</h2><p class=\"sub\">{html.escape(blurb)}"
                     f" Showing {len(items)} samples.</p>")
        parts.append("<div class=\"grid\">" + "".join(_card(ex, fps, scale) for ex in items) + "</div>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_report(out_dir: str | Path, metrics: Mapping, examples: Mapping[str, Sequence[Mapping]] | None = None,
                 title: str = "univigu evaluation", fps: float = 8, scale: int = 4) -> dict[str, Path]:
    """Write `metrics.json` and `report.html` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "metrics.json", out_dir / "report.html"
    atomic_write_text(json_path, json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n")
    atomic_write_text(html_path, render_html(metrics, examples, title=title, fps=fps, scale=scale))
    return {"json": json_path, "html": html_path}
