"""`sparse-export serve`: load a model folder on sparse-cpu, start the scheduler, run uvicorn until SIGTERM or
Ctrl-C, then finish what is in flight (up to shutdown_timeout seconds) and return."""

import signal
from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..errors import UserError


@dataclass
class ServeOptions:
    folder: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_context: int | None = None
    threads: int | None = None
    api_key: str | None = None
    runtime: str = "sparse-cpu"
    max_queue: int = 64
    kv_budget_gib: float | None = None
    name: str | None = None
    shutdown_timeout: float = 30.0
    log_level: str = "info"


def build(opts: ServeOptions) -> tuple:
    """(Server, Scheduler) for opts: the model loaded, the scheduler not yet started."""
    from ..runtimes.generate import eos_ids
    from ..runtimes.sparse_cpu.batch import BatchSession
    from ..runtimes.sparse_cpu.session import DecodeSession
    from .api import Server
    from .metrics import Metrics
    from .scheduler import Scheduler

    if opts.runtime not in ("sparse-cpu", "sparse-cpu-dense"):
        raise UserError(f"serve runs on sparse-cpu or sparse-cpu-dense, not '{opts.runtime}'")
    if opts.max_batch < 1 or opts.max_queue < 0:
        raise UserError("--max-batch must be >= 1 and --max-queue >= 0")
    if opts.max_context is not None and opts.max_context < 2:
        raise UserError("--max-context must be at least 2")
    folder = Path(opts.folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a model folder (no config.json); serve runs folders from `prune`")
    session = DecodeSession(folder, opts.runtime, opts.threads)
    budget = None if opts.kv_budget_gib is None else int(opts.kv_budget_gib * 2**30)
    batch = BatchSession(session, opts.max_batch, opts.max_context, budget)
    kind, where = models.resolve(str(folder))
    eos = eos_ids(where, session.tokenizer) if kind == "folder" else {session.tokenizer.eos_token_id} - {None}
    metrics = Metrics(opts.max_batch)
    scheduler = Scheduler(batch, session.tokenizer, eos, metrics, opts.max_queue)
    server = Server(scheduler, session.tokenizer, opts.name or folder.resolve().name, metrics, opts.api_key)
    return server, scheduler


def serve(opts: ServeOptions, log=print) -> int:
    """Serve until a signal; returns 0 after a clean shutdown."""
    import uvicorn

    server, scheduler = build(opts)
    b = scheduler.batch
    log(f"serving {server.name} ({opts.runtime}, {b.session.threads} threads) on http://{opts.host}:{opts.port}: "
        f"{b.max_batch} slots, context {b.max_context}, KV budget {b.kv_budget / 2**30:.2f} GiB "
        f"({b.budget_tokens} tokens), queue {scheduler.max_queue}")
    config = uvicorn.Config(server.app, host=opts.host, port=opts.port, log_level=opts.log_level,
                            timeout_graceful_shutdown=opts.shutdown_timeout, access_log=opts.log_level == "debug")
    http = uvicorn.Server(config)
    scheduler.start()
    # uvicorn handles SIGTERM/SIGINT (stop accepting, let open requests finish) and re-raises the signal to
    # the handler it found once it is done: make that one a no-op so the shutdown ends with exit 0
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        http.run()
    finally:
        scheduler.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    if not http.started:
        raise UserError(f"could not listen on {opts.host}:{opts.port} (in use, or not an address here)")
    log("server stopped")
    return 0
