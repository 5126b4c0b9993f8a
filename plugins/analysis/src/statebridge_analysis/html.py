"""``statebridge diff A B --html FILE``: the folded diff as one self-contained page (no scripts, no fetched assets).

The page holds what the text does (the counts, then one row per folded pattern, unchanged ones
included), each kind in its own colour, so that a reviewer sees at a glance how much of B is
renamed, merged or missing.  Everything from the checkpoints is escaped.
"""

from __future__ import annotations

from html import escape

from .diff import KINDS, DiffReport, values_text

#: one background per kind: greens settle, blues rename, purples join, oranges change, reds lose
COLOURS = {
    "unchanged": "#eef7ee", "moved": "#e3f0fb", "renamed": "#d6e8fa", "merged": "#ece3f7", "split": "#e5dcf3",
    "transposed": "#fdf0d5", "permuted": "#fce7c8", "values_changed": "#fbd9b0", "dtype_changed": "#fff4c2",
    "shape_changed": "#f9d3d3", "removed": "#f5c2c2", "added": "#d9f2e6",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.key { font-family: ui-monospace, monospace; }
td.num { text-align: right; }
""" + "".join(f"tr.{kind} td {{ background: {colour}; }}\n" for kind, colour in COLOURS.items())


def render_html(report: DiffReport) -> str:
    """The page: title, the counts by kind, and the folded rows by kind (in :data:`KINDS` order, then first seen)."""
    counts = report.counts()
    rows = report.folded()
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>statebridge diff: {escape(report.a)} -> {escape(report.b)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>statebridge diff</h1><p>A: <code>{escape(report.a)}</code><br>B: <code>{escape(report.b)}</code></p>",
        "<h2>Counts</h2><table><tr><th>kind</th><th>keys</th></tr>",
    ]
    out += [f'<tr class="{kind}"><td>{kind.replace("_", " ")}</td><td class="num">{n}</td></tr>' for kind, n in counts.items() if n]
    out.append("</table>")
    out.append("<h2>Patterns</h2><table><tr><th>kind</th><th>A</th><th>B</th><th>keys</th><th>detail</th></tr>")
    for kind in KINDS:
        for row in (r for r in rows if r["kind"] == kind):
            extra = [row["detail"]] if row["detail"] else []
            if "confidence" in row:
                extra.append(f"confidence {row['confidence']:.2f}")
            if "cosine" in row:
                extra.append(values_text(row["max_abs_diff"], row["cosine"]))
            out.append(
                f'<tr class="{kind}"><td>{kind.replace("_", " ")}</td><td class="key">{escape(row["a"])}</td>'
                f'<td class="key">{escape(row["b"])}</td><td class="num">{row["count"]}</td><td>{escape("; ".join(extra))}</td></tr>'
            )
    out.append("</table></body></html>\n")
    return "\n".join(out)
