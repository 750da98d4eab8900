"""Entry point: runs the Typer app and turns errors into one line and a non-zero exit."""

import os
import signal
import sys
import threading

import typer

from . import prune_cmds  # noqa: F401  (registers commands)
from . import export_cmds  # noqa: F401
from . import bench_cmds  # noqa: F401
from . import pipeline_cmds  # noqa: F401
from . import generate_cmds  # noqa: F401
from . import compressed_cmds  # noqa: F401
from . import serve_cmds  # noqa: F401
from . import recover_cmds  # noqa: F401
from .app import app


_TERMINATED = []


def _on_sigterm(signum, frame):
    """SIGTERM (what `timeout`, systemd and schedulers send) is raised as an interrupt where the program
    is, so the same clean-up as Ctrl-C runs: temporary output folders are removed."""
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


def _interrupted() -> int:
    if _TERMINATED:
        print("error: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    print("error: interrupted; nothing was written", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("SPARSE_EXPORT_DEBUG") == "1"
    _TERMINATED.clear()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return _run(argv, debug)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _run(argv, debug: bool) -> int:
    from ..errors import UserError

    try:
        rv = typer.main.get_command(app).main(args=argv, prog_name="sparse-export",
                                              standalone_mode=False)
        if rv == 130:  # typer turns Ctrl-C into a returned 130
            raise KeyboardInterrupt
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.Abort):
            return _interrupted()
        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {msg} (set SPARSE_EXPORT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
