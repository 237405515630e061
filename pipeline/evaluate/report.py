"""A single self-contained ``report.html``: headline numbers, per-class table, confusion matrix, plots.

No JavaScript, no external resources (the report is opened on plant PCs without internet); images are
embedded as base64 and every piece of text goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.metadata import write_json_atomic

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
         ".gif": "image/gif", ".webp": "image/webp"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d2330;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde1e8;
padding-bottom:.3rem}.sub{color:#5b6475;font-size:.9rem}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}
.card{border:1px solid #dde1e8;border-radius:8px;padding:.7rem 1rem;min-width:150px;background:#f8f9fb}
.card .v{font-size:1.5rem;font-weight:600}.card .k{font-size:.8rem;color:#5b6475}
.card .n{font-size:.75rem;color:#5b6475}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #dde1e8;padding:.3rem .6rem;text-align:right}
th{background:#eef1f5}td.l,th.l{text-align:left}
.warn{background:#fff4e5;border:1px solid #f0c36d;border-radius:6px;padding:.5rem .8rem}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #dde1e8;border-radius:4px}
figcaption{font-size:.8rem;color:#5b6475}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, pct: bool = False, digits: int = 4) -> str:
    """Numbers for humans; '—' for undefined."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.1%}" if pct else f"{x:.{digits}g}"
    if isinstance(x, (dict, list)):
        return json.dumps(x, default=str)
    return str(x)


def _card(key: str, value: str, note: str = "") -> str:
    n = f'<div class="n">{_e(note)}</div>' if note else ""
    return f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{_e(value)}</div>{n}</div>'


def _headline(m: dict[str, Any]) -> str:
    thr_note = {"given": "fixed before this evaluation", "chosen_on_this_data": "chosen on this data"}.get(
        m.get("threshold_source", ""), "")
    frr, target = m.get("false_reject_rate"), m.get("target_frr")
    frr_note = f"at FRR {_fmt(frr, pct=True)} (target {_fmt(target, pct=True)}"
    frr_note += ", above target)" if (frr is not None and target is not None and frr > target) else ")"
    cards = [
        _card("balanced accuracy", _fmt(m.get("balanced_accuracy"), pct=True), "mean recall over classes"),
        _card("defect recall at threshold", _fmt(m.get("defect_recall_at_frr"), pct=True),
              frr_note),
        _card("operating threshold", _fmt(m.get("threshold")), thr_note),
        _card("AUROC", _fmt(m.get("auroc"))),
        _card("accuracy", _fmt(m.get("accuracy"), pct=True)),
        _card("images", _fmt(m.get("n_images")), f"{_fmt(m.get('n_good'))} good, {_fmt(m.get('n_defect'))} defect"),
    ]
    return '<div class="cards">' + "".join(cards) + "</div>"


def _binary_table(m: dict[str, Any]) -> str:
    rows = [
        ("threshold (reject when score ≥ threshold)", _fmt(m.get("threshold"))),
        ("threshold source", _fmt(m.get("threshold_source"))),
        ("target false-reject rate", _fmt(m.get("target_frr"), pct=True)),
        ("false-reject rate at threshold", _fmt(m.get("false_reject_rate"), pct=True)),
        ("false rejects (good parts rejected)", _fmt(m.get("false_rejects"))),
        ("defect recall at threshold", _fmt(m.get("defect_recall_at_frr"), pct=True)),
        ("missed defects", _fmt(m.get("missed_defects"))),
        ("FRR resolution (1 / good images)", _fmt(m.get("frr_resolution"), pct=True)),
        ("good parts that may be rejected at target", _fmt(m.get("allowed_false_rejects"))),
        ("oracle recall at target FRR (optimistic)", _fmt(m.get("defect_recall_at_target_frr_oracle"), pct=True)),
        ("oracle threshold", _fmt(m.get("oracle_threshold"))),
    ]
    body = "".join(f'<tr><td class="l">{_e(k)}</td><td>{_e(v)}</td></tr>' for k, v in rows)
    note = m.get("oracle_note")
    return f"<table>{body}</table>" + (f'<p class="sub">{_e(note)}</p>' if note else "")


