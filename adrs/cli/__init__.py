"""The `adrs` command line. One module per command group; the work lives in the modules they call.

- :mod:`adrs.cli.score`: ``score``
- :mod:`adrs.cli.run`: ``run``, ``agent``, ``resume``, ``init``
- :mod:`adrs.cli.inspect`: ``leaderboard``, ``show``, ``diff``, ``plot``, ``export``, ``reindex`` (read-only but reindex)
- :mod:`adrs.cli.edit`: ``patch``, ``rescore``
- :mod:`adrs.cli.review`: ``review``
- :mod:`adrs.cli.serve`: ``serve`` (the web view)
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import click
import typer

# Importing registers the commands, in this order in the help.
from adrs.cli import score, run, inspect, edit, review, serve  # noqa: F401,I001
from adrs.cli.common import Interrupted, UserError, app, console
from adrs.safetext import terminal_safe
from evaluator.errors import IsolationUnavailable

ISOLATION_HINT = (
    "Candidates are untrusted code (an LLM wrote them). Fix: allow unprivileged user namespaces "
    "(e.g. sysctl kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu), "
    "or run as root. To run them anyway with weaker containment: --unsafe-allow-unisolated, "
    "evaluation.unsafe_allow_unisolated: true, or ADRS_UNSAFE_ALLOW_UNISOLATED=1.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adrs")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        print(f"adrs {_version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_print_version, is_eager=True,
                                           help="print the version and exit"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks instead of one-line errors"),
) -> None:
    """Evolve sparse-attention maskers with an LLM, scored safely."""


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be shown anyway
            continue


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line (exit 2); --debug (anywhere) shows tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        code = typer.main.get_command(app).main(args, prog_name="adrs", standalone_mode=False)
    except Interrupted as exc:
        console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        _flush()
        # Threads may still be scoring a candidate (up to its time limit); everything committed is
        # durable and the sandbox's processes die with this one, so leave now instead of waiting.
        os._exit(130)
    except click.exceptions.Abort:  # Ctrl-C or EOF at a prompt, before a command ran
        console.print("interrupted")
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: click's own one-line message
        exc.show()
        sys.exit(exc.exit_code)
    except (UserError, FileNotFoundError, ModuleNotFoundError, NotADirectoryError) as exc:
        if debug:
            raise
        console.print(f"[red]error:[/red] {terminal_safe(exc)}", soft_wrap=True)
        sys.exit(2)
    except IsolationUnavailable as exc:
        if debug:
            raise
        console.print(f"[red]error:[/red] the sandbox cannot isolate candidates on this machine, so none was run: "
                      f"{terminal_safe(exc)}\n{ISOLATION_HINT}", soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback behind --debug
        if debug:
            raise
        console.print(f"[red]error:[/red] {type(exc).__name__}: {terminal_safe(exc)} (run with --debug for the traceback)", soft_wrap=True)
        sys.exit(1)
    if code == 130:  # typer turns a Ctrl-C outside our commands into a silent exit 130
        console.print("interrupted")
    sys.exit(code if isinstance(code, int) else 0)
