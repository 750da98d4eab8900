"""`serve`: an OpenAI-compatible HTTP server on a model folder (sparse-cpu, continuous batching)."""

from pathlib import Path
from typing import Optional

import typer

from . import options as o
from .app import app


@app.command("serve")
def serve_cmd(
    model_dir: Path = typer.Argument(..., help="Model folder (from `prune`; dense with --wbits 8 too)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    max_batch: int = typer.Option(8, help="Sequences decoded together (slots)."),
    max_context: Optional[int] = typer.Option(None, help="Tokens per sequence, prompt + generated "
                                                         "(default: the model's positions)."),
    threads: o.Threads = None,
    api_key: Optional[str] = typer.Option(None, help="Require `Authorization: Bearer KEY` on /v1 "
                                                     "(default: $SPARSE_EXPORT_API_KEY if set).",
                                          envvar="SPARSE_EXPORT_API_KEY"),
    runtime: str = typer.Option("sparse-cpu", help="sparse-cpu | sparse-cpu-dense"),
    max_queue: int = typer.Option(64, help="Requests that may wait for a slot; more get 429."),
    kv_budget: Optional[float] = typer.Option(None, help="GiB for all KV caches together; requests beyond it "
                                                         "wait (default: max-batch full contexts)."),
    name: Optional[str] = typer.Option(None, help="Model id in the API (default: the folder's name)."),
    shutdown_timeout: float = typer.Option(30.0, help="Seconds to finish in-flight requests after SIGTERM."),
    log_level: str = typer.Option("info", help="uvicorn's log level (debug also logs each request)."),
):
    """Serve MODEL_DIR over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions), /health, /metrics."""
    from ..serve.server import ServeOptions, serve

    return serve(ServeOptions(model_dir, host, port, max_batch, max_context, threads, api_key, runtime, max_queue,
                              kv_budget, name, shutdown_timeout, log_level))
