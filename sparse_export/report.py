"""report.md + report.json in an output folder, shared by every prune-and-export target."""

import time
from pathlib import Path

from .jobs import format_table as table  # noqa: F401  (markdown tables: table(rows, [(header, key)]))
from .outputs import write_json

REPORT_MD = "report.md"
REPORT_JSON = "report.json"


def write_report(folder, title, sections, data, plot=None):
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


def fmt(x, spec=".3g", none="n/a"):
    """A number for a report cell; `none` for missing values."""
    return none if x is None else format(x, spec)
