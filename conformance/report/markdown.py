"""The audit as Markdown, short enough for a pull-request comment."""

from __future__ import annotations

from typing import Any

from conformance.report.model import column_title

ICON = {"match": "✅", "weaker": "❌", "stronger": "🟦", "not measured": "⚪"}


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    verdict = {"pass": "✅ PASS", "fail": "❌ FAIL"}.get(s["verdict"], "⚠️ COULD NOT RUN")
    lines = [
        f"## Orvanta isolation audit: {verdict}",
        "",
        f"{s['cells']} cells, {s['probe_runs']} probe runs, {s['failed']} failed, "
        f"{s['skipped']} skipped, {s['deviations']} documented deviations/findings "
        f"— {report['host'].get('kernel', '')} on `{report['host'].get('hostname', '')}`, "
        f"{report['generated']}",
        "",
        *platform_lines(report),
        "### Isolation comparison: documented → measured",
        "",
        *table_lines(report),
    ]
    if report["failures"]:
        lines += ["", "### Failures", ""]
        for f in report["failures"][:20]:
            first = f["message"].strip().splitlines()[-1] if f["message"].strip() else ""
            lines.append(f"- `{f['test']}`: {first[:300]}")
    if report["deviations"]:
        lines += [
            "",
            "### Documentation vs measurement",
            "",
            "| cell | probe | page says | expected here | measured | kind | reason |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in report["deviations"]:
            o = d["override"] or {"kind": "failure", "reason": "does not hold"}
            lines.append(
                f"| {d['cell']} | {d['probe']} | {d['documented']} | {d['expected']} | "
                f"{d['measured']} | "
                f"{o['kind']} | {o['reason'][:160]} |"
            )
    if report["findings"]:
        lines += ["", "### Findings: the page vs this platform", ""]
        lines += [f"- **{f['cell']}**: {f['finding']}" for f in report["findings"]]
    uncovered = [c["req"] for c in report["coverage"] if c["status"] == "uncovered"]
    covered = len(report["coverage"]) - len(uncovered)
    lines += [
        "",
        f"Requirement coverage: {covered}/{len(report['coverage'])} SPEC IDs cited by "
        f"tests" + (f"; uncovered: {', '.join(uncovered)}" if uncovered else ""),
        "",
    ]
    return "\n".join(lines)


def table_lines(report: dict[str, Any]) -> list[str]:
    """The page's table with the measured value beside the documented one, per backend."""
    lines = [
        "| property | " + " | ".join(column_title(report, b) for b in _backends(report)) + " |",
        "|---|" + "---|" * len(_backends(report)),
    ]
    for row in report["table"]:
        cells = []
        for backend in _backends(report):
            b = row["backends"][backend]
            cells.append(f"{ICON[b['status']]} {b['documented']} → {b['measured']}")
        lines.append(f"| {row['property']} ({row['req']}) | " + " | ".join(cells) + " |")
    return lines


def _backends(report: dict[str, Any]) -> list[str]:
    return list(report["table"][0]["backends"]) if report["table"] else []


def platform_lines(report: dict[str, Any]) -> list[str]:
    """Which kernel and cgroup version each platform's cells ran on."""
    rows = report["host"].get("platforms") or []
    if not rows:
        return []
    lines = ["| platform | kernel | cgroup | cells |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['platform']} | {row['kernel']} | {row['cgroup']} | {len(row['cells'])} |"
        )
    return [*lines, ""]
