"""How far to trust a timing: was the machine busy with other work while we measured, and how wide
was the spread of the runs. Read from /proc (Linux); missing fields read as unknown, never as quiet."""

import os
import time
from pathlib import Path

# Warn when, during a timed section, other processes kept this share of the machine's cores busy, the
# hypervisor stole this share of CPU time, or a model's p90 run took this many times its fastest run.
BUSY_SHARE, STEAL_SHARE, SPREAD = 0.25, 0.05, 1.5


def _cpu_jiffies() -> tuple[int, int, int] | None:
    """(busy, steal, total) jiffies over all cores since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)          # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return total - idle - steal, steal, total


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system   # children: engines run in child processes


def snapshot() -> dict:
    """The machine's state at the start (or end) of a timed section."""
    try:
        load1 = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        load1 = None
    return {"time": time.monotonic(), "load1": load1, "jiffies": _cpu_jiffies(), "own_cpu_s": _own_cpu_s()}


def trust(before: dict, after: dict, rows: list[dict], spread_of=("p90_ms", "min_ms")) -> dict:
    """What the timed section between two snapshots says about its own numbers.

    others_busy: the share of all cores other processes used (machine CPU time minus ours), steal: the
    share of CPU time the hypervisor took, spread: the largest p90 / min over the rows. `warnings` says
    what passed its threshold; empty means nothing was seen that makes the numbers doubtful.
    """
    ncpu = os.cpu_count() or 1
    wall = max(after["time"] - before["time"], 1e-9)
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = steal = None
    if before["jiffies"] and after["jiffies"]:
        busy = (after["jiffies"][0] - before["jiffies"][0]) / hz
        total = max(after["jiffies"][2] - before["jiffies"][2], 1)
        steal = (after["jiffies"][1] - before["jiffies"][1]) / total
        own = after["own_cpu_s"] - before["own_cpu_s"]
        others = max(busy - own, 0.0) / (wall * ncpu)
    hi, lo = spread_of
    spreads = [r[hi] / r[lo] for r in rows if r.get(hi) and r.get(lo)]
    spread = max(spreads) if spreads else None
    warnings = []
    if others is not None and others > BUSY_SHARE:
        warnings.append(f"other processes kept {others:.0%} of the {ncpu} cores busy while timing")
    if steal is not None and steal > STEAL_SHARE:
        warnings.append(f"the hypervisor stole {steal:.0%} of CPU time while timing")
    if spread is not None and spread > SPREAD:
        warnings.append(f"runs spread widely (p90 up to {spread:.2f}x the fastest run)")
    return {"load1_before": before["load1"], "load1_after": after["load1"], "others_busy": others,
            "steal": steal, "spread_p90_over_min": spread, "cores": ncpu, "wall_s": wall, "warnings": warnings}


def trust_line(t: dict) -> str:
    """One line for a terminal or report: the measurements and, when any, the warning with advice."""
    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"

    facts = (f"load average {t['load1_before']} -> {t['load1_after']}, other processes {pct(t['others_busy'])} "
             f"of {t['cores']} cores, steal {pct(t['steal'])}, spread (p90/min) "
             f"{'n/a' if t['spread_p90_over_min'] is None else format(t['spread_p90_over_min'], '.2f')}")
    if not t["warnings"]:
        return f"Timing conditions: {facts}. Nothing seen that makes these numbers doubtful."
    return (f"WARNING: these timings may be off: {'; '.join(t['warnings'])} ({facts}). Rerun on a quiet "
            f"machine before trusting the speedups.")
