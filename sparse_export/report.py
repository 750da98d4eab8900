"""report.md + report.json in an output folder (shared by every prune-and-export target), and markdown tables."""

import time
from pathlib import Path

from .outputs import write_json

REPORT_MD = "report.md"
REPORT_JSON = "report.json"


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain markdown table from dicts; columns are (header, key)."""
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, key in columns:
            v = r.get(key, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(folder, title: str, sections: list[tuple[str, str]], data: dict, plot: str | None = None) -> Path:
    """Write report.md and report.json into `folder`.

    sections: [(heading, markdown body)], in order.
    data:     everything measured, JSON-able -> report.json.
    plot:     file name of a PNG inside `folder`, shown at the end of report.md.
    """
    folder = Path(folder)
    lines = [f"# {title}", "", f"_Written {time.strftime('%Y-%m-%d %H:%M:%S %z')} by sparse-export._", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body.strip(), ""]
    if plot:
        lines += ["## Latency", "", f"![latency]({plot})", ""]
    (folder / REPORT_MD).write_text("\n".join(lines))
    write_json(folder / REPORT_JSON, data)
    return folder / REPORT_MD


def fmt(x, spec: str = ".3g", none: str = "n/a") -> str:
    """A number for a report cell; `none` for missing values."""
    return none if x is None else format(x, spec)
