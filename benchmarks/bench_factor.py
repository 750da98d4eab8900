"""The Hessian factor SparseGPT needs (upper Cholesky factor of the damped inverse), computed two ways:
`pruners.hessian_inverse_factor` (one Cholesky of the reversed matrix and one triangular inverse) and
the reference's way (Cholesky, cholesky_inverse, Cholesky again), at the input widths of Llama-3-8B
(4096 for q/k/v, o, gate/up; 14336 for down_proj). CPU time of each, one thread by default so that
other work on the machine does not change the figures, and the largest difference between the two.

  python benchmarks/bench_factor.py                 # n = 4096 and 14336, 1 thread
  python benchmarks/bench_factor.py --sizes 2048 --threads 2
"""

import argparse
import json
import time
from pathlib import Path

import torch

from sparse_export.outputs import cpu_name, write_json
from sparse_export.pruning.pruners import hessian_inverse_factor
from sparse_export.report import table

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def reference_factor(H: torch.Tensor, dampening: float = 0.01) -> torch.Tensor:
    """The SparseGPT reference's three steps: factor, invert from the factor, factor the inverse."""
    H = H.clone()
    H.diagonal().add_(dampening * H.diagonal().mean())
    L = torch.linalg.cholesky(H)
    inverse = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(inverse, upper=True)


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 14336])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        X = torch.randn(2 * n, n, generator=g)
        X[:, 1:] += 0.5 * X[:, :-1]                  # correlated inputs, like a layer's
        H = X.t() @ X / X.shape[0]
        del X
        ref, ref_wall, ref_cpu = timed(lambda: reference_factor(H))
        (ours, _), our_wall, our_cpu = timed(lambda: hessian_inverse_factor(H))
        diff = float((ours - ref).abs().max() / ref.abs().max())
        del ref, ours
        rows.append({"n": n, "reference_cpu_s": ref_cpu, "ours_cpu_s": our_cpu, "speedup_cpu": ref_cpu / our_cpu,
                     "reference_wall_s": ref_wall, "ours_wall_s": our_wall, "max_rel_diff": diff})
        print(rows[-1], flush=True)
    cols = [("n", "n"), ("reference CPU s", "reference_cpu_s"), ("ours CPU s", "ours_cpu_s"),
            ("x (CPU)", "speedup_cpu"), ("reference wall s", "reference_wall_s"), ("ours wall s", "ours_wall_s"),
            ("max |diff| / max |U|", "max_rel_diff")]
    text = table(rows, cols)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "factor.json", {"threads": args.threads, "cpu": cpu_name(), "rows": rows})
    (RESULTS / "factor.md").write_text(
        f"# Hessian factor: one Cholesky + triangular inverse vs the reference's three steps\n\n{cpu_name()}, "
        f"{args.threads} thread(s); CPU time is the measure (the machine was shared).\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
