"""`export compressed`: a compressed-tensors folder (2:4 or bitmask sparse) for GPU serving stacks."""

from pathlib import Path

import typer

from . import options as o
from .app import export_app


@export_app.command("compressed")
def export_compressed_cmd(
    model_dir: Path = typer.Argument(..., help="A pruned model folder (save_pretrained)."),
    out: Path = typer.Option(..., "--out", help="Output folder (compressed-tensors format)."),
    fmt: str = typer.Option("auto", "--format",
                            help="auto | sparse-24-bitmask | sparse-bitmask | dense (auto: from the measured masks)."),
    force: o.Force = False,
):
    """Write MODEL_DIR in the compressed-tensors format that vLLM and llm-compressor read."""
    from ..export.compressed import export_compressed

    export_compressed(model_dir, out, fmt=fmt, force=force, log=typer.echo)
