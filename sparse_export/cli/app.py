"""The Typer application; command modules register themselves on `app` / `export_app`."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune causal LMs with SparseGPT, export sparse ONNX / 2:4 checkpoints, "
                       "and measure the speedup.")
export_app = typer.Typer(no_args_is_help=True, help="Export a pruned model folder for a runtime.")
app.add_typer(export_app, name="export")
