"""`ftadvisor` command line. Each package registers its own sub-commands; this module only dispatches.

Exit status: 0 success, 1 the work itself failed (e.g. a run did not complete), 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ftcore.errors import UserError, format_validation_error

# Modules that expose ``register(subparsers)``; each adds its commands with ``set_defaults(func=...)``.
COMMAND_MODULES = ("estimator.cli", "advisor.cli", "runner.cli", "runner.adapters_cli", "runner.export_cli",
                   "runner.data_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftadvisor",
        description="Full fine-tuning, LoRA or QLoRA? Will it fit, how long, what cost? And launch it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    app = sub.add_parser("app", help="start the web app on localhost")
    app.add_argument("--port", type=int, default=8501)
    app.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    app.set_defaults(func=_run_app)
    return parser


def _run_app(args) -> int:
    import subprocess
    from pathlib import Path

    import ui

    entry = Path(ui.__file__).resolve().parent / "entry"
    app = entry / "app.py"
    if not app.is_file():
        raise UserError(f"app: the Streamlit app is missing from this install (no {app}); reinstall "
                        "finetune-advisor, or run `make run` in a checkout")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
           "--server.port", str(args.port), "--browser.gatherUsageStats", "false"]
    # from the entry folder: Streamlit reads $CWD/.streamlit/config.toml (localhost, upload limit, no watcher), and
    # `python -m` puts $CWD first on sys.path, which must not be ui/ (ui/datasets.py would shadow `datasets`)
    return subprocess.call(cmd, cwd=entry)


def main(argv: list[str] | None = None) -> int:
    """Run one command. ``argv`` None reads ``sys.argv``: this process *is* the command (the ``ftadvisor`` script,
    ``python -m ftadvisor``), so a command may make process-wide choices (``args.own_process``); a caller passing
    ``argv`` (tests, other code) keeps its process as it is."""
    import warnings

    # Library deprecation notices (transformers/peft renames) are for us, not for the user at a terminal.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.own_process = argv is None
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:  # EstimatorError, AdvisorError, RunnerError too: the message and the fix, no traceback
        print(f"error: {exc}", file=sys.stderr)
        if exc.fix:
            print(f"fix: {exc.fix}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ftadvisor runs --json | head`: the reader left; no traceback (Python's own advice:
        # point stdout at devnull so the interpreter's final flush does not raise again)
        if args.own_process:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a program killed by it
    except Exception as exc:  # pydantic errors are bad input too
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            print(f"error: invalid input\n{format_validation_error(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
