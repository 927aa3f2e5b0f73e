"""The one Markdown table writer and the one mean ± std summary of the project's tables (test.py's console
summary, the README results table, benchmark.py, the shift benchmark, engine.sweep and engine.cv)."""
from __future__ import annotations

import statistics
from typing import Optional, Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[Sequence[str]] = None,
                   pad: bool = False) -> str:
    """A Markdown table; `align`: per column "l" or "r" (right: `---:`); `pad`: columns padded to one width, for
    reading on a console."""
    header = [str(c) for c in header]
    rows = [[str(c) for c in row] for row in rows]
    if pad:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(header), rule, *(line(r) for r in rows)])
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in (align or ["l"] * len(header))) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)])


def summarise(rows: Sequence[dict], skip: Sequence[str] = ("fold", "run_dir")) -> dict[str, tuple[float, float]]:
    """{figure: (mean, sample std (ddof=1; 0 for one row))} over `rows`, for every numeric figure all rows report
    (a figure missing from one row is left out); keys in `skip` are labels, not figures."""
    if not rows:
        return {}
    keys = [k for k in rows[0] if k not in skip and all(k in r for r in rows)]
    out = {}
    for key in keys:
        values = [float(r[key]) for r in rows]
        out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out
