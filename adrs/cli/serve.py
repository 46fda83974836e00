"""`adrs serve`: the local web view of one or more runs (needs the `web` extra)."""
from __future__ import annotations

from pathlib import Path

import typer

from adrs.cli.common import RUN_DIR_HELP, UserError, check_run_dir, command, console


@command()
def serve(
    run_dirs: list[Path] = typer.Argument(..., help=RUN_DIR_HELP + "; several runs can be served at once",
                                          metavar="RUN_DIR", show_default=False),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (other than loopback: reachable "
                                                        "by other machines, still behind the token)"),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="TCP port (0: any free port)"),
) -> None:
    """Web view of runs: overview, leaderboard, lineage tree, candidates, compare, review; live while a run writes.

    Prints a URL with a per-launch secret token; every page needs it. Reads the archive from git without
    the run's write lock (a colleague's read-only run works); a review takes the lock like `adrs review`.
    """
    from adrs.web.server import serve as _serve

    for run_dir in run_dirs:
        check_run_dir(run_dir)
    try:
        _serve(run_dirs, host, port, lambda line: print(line, flush=True))
    except OSError as exc:
        if exc.errno is None:
            raise
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    console.print("stopped")
