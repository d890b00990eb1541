"""The audit as one self-contained HTML file: no scripts, no network, printable."""

from __future__ import annotations

import json
from html import escape
from typing import Any

from conformance.report.model import column_title

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#1d232a}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.6em 0;width:100%}
th,td{border:1px solid #ccd;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#eef}.match{background:#dff5e1}.weaker,.fail{background:#fbd9d9}
.stronger{background:#dde8fb}.notmeasured,.skipped,.uncovered{background:#f1f1f1}
.pass{background:#dff5e1}.finding{background:#fff1c9}.documented{background:#eef}
code,pre{font:12px ui-monospace,monospace;white-space:pre-wrap;word-break:break-all}
details{margin:.4em 0}.verdict{font-size:1.3em;padding:.4em .8em;display:inline-block}
@media print{details{display:block}details>*{display:block}body{margin:0}}
"""


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    verdict = s["verdict"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>Orvanta isolation audit</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Orvanta isolation audit</h1>",
        f"<p class='verdict {escape(verdict.replace(' ', '-'))}'>{escape(verdict.upper())}: "
        f"{s['cells']} cells, {s['probe_runs']} probe runs, {s['failed']} failed, "
        f"{s['skipped']} skipped, {s['deviations']} deviations</p>",
        f"<p>Generated {escape(report['generated'])} on "
        f"{escape(str(report['host'].get('hostname')))}</p>",
        _table(report),
        _findings(report),
        _deviations(report),
        _failures(report),
        _cells(report),
        _coverage(report),
        "<h2>Host</h2>",
        _kv({k: v for k, v in report["host"].items() if k != "platforms"}),
        _platforms(report),
        "</body></html>",
    ]
    return "\n".join(parts)


def _platforms(report: dict[str, Any]) -> str:
    """Which kernel and cgroup version each platform's cells ran on."""
    rows = "".join(
        f"<tr><td>{escape(r['platform'])}</td><td>{escape(r['kernel'])}</td>"
        f"<td>{escape(r['cgroup'])}</td><td>{escape(', '.join(r['cells']))}</td></tr>"
        for r in report["host"].get("platforms") or []
    )
    head = "<tr><th>platform</th><th>kernel</th><th>cgroup</th><th>cells</th></tr>"
    return f"<h3>Kernel and cgroup version per platform</h3><table>{head}{rows}</table>"


def _table(report: dict[str, Any]) -> str:
    backends = list(report["table"][0]["backends"]) if report["table"] else []
    head = "".join(f"<th>{escape(column_title(report, b))}</th>" for b in backends)
    rows = []
    for row in report["table"]:
        tds = []
        for b in backends:
            c = row["backends"][b]
            cls = c["status"].replace(" ", "")
            probes = ", ".join(f"{k}: {v}" for k, v in c["probes"].items())
            tds.append(
                f"<td class='{cls}' title='{escape(probes)}'>"
                f"documented: <b>{escape(c['documented'])}</b><br>"
                f"measured: <b>{escape(c['measured'])}</b><br><small>{escape(c['status'])}"
                f" · {escape(c['cell'] or 'no cell ran')}</small></td>"
            )
        rows.append(
            f"<tr><th>{escape(row['property'])}<br><small>{escape(row['req'])}</small>"
            f"</th>{''.join(tds)}</tr>"
        )
    return (
        "<h2>Isolation comparison: documented vs measured</h2>"
        f"<table id='comparison'><tr><th>property</th>{head}</tr>{''.join(rows)}</table>"
    )


def _deviations(report: dict[str, Any]) -> str:
    if not report["deviations"]:
        return "<h2>Documentation vs measurement</h2><p>No deviation.</p>"
    rows = []
    for d in report["deviations"]:
        o = d["override"] or {"kind": "fail", "reason": "the expectation does not hold"}
        rows.append(
            f"<tr class='{escape(o['kind'])}'><td>{escape(d['cell'])}</td><td>{escape(d['probe'])}"
            f"</td><td>{escape(d['property'])}</td><td>{escape(d['documented'])}</td>"
            f"<td>{escape(d['expected'])}</td>"
            f"<td>{escape(d['measured'])}</td><td>{escape(o['kind'])}</td>"
            f"<td>{escape(o['reason'])}</td><td><code>{escape(d['evidence'][:400])}</code></td></tr>"
        )
    return (
        "<h2>Documentation vs measurement</h2><table id='deviations'><tr><th>cell</th>"
        "<th>probe</th><th>property</th><th>expected</th><th>measured</th><th>kind</th>"
        f"<th>reason</th><th>evidence</th></tr>{''.join(rows)}</table>"
    )


def _findings(report: dict[str, Any]) -> str:
    if not report["findings"]:
        return ""
    items = "".join(
        f"<li class='finding'><b>{escape(f['cell'])}</b>: {escape(f['finding'])}</li>"
        for f in report["findings"]
    )
    return f"<h2>Findings: the page vs this platform</h2><ul id='findings'>{items}</ul>"


def _failures(report: dict[str, Any]) -> str:
    if not report["failures"]:
        return ""
    items = "".join(
        f"<details open><summary>{escape(f['test'])}</summary><pre>{escape(f['message'])}</pre>"
        "</details>"
        for f in report["failures"]
    )
    return f"<h2>Failures</h2>{items}"


def _cells(report: dict[str, Any]) -> str:
    out = ["<h2>Cells and evidence</h2>"]
    for cell in report["cells"]:
        env = " ".join(f"{k}={v}" for k, v in cell["env"].items()) or "(defaults)"
        rows = "".join(
            f"<tr class='{escape(p['status'])}'><td>{escape(p['probe'])}</td>"
            f"<td>{escape(p['property'])}</td><td>{escape(p['expected'])}</td>"
            f"<td>{escape(p['measured'])}</td><td><code>{escape(p['evidence'])}</code></td></tr>"
            for p in cell["probes"]
        )
        table = (
            (
                f"<table><tr><th>probe</th><th>property</th><th>expected</th><th>measured</th>"
                f"<th>evidence</th></tr>{rows}</table>"
            )
            if rows
            else ""
        )
        out.append(
            f"<details><summary class='{escape(cell['status'])}'><b>{escape(cell['id'])}</b> — "
            f"{escape(cell['status'])} — backend {escape(cell['backend'])}, <code>{escape(env)}"
            f"</code></summary><p>expectation: {escape(cell['expectation'])}</p>{table}"
            f"<p>worker start-up log:</p><pre>{escape(chr(10).join(cell['startup_log']))}</pre>"
            "</details>"
        )
    return "".join(out)


def _coverage(report: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr class='{escape(c['status'])}'><td>{escape(c['req'])}</td><td>{escape(c['text'])}</td>"
        f"<td>{escape(c['status'])}</td><td>{c['tests']}</td></tr>"
        for c in report["coverage"]
    )
    return (
        "<h2>Requirement coverage</h2><table id='coverage'><tr><th>ID</th><th>requirement</th>"
        f"<th>status</th><th>tests</th></tr>{rows}</table>"
    )


def _kv(data: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{escape(str(k))}</th><td><code>{escape(_text(v))}</code></td></tr>"
        for k, v in data.items()
    )
    return f"<table>{rows}</table>"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