def _per_class_table(m: dict[str, Any]) -> str:
    per = m.get("per_class") or {}
    rej = m.get("reject_rate_per_class") or {}
    good = m.get("good_class")
    head = ('<tr><th class="l">class</th><th>support</th><th>precision</th><th>recall</th><th>F1</th>'
            '<th>rejected at threshold</th></tr>')
    rows = []
    for name, r in per.items():
        label = f"{name} (good)" if name == good else name
        rows.append(f'<tr><td class="l">{_e(label)}</td><td>{_e(_fmt(r.get("support")))}</td>'
                    f'<td>{_e(_fmt(r.get("precision"), pct=True))}</td><td>{_e(_fmt(r.get("recall"), pct=True))}</td>'
                    f'<td>{_e(_fmt(r.get("f1"), pct=True))}</td><td>{_e(_fmt(rej.get(name), pct=True))}</td></tr>')
    return f"<table>{head}{''.join(rows)}</table>"


def _confusion_table(m: dict[str, Any]) -> str:
    classes, cm = m.get("classes") or [], m.get("confusion_matrix") or []
    if not classes or not cm:
        return ""
    head = '<tr><th class="l">true \\ predicted</th>' + "".join(f"<th>{_e(c)}</th>" for c in classes) + "</tr>"
    rows = "".join(f'<tr><th class="l">{_e(c)}</th>' + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>"
                   for c, row in zip(classes, cm))
    return f"<table>{head}{rows}</table>"


def _skipped(m: dict[str, Any], limit: int = 200) -> str:
    skipped = m.get("skipped") or []
    if not skipped:
        return ""
    items = "".join(f'<tr><td class="l">{_e(s.get("path"))}</td><td class="l">{_e(s.get("error"))}</td></tr>'
                    for s in skipped[:limit])
    more = f"<p class='sub'>… and {len(skipped) - limit} more (see metrics.json)</p>" if len(skipped) > limit else ""
    return (f'<h2>Skipped files</h2><p class="warn">{len(skipped)} file(s) could not be read and are not in the '
            f'numbers above.</p><table><tr><th class="l">file</th><th class="l">error</th></tr>{items}</table>{more}')


def _image(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path}: unsupported image type for the report (use one of {sorted(_MIME)})")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{_e(path.stem)}">'
            f"<figcaption>{_e(path.name)}</figcaption></figure>")


def write_report(out_dir: Path, title: str, metrics: dict[str, Any], images: list[Path],
                 extra: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/report.html`` (atomically) and return its path.

    ``images`` are embedded in order; ``extra`` is shown as a key/value table (training wall time,
    backbone, data counts, ...). Missing images raise FileNotFoundError rather than leaving holes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = "".join(_image(Path(p)) for p in images)
    extra_html = ""
    if extra:
        rows = "".join(f'<tr><td class="l">{_e(k)}</td><td class="l">{_e(_fmt(v))}</td></tr>' for k, v in extra.items())
        extra_html = f"<h2>Run details</h2><table>{rows}</table>"
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="sub">Generated {_e(created)}. Defect score = 1 − p({_e(metrics.get("good_class", "good"))}); a part is
rejected when its score ≥ threshold. False-reject rate = share of good parts rejected.</p>
{_headline(metrics)}
{_skipped(metrics)}
<h2>Good / defect decision</h2>
{_binary_table(metrics)}
<h2>Per class</h2>
{_per_class_table(metrics)}
<h2>Confusion matrix (rows: true class, columns: predicted class)</h2>
{_confusion_table(metrics)}
{"<h2>Plots</h2>" + figures if figures else ""}
{extra_html}
</body></html>
"""
    path = out_dir / "report.html"
    write_json_atomic(path, doc)
    return path


def save_metrics(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write metrics as strict JSON (NaN is refused, not written as invalid JSON), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, json.dumps(metrics, indent=2, allow_nan=False))
    return p
