"""The HTML report of a run: one self-contained file a person can open anywhere.

A timeline of every operation (x: when it was invoked, y: its latency on a log
scale), coloured by outcome (ok green, fail orange, info red; calls that never
completed sit on the top line), over shaded fault windows, with the leader
changes marked; below it, throughput per second by outcome. Inline SVG and a
few lines of JS (toggling outcomes) — no network access, no dependencies.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from kvstore.jepsen.history import INFO, Operation, load_jsonl
from kvstore.jepsen.recorder import Fault, load_faults

COLORS = {"ok": "#2e9d4a", "fail": "#e08a1e", "info": "#d7263d"}
FAULT_COLORS = {"partition": "#4a78c2", "kill": "#c2374a", "pause": "#8a4ac2", "power": "#d08a1a", "clock": "#2a9d8f"}
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 1100, 380, 60, 20, 20, 40
BAR_HEIGHT = 120


def _x(t: float, t_max: float) -> float:
    return LEFT + (WIDTH - LEFT - RIGHT) * (t / t_max if t_max > 0 else 0)


def timeline_svg(ops: list[Operation], faults: list[Fault], leaders: list[dict[str, Any]],
                 t0: float) -> str:
    """The latency scatter over fault windows (times in ns on the run clock)."""
    def sec(ns: float) -> float:
        return (ns - t0) / 1e9

    ends = [sec(op.complete_time) for op in ops if op.complete_time is not None]
    t_max = max([*ends, *(sec(op.invoke_time) for op in ops), *(sec(f.end or f.start) for f in faults), 1.0])
    latencies = [max((op.complete_time - op.invoke_time) / 1e6, 0.01)
                 for op in ops if op.complete_time is not None]
    top_ms = max([*latencies, 10.0]) * 1.5
    lo, hi = math.log10(0.1), math.log10(top_ms)
    plot_bottom = HEIGHT - BOTTOM

    def y(ms: float) -> float:
        v = (math.log10(max(ms, 0.1)) - lo) / (hi - lo)
        return plot_bottom - v * (plot_bottom - TOP - 14)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" class="timeline">']
    for fault in faults:
        x1 = _x(sec(fault.start), t_max)
        x2 = _x(sec(fault.end) if fault.end is not None else t_max, t_max)
        color = FAULT_COLORS.get(fault.kind, "#888")
        parts.append(f'<rect x="{x1:.1f}" y="{TOP}" width="{max(x2 - x1, 1):.1f}" '
                     f'height="{plot_bottom - TOP}" fill="{color}" opacity="0.13">'
                     f'<title>{html.escape(fault.description)}</title></rect>')
        parts.append(f'<text x="{x1 + 3:.1f}" y="{TOP + 10}" font-size="10" fill="{color}">'
                     f'{html.escape(fault.kind)}</text>')
    # Axes and grid: decades of latency, and seconds.
    decade = math.floor(lo)
    while decade <= hi:
        ms = 10 ** decade
        if ms >= 0.1:
            yy = y(ms)
            label = f"{ms:g} ms" if ms < 1000 else f"{ms / 1000:g} s"
            parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{yy:.1f}" y2="{yy:.1f}" '
                         f'stroke="#ddd"/><text x="{LEFT - 4}" y="{yy + 3:.1f}" font-size="10" '
                         f'text-anchor="end">{label}</text>')
        decade += 1
    step = max(1, round(t_max / 12))
    for s in range(0, int(t_max) + 1, step):
        xx = _x(s, t_max)
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{plot_bottom}" y2="{plot_bottom + 4}" '
                     f'stroke="#333"/><text x="{xx:.1f}" y="{plot_bottom + 16}" font-size="10" '
                     f'text-anchor="middle">{s}s</text>')
    parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{plot_bottom}" y2="{plot_bottom}" stroke="#333"/>')
    parts.append(f'<text x="{LEFT}" y="{TOP + 3}" font-size="10" fill="#777">never completed</text>')
    for entry in leaders:
        xx = _x(entry["time_s"], t_max)
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{TOP}" y2="{plot_bottom}" stroke="#444" '
                     f'stroke-dasharray="3,3"><title>leader n{entry["node"]} (term {entry["term"]})'
                     f'</title></line><text x="{xx + 2:.1f}" y="{plot_bottom - 4}" font-size="9" '
                     f'fill="#444">n{entry["node"]}</text>')
    for op in ops:
        xx = _x(sec(op.invoke_time), t_max)
        if op.complete_time is None:
            yy, latency = TOP + 2, "never completed"
        else:
            ms = (op.complete_time - op.invoke_time) / 1e6
            yy, latency = y(ms), f"{ms:.1f} ms"
        tip = html.escape(f"{op} — {latency}, invoked at {sec(op.invoke_time):.3f}s")
        parts.append(f'<circle class="op {op.outcome}" cx="{xx:.1f}" cy="{yy:.1f}" r="2.2" '
                     f'fill="{COLORS.get(op.outcome, "#000")}" fill-opacity="0.7">'
                     f'<title>{tip}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def throughput_svg(ops: list[Operation], faults: list[Fault], t0: float) -> str:
    """Completions per second, stacked by outcome."""
    buckets: dict[int, dict[str, int]] = {}
    t_max = 1.0
    for op in ops:
        t = ((op.complete_time if op.complete_time is not None else op.invoke_time) - t0) / 1e9
        t_max = max(t_max, t)
        buckets.setdefault(int(t), {}).setdefault(op.outcome, 0)
        buckets[int(t)][op.outcome] += 1
    for fault in faults:
        t_max = max(t_max, ((fault.end or fault.start) - t0) / 1e9)
    peak = max([sum(b.values()) for b in buckets.values()] or [1])
    h = BAR_HEIGHT
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h + 30}" '
             f'viewBox="0 0 {WIDTH} {h + 30}" class="throughput">']
    for fault in faults:
        x1 = _x((fault.start - t0) / 1e9, t_max)
        x2 = _x(((fault.end or t0 + t_max * 1e9) - t0) / 1e9, t_max)
        parts.append(f'<rect x="{x1:.1f}" y="0" width="{max(x2 - x1, 1):.1f}" height="{h}" '
                     f'fill="{FAULT_COLORS.get(fault.kind, "#888")}" opacity="0.13"/>')
    width = max(_x(1, t_max) - _x(0, t_max) - 1, 1)
    for second, counts in sorted(buckets.items()):
        base: float = h
        for outcome in ("ok", "fail", "info"):
            n = counts.get(outcome, 0)
            if not n:
                continue
            bar = n / peak * (h - 10)
            base -= bar
            parts.append(f'<rect class="op {outcome}" x="{_x(second, t_max):.1f}" y="{base:.1f}" '
                         f'width="{width:.1f}" height="{bar:.1f}" fill="{COLORS[outcome]}">'
                         f'<title>{second}s: {n} {outcome}</title></rect>')
    parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{h}" y2="{h}" stroke="#333"/>'
                 f'<text x="{LEFT - 4}" y="14" font-size="10" text-anchor="end">{peak}/s</text>'
                 f'<text x="{LEFT - 4}" y="{h}" font-size="10" text-anchor="end">0</text></svg>')
    return "".join(parts)


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } .valid { color: #2e9d4a; } .invalid { color: #d7263d; }
table { border-collapse: collapse; margin: 8px 0 16px; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
pre { background: #f6f6f6; padding: 10px; overflow: auto; max-height: 420px; }
.legend span { margin-right: 14px; } .dot { display: inline-block; width: 10px; height: 10px; border-radius: 5px; }
.hidden-ok .op.ok, .hidden-fail .op.fail, .hidden-info .op.info { display: none; }
"""

