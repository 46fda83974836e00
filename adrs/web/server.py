"""Starting the web view: open the runs, bind the socket, print the URL with its token, serve."""
from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Callable

from adrs.web.runview import RunView, open_view

WEB_EXTRA_HINT = "the web view needs its extra: pip install 'adrs[web]'"


def run_keys(run_dirs: list[Path]) -> list[str]:
    """URL-safe, distinct keys for the runs: the directory names, numbered where they repeat."""
    keys: list[str] = []
    for path in run_dirs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name).strip("-.") or "run"
        key, n = base, 2
        while key in keys:
            key, n = f"{base}-{n}", n + 1
        keys.append(key)
    return keys


def open_views(run_dirs: list[Path]) -> dict[str, RunView]:
    """Read-only views of the runs, keyed for URLs (FileNotFoundError for a directory without a run)."""
    return {key: open_view(key, path) for key, path in zip(run_keys(run_dirs), run_dirs)}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def url_of(host: str, port: int, secret: str) -> str:
    """The URL to open: the token is in the query (the server swaps it for a cookie)."""
    wildcard = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}  # every address: show this machine's
    shown = wildcard.get(host) or (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}/?token={secret}"


def serve(run_dirs: list[Path], host: str, port: int, say: Callable[[str], None]) -> None:
    """Serve ``run_dirs`` until interrupted; ``say`` gets the URL line first (then uvicorn's own log)."""
    try:
        import uvicorn

        from adrs.web.app import create_app
        from adrs.web.auth import new_token
    except ImportError as exc:
        raise ModuleNotFoundError(f"{WEB_EXTRA_HINT} ({exc.name} is missing)") from exc
    run_views = open_views(run_dirs)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    token = new_token(port)
    app = create_app(run_views, token)
    say(f"adrs web view of {len(run_views)} run(s): {url_of(host, port, token.secret)}")
    if not is_loopback(host):
        say(f"warning: listening on {host}, reachable from other machines; anyone with the URL can read and review")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for view in run_views.values():
            view.close()
