"""Typer options shared by several commands, declared once.

Recipe options default to None ("not set"): the command passes only what the user set, and the
defaults live in one place (pruning.recipe.Recipe, targets.options); help texts show them.
"""

from typing import Annotated, List, Optional

import typer

from ..pruning.pruners import PRUNERS
from ..pruning.recipe import Recipe

_R = Recipe()


def _opt(help: str, *decls: str):
    return typer.Option(*decls, help=help, show_default=False)


def _default(value) -> str:
    return f" (default: {value})"


# ---- the recipe: `prune` and `prune-and-export`
Method = Annotated[Optional[str], _opt(" | ".join(PRUNERS) + _default(_R.method))]
Sparsity = Annotated[Optional[float], _opt("Fraction of weights pruned (unstructured)" + _default(_R.sparsity))]
Pattern = Annotated[Optional[str], _opt("n:m semi-structured pattern, e.g. 2:4 (overrides --sparsity).")]
Calib = Annotated[Optional[str], _opt("wikitext2 | c4 | file.txt | file.jsonl | self" + _default(_R.calib))]
NSamples = Annotated[Optional[int], _opt("Calibration windows" + _default(_R.nsamples))]
SeqLen = Annotated[Optional[int], _opt("Tokens per calibration window" + _default(_R.seqlen))]
Seed = Annotated[Optional[int], _opt("Seed of the calibration sample" + _default(_R.seed))]
Blocksize = Annotated[Optional[int], _opt("Columns per lazy-update block" + _default(_R.blocksize))]
Dampening = Annotated[Optional[float], _opt("Hessian dampening, fraction of its mean diagonal"
                                            + _default(_R.dampening))]
Ignore = Annotated[Optional[List[str]], _opt("Regex of module names to leave dense (repeatable).")]
WBits = Annotated[Optional[int], _opt("Also quantize kept weights to this many bits, in the same sweep.")]
GroupSize = Annotated[Optional[int], _opt("With --wbits: one scale per row and group of this many input columns "
                                          "(a power of two >= 32, dividing every matrix's input width), e.g. "
                                          "--wbits 4 --group-size 128; default: per-row scales.")]
ClipSearch = Annotated[Optional[bool], _opt("With --group-size: each group scale the best of a few clipped ranges "
                                            "(least rounding error, weighted by what each column costs the "
                                            "layer's output), not the group's largest weight (default: on).",
                                            "--clip-search/--no-clip-search")]
PerChannel = Annotated[Optional[bool], _opt("Quantization scale granularity (default: per-channel).",
                                            "--per-channel/--per-tensor")]
Allocation = Annotated[Optional[str], _opt("Per-layer sparsity: uniform | owl (layers with more activation "
                                          "outliers keep more weights; unstructured only)" + _default(_R.allocation))]
OwlThreshold = Annotated[Optional[float], _opt("OWL: a score |W| x ||X|| is an outlier above this many times its "
                                               "layer's mean" + _default(_R.owl_threshold))]
OwlLambda = Annotated[Optional[float], _opt("OWL: layer sparsities span --sparsity +- this"
                                            + _default(_R.owl_lambda))]
AlpsIters = Annotated[Optional[int], _opt("ALPS: most ADMM iterations per layer" + _default(_R.alps_iters))]
AlpsRho = Annotated[Optional[float], _opt("ALPS: first ADMM penalty rho" + _default(_R.alps_rho))]
AlpsRhoGrowth = Annotated[Optional[float], _opt("ALPS: rho is multiplied by this each iteration"
                                                + _default(_R.alps_rho_growth))]
AlpsCgIters = Annotated[Optional[int], _opt("ALPS: conjugate-gradient refit iterations" + _default(_R.alps_cg_iters))]
Smooth = Annotated[Optional[float], _opt("SmoothQuant alpha in (0, 1]: move activation outliers into the weights "
                                         "before pruning, for an accurate --int8 graph (default: off)")]

# ---- block-wise recovery (recovery/blockwise.py): `prune`
Recover = Annotated[Optional[str], _opt("none | blockwise: after each layer is pruned, train its kept weights to "
                                        "reproduce the dense layer's outputs, every zero kept (default: none); "
                                        "prune-and-export also takes distill: after the prune the whole pruned "
                                        "model learns from the dense one (`sparse-export recover`)")]
RecoverEpochs = Annotated[Optional[int], _opt("--recover blockwise: passes over the calibration samples per layer "
                                              "(default: 2)")]
RecoverLr = Annotated[Optional[float], _opt("--recover: learning rate (default: blockwise 3e-4, distill 1e-4)")]
RecoverBatch = Annotated[Optional[int], _opt("--recover blockwise: calibration samples per step (default: 2)")]
RecoverTarget = Annotated[Optional[str], _opt("--recover blockwise: dense-chain (the dense model's own hidden "
                                              "states) | local (the dense layer on the pruned inputs) "
                                              "(default: dense-chain)")]

# ---- common to several commands
Threads = Annotated[Optional[int], _opt("Threads (default: all cores).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")]


def recipe_given(**values) -> dict:
    """The recipe options the user set (None: not set)."""
    out = {k: v for k, v in values.items() if v is not None}
    if "ignore" in out:
        out["ignore"] = list(out["ignore"])
    return out

# ---- running layer by layer: `prune` and `eval`
Device = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N | auto (cuda when present).")]
Stream = Annotated[Optional[bool], _opt("Read and write one decoder layer at a time from the safetensors shards "
                                        "(default: for local safetensors folders).", "--stream/--no-stream")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted streamed prune from its last "
                                                      "finished layer.")]
Offload = Annotated[Optional[str], _opt("Folder for hidden states past --activation-budget "
                                        "(default: the work folder beside --out).")]
ActivationBudget = Annotated[Optional[float], _opt("GiB of hidden states kept in RAM before they go to a file "
                                                   "(default: 2).")]


def budget_bytes(gib: float | None) -> int:
    """--activation-budget in bytes (the default when not set)."""
    from ..layerwise import ACTIVATION_BUDGET

    return ACTIVATION_BUDGET if gib is None else int(gib * 2**30)
