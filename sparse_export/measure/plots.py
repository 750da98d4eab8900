"""Bar charts of measured rows (PNG), shared by the prefill and generation benchmarks."""

from pathlib import Path


def bar_chart(rows: list[dict], values: list[float], err: list[list[float]], ylabel: str, title: str,
              path) -> str | Path:
    """PNG bar chart, one bar per row (runtime/model), coloured by runtime, annotated with speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['runtime']}\n{r['model']}" for r in rows]
    colors = {rt: f"C{i}" for i, rt in enumerate(dict.fromkeys(r["runtime"] for r in rows))}
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4))
    bars = ax.bar(range(len(rows)), values, yerr=err, capsize=3, color=[colors[r["runtime"]] for r in rows])
    for b, r in zip(bars, rows):
        if r.get("speedup_vs_baseline"):
            ax.annotate(f"{r['speedup_vs_baseline']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
