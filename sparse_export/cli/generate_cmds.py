"""`generate`: stream text from a KV-cache deployment folder, or from a model folder on sparse-cpu."""

import sys
from pathlib import Path
from typing import Optional

import typer

from ..runtimes import FOLDER_RUNTIMES, GENERATE_RUNTIMES
from . import options as o
from .app import app


@app.command("generate")
def generate_cmd(
    deploy_dir: Path = typer.Argument(..., help="Folder written by `export onnx --kv-cache`; for sparse-cpu "
                                                "runtimes a model folder (from `prune`)."),
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(64, help="Stop after this many new tokens."),
    runtime: str = typer.Option("deepsparse", help=" | ".join(GENERATE_RUNTIMES + FOLDER_RUNTIMES)),
    greedy: bool = typer.Option(False, "--greedy", help="Take the most likely token (the default)."),
    temperature: Optional[float] = typer.Option(None, help="Sample from softmax(logits / T) instead."),
    seed: int = typer.Option(0, help="Seed for sampling."),
    threads: o.Threads = None,
):
    """Generate text after PROMPT, streaming it as it is produced."""
    from ..errors import UserError
    from ..runtimes.generate import generate_text

    if greedy and temperature is not None:
        raise UserError("choose --greedy or --temperature, not both")
    if temperature is not None and temperature <= 0:
        raise UserError("--temperature must be > 0 (or use --greedy)")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")

    def write(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    if runtime == "deepsparse":  # in a child process: a crash is retried on one thread, else one line
        from ..runtimes.generate import generate_text_isolated

        stats = generate_text_isolated(deploy_dir, prompt, max_new_tokens, runtime, temperature, seed, threads,
                                       log=lambda msg: typer.echo(msg, err=True))
    else:
        if runtime in FOLDER_RUNTIMES:
            from ..runtimes.sparse_cpu.session import generate_folder_text as generate_text
        _, stats = generate_text(deploy_dir, prompt, max_new_tokens, runtime, temperature, seed, threads,
                                 write=write)
    sys.stdout.write("\n")
    rate = stats["decode_tokens_per_s"]
    typer.echo(f"[{stats['runtime']}: {stats['prompt_tokens']} prompt tokens, {stats['new_tokens']} new "
               f"({stats['finish_reason']}); load {stats['load_s']:.1f}s, first token "
               f"{stats['ttft_s'] * 1000:.0f} ms, decode {rate:.1f} tok/s]" if rate else
               f"[{stats['runtime']}: {stats['new_tokens']} new tokens ({stats['finish_reason']})]", err=True)
