"""The typer app and the one error path: a :class:`UserError` (or a usage error) becomes one line
on stderr and exit code 2; Ctrl-C becomes one line saying what was interrupted (and how to resume
it) and exit code 130; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import os
import sys

import typer

from vitsplit.errors import UserError

from . import analyze, compare, demo, evaluate, pretrain_demo, recommend, report, sweep, train
from .interrupt import Interrupted, interrupted_line

app = typer.Typer(
    name="cka-split",
    help="Find where a ViT's layers split into shared and task-specific groups (CKA), and train ViT-Split with that "
    "split.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Each command lives in its own module, which never imports this one; `--help` lists them in this order
# (the README's: analysis, then training, then the rest).
for _command in (analyze, recommend, train, sweep, evaluate, report, compare, demo, pretrain_demo):
    _command.register(app)


# typer >= 0.20 vendors click; take its exception classes from typer itself.
_MRO = {c.__name__: c for c in typer.BadParameter.__mro__}
_UsageError, _ClickException = _MRO["UsageError"], _MRO["ClickException"]


EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C; typer returns it for a KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cka-split`` and ``python -m cka_split.cli``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = app(args=argv, prog_name="cka-split", standalone_mode=False)
    except Interrupted as e:
        _interrupted(argv, e)
    except UserError as e:
        print(f"cka-split: error: {e}", file=sys.stderr)
        sys.exit(2)
    except _UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `cka-split`: help was wanted
            print(e.ctx.get_help() if e.ctx is not None else e.format_message())
            sys.exit(0)
        cmd = e.ctx.command_path if e.ctx is not None else "cka-split"
        msg = " ".join(e.format_message().split())
        print(f"cka-split: error: {msg} (see '{cmd} --help')", file=sys.stderr)
        sys.exit(2)
    except _ClickException as e:
        print(f"cka-split: error: {' '.join(e.format_message().split())}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("cka-split: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    if rv == EXIT_INTERRUPTED:  # a Ctrl-C that typer caught: it prints nothing itself
        _interrupted(argv, None)
    sys.exit(rv if isinstance(rv, int) else 0)


def _interrupted(argv: list[str], error: Interrupted | None) -> None:
    """One line on what was interrupted (from rank 0 only under torchrun), exit code 130."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(interrupted_line(argv, error), file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
