"""The ``--report FILE`` of ``gradeflow rules try``: one self-contained HTML file, charts as inline SVG.

No script, no stylesheet or font from elsewhere: the file opens offline and can be mailed as it is.
"""

from __future__ import annotations

from collections import Counter
from html import escape
from pathlib import Path

BAR_W, BAR_GAP, CHART_H = 44, 14, 160


def bars(grades: list[str], counts: Counter[str]) -> str:
    """An SVG bar chart of customers per grade, with counts and shares."""
    total = sum(counts.values()) or 1
    top = max([counts[g] for g in grades] + [1])
    width = len(grades) * (BAR_W + BAR_GAP) + BAR_GAP
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {CHART_H + 40}" width="{width}" '
             f'height="{CHART_H + 40}" role="img" aria-label="customers per grade">']
    for i, grade in enumerate(grades):
        n = counts[grade]
        h = round(CHART_H * n / top)
        x = BAR_GAP + i * (BAR_W + BAR_GAP)
        parts.append(f'<rect x="{x}" y="{CHART_H - h + 14}" width="{BAR_W}" height="{h}" fill="#2855d8">'
                     f'<title>{escape(grade)}: {n}</title></rect>')
        parts.append(f'<text x="{x + BAR_W / 2}" y="{CHART_H - h + 10}" text-anchor="middle">{n}</text>')
        parts.append(f'<text x="{x + BAR_W / 2}" y="{CHART_H + 28}" text-anchor="middle">{escape(grade)} '
                     f'({100 * n / total:.0f}%)</text>')
    parts.append("</svg>")
    return "".join(parts)


def flow_matrix(old_grades: list[str], new_grades: list[str], moves: Counter[tuple[str, str]]) -> str:
    """An HTML table of customers from each grade (rows: the other ruleset) to each grade (columns: this one),
    shaded by count."""
    top = max(moves.values(), default=1)
    rows = ["<table class=\"flows\"><tr><th>from \\ to</th>" + "".join(f"<th>{escape(g)}</th>" for g in new_grades)
            + "</tr>"]
    for old in old_grades + (["-"] if any(a == "-" for a, _ in moves) else []):
        cells = []
        for new in new_grades:
            n = moves.get((old, new), 0)
            alpha = 0.08 + 0.72 * n / top if n else 0
            cells.append(f'<td style="background: rgba(40,85,216,{alpha:.2f})">{n}</td>')
        rows.append(f"<tr><th>{'new' if old == '-' else escape(old)}</th>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "".join(rows)


def write_report(path: str | Path, title: str, summary: list[str],
                 ladders: list[tuple[str, list[str], Counter[str]]],
                 flows: list[tuple[str, list[str], list[str], Counter[tuple[str, str]]]], against: str | None) -> Path:
    """Write the report: per ladder the distribution, and with ``against`` the from-to flows."""
    out = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>",
           "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>"
           "body{font:15px/1.45 system-ui,sans-serif;color:#1d2330;max-width:1000px;margin:1.5rem auto;padding:0 1rem}"
           "svg text{font-size:11px;fill:#444}table{border-collapse:collapse;margin:.5rem 0 1.5rem}"
           "th,td{border:1px solid #e4e7ec;padding:.3rem .6rem;text-align:right}th{background:#f8f9fb}"
           "pre{background:#f8f9fb;padding:.6rem;overflow-x:auto}</style></head><body>",
           f"<h1>{escape(title)}</h1><pre>{escape(chr(10).join(summary))}</pre>"]
    for name, grades, counts in ladders:
        out.append(f"<h2>Ladder {escape(name)}: customers per grade</h2>{bars(grades, counts)}")
    if against is not None:
        for name, old_grades, new_grades, moves in flows:
            same = sum(n for (a, b), n in moves.items() if a == b)
            out.append(f"<h2>Ladder {escape(name)}: from {escape(against)} (rows) to this ruleset (columns)</h2>"
                       f"<p>{same} unchanged, {sum(moves.values()) - same} move</p>"
                       f"{flow_matrix(old_grades, new_grades, moves)}")
    out.append("</body></html>")
    target = Path(path)
    target.write_text("".join(out), encoding="utf-8")
    return target
