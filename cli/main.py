"""Entry point: runs the Typer app and turns errors into one line and a non-zero exit."""

import os
import sys

from . import prune_cmds  # noqa: F401  (registers commands)
from .app import app


def main(argv=None):
    from sparse_export.errors import UserError

    debug = os.environ.get("SPARSE_EXPORT_DEBUG") == "1"
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return (2)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return (130)
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1)
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.Abort):
            print("error: interrupted; nothing was written", file=sys.stderr)
            return (130)
        if isinstance(e, click.ClickException):
            e.show()
            return (e.exit_code)
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {msg} (set SPARSE_EXPORT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return (1)
    return (0)


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