_SCRIPT = """
for (const box of document.querySelectorAll('input[data-outcome]')) {
  box.addEventListener('change', () =>
    document.body.classList.toggle('hidden-' + box.dataset.outcome, !box.checked));
}
"""


def render(summary: dict[str, Any], verdict: dict[str, Any], ops: list[Operation],
           faults: list[Fault]) -> str:
    t0 = summary.get("start_time") or min([op.invoke_time for op in ops] or [0])
    valid = verdict.get("valid")
    title = f"kvstore jepsen — {summary.get('workload')} / {summary.get('nemesis')}"
    counts = summary.get("ops", {})
    rows = "".join(
        f"<tr><td>{html.escape(f)}</td>" + "".join(f"<td>{c.get(k, 0)}</td>" for k in ("ok", "fail", "info"))
        + "</tr>" for f, c in summary.get("ops_by_function", {}).items())
    fault_rows = "".join(
        f"<tr><td>{f.get('start_s', '')}</td><td>{f.get('end_s', '')}</td><td>{html.escape(f['kind'])}</td>"
        f"<td>{html.escape(f['description'])}</td></tr>" for f in summary.get("faults", []))
    leaders = ", ".join(f"n{e['node']} (term {e['term']}, {e['time_s']}s)" for e in summary.get("leaders", []))
    legend = "".join(
        f'<span><label><input type="checkbox" data-outcome="{k}" checked> '
        f'<span class="dot" style="background:{c}"></span> {k}</label></span>' for k, c in COLORS.items())
    legend += "".join(f'<span><span class="dot" style="background:{c};opacity:.4"></span> {k}</span>'
                      for k, c in FAULT_COLORS.items())
    explanation = verdict.get("explanation") or json.dumps(
        {k: v for k, v in verdict.items() if k not in ("valid", "summary")}, indent=2, default=str)
    never = sum(1 for op in ops if op.complete_time is None and op.outcome == INFO)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="{'valid' if valid else 'invalid'}"><b>{'VALID' if valid else 'NOT VALID'}</b>:
{html.escape(str(verdict.get('summary', '')))}</p>
<p>{summary.get('nodes')} nodes, {summary.get('time')} s, network {html.escape(str(summary.get('network')))},
seed {summary.get('seed')}{(', server flags ' + html.escape(' '.join(summary['server_args']))) if summary.get('server_args') else ''}.
{counts.get('total', 0)} operations: {counts.get('ok', 0)} ok, {counts.get('fail', 0)} fail,
{counts.get('info', 0)} info ({never} never completed). {summary.get('faults_injected', 0)} faults,
{summary.get('leader_changes', 0)} leader changes.</p>
<div class="legend">{legend}</div>
<h2>Latency by invocation time</h2>
{timeline_svg(ops, faults, summary.get('leaders', []), t0)}
<h2>Completions per second</h2>
{throughput_svg(ops, faults, t0)}
<h2>Operations</h2>
<table><tr><th>function</th><th>ok</th><th>fail</th><th>info</th></tr>{rows}</table>
<h2>Faults</h2>
<table><tr><th>start (s)</th><th>end (s)</th><th>kind</th><th>what</th></tr>{fault_rows}</table>
<p>Leaders: {html.escape(leaders) or 'none observed'}</p>
<h2>Verdict</h2>
<pre>{html.escape(explanation)}</pre>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_report(run_dir: str | Path) -> Path:
    """Render ``report.html`` from the files of a run directory."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    verdict = json.loads((run_dir / "verdict.json").read_text())
    ops = load_jsonl(run_dir / "history.jsonl")
    faults_path = run_dir / "faults.jsonl"
    faults = load_faults(faults_path) if faults_path.exists() else []
    out = run_dir / "report.html"
    out.write_text(render(summary, verdict, ops, faults), encoding="utf-8")
    return out
