"""The Starlette application: HTML pages (Jinja2, autoescaped), a JSON API, and review.

Pages are thin shells; their scripts fetch the JSON and render it with ``textContent``. The
handlers are plain functions, which Starlette runs in its thread pool: reading git blocks.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from adrs.web import views
from adrs.web.auth import HEADER, Token, TokenGate
from adrs.web.review import ReviewRefused, review
from adrs.web.runview import RunView

HERE = Path(__file__).parent
PAGES = {"overview": "overview.html", "leaderboard": "leaderboard.html", "tree": "tree.html"}


def _view(request: Request) -> RunView:
    found = request.app.state.views.get(request.path_params["run"])
    if found is None:
        raise HTTPException(404, f"no run {request.path_params['run']!r}")
    found.refresh()
    return found


def plain(data: Any) -> Any:
    """``data`` with non-finite floats as text ("nan", "inf"): records may hold them; JSON may not."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {str(k): plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [plain(v) for v in data]
    return data


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(plain(data), status_code=status, headers={"Cache-Control": "no-store"})


def _page(request: Request, template: str, **context: Any) -> Response:
    runs = list(request.app.state.views.values())
    return request.app.state.templates.TemplateResponse(
        request, template, {"runs": runs, "token": request.app.state.token.secret, "header": HEADER, **context},
        headers={"Cache-Control": "no-store"})


def index_page(request: Request) -> Response:
    """The list of runs served."""
    return _page(request, "index.html", page="index")


def run_page(request: Request) -> Response:
    """Overview, leaderboard or lineage tree of one run."""
    view = _view(request)
    page = request.path_params.get("page", "overview")
    if page not in PAGES:
        raise HTTPException(404, f"no page {page!r}")
    return _page(request, PAGES[page], page=page, run=view)


def candidate_page(request: Request) -> Response:
    """One candidate: code, diffs, per-layer charts, prompt, review."""
    view = _view(request)
    try:
        ref = view.get(request.path_params["cand"])
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0] if exc.args else exc)) from None
    return _page(request, "candidate.html", page="candidate", run=view, cand=ref.id)


def compare_page(request: Request) -> Response:
    """Runs (``?run=KEY``) or candidates (``?c=KEY:ID``) side by side."""
    return _page(request, "compare.html", page="compare")


def api_runs(request: Request) -> JSONResponse:
    """Every run served: key, path, version, candidate count."""
    out = []
    for view in request.app.state.views.values():
        version = view.refresh()
        with view.lock:
            count, best = len(view.rows()), view.archive.best()
        out.append({"key": view.key, "path": str(view.path), "version": version, "candidates": count,
                    "best": {"id": best.id, "score": best.combined_score} if best else None})
    return _json(out)


def api_version(request: Request) -> JSONResponse:
    """The run's version: it changes whenever a candidate, note or tag lands (pages poll this)."""
    view = _view(request)
    return _json({"run": view.key, "version": view.version})


def api_candidates(request: Request) -> JSONResponse:
    """Every candidate's row."""
    view = _view(request)
    return _json({"run": view.key, "version": view.version, "rows": views.candidate_rows(view)})


def api_overview(request: Request) -> JSONResponse:
    """The overview page's data."""
    return _json(views.overview(_view(request)))


def api_candidate(request: Request) -> JSONResponse:
    """The candidate page's data."""
    view = _view(request)
    try:
        return _json(views.candidate_detail(view, request.path_params["cand"]))
    except KeyError as exc:
        return _json({"error": str(exc.args[0] if exc.args else exc)}, 404)


def api_diff(request: Request) -> JSONResponse:
    """Code diff between candidates ``a`` and ``b``."""
    view = _view(request)
    a, b = request.query_params.get("a"), request.query_params.get("b")
    if not a or not b:
        return _json({"error": "give two candidates: ?a=ID&b=ID"}, 400)
    try:
        return _json(views.diff_between(view, a, b))
    except KeyError as exc:
        return _json({"error": str(exc.args[0] if exc.args else exc)}, 404)


def api_diff_across(request: Request) -> JSONResponse:
    """Code diff between ``a`` and ``b``, each ``RUN:CAND``, from any runs served."""
    found = []
    for spec in (request.query_params.get("a", ""), request.query_params.get("b", "")):
        key, _, cand = spec.rpartition(":")
        view = request.app.state.views.get(key)
        if view is None or not cand:
            return _json({"error": f"give a and b as RUN:CANDIDATE (no run {key!r})"}, 404)
        view.refresh()
        found.append((view, cand))
    try:
        return _json(views.diff_across(found[0], found[1]))
    except KeyError as exc:
        return _json({"error": str(exc.args[0] if exc.args else exc)}, 404)


def api_checkpoints(request: Request) -> JSONResponse:
    """Review checkpoints with decisions and notes."""
    return _json(views.checkpoints(_view(request)))


async def api_review(request: Request) -> JSONResponse:
    """Approve, reject or note a checkpoint (JSON body ``{action, text, checkpoint}``); the same tags as `adrs review`."""
    view = _view(request)
    try:
        body = await request.json()
    except ValueError:
        return _json({"error": "the body must be JSON: {action, text, checkpoint}"}, 400)
    if not isinstance(body, dict):
        return _json({"error": "the body must be a JSON object"}, 400)
    try:
        # Off the event loop: git and the run's lock block.
        checkpoint = body.get("checkpoint")
        done = await run_in_threadpool(review, view, str(body.get("action", "")), str(body.get("text") or ""),
                                       None if checkpoint in (None, "") else str(checkpoint))
    except ReviewRefused as exc:
        return _json({"error": str(exc)}, exc.status)
    return _json({"checkpoint": done})


def create_app(run_views: dict[str, RunView], token: Token) -> Starlette:
    """The web application over ``run_views`` (key -> view), guarded by ``token``."""
    routes = [
        Route("/", index_page),
        Route("/compare", compare_page),
        Route("/run/{run}", run_page),
        Route("/run/{run}/c/{cand}", candidate_page),
        Route("/run/{run}/{page}", run_page),
        Route("/api/runs", api_runs),
        Route("/api/diff", api_diff_across),
        Route("/api/run/{run}/version", api_version),
        Route("/api/run/{run}/candidates", api_candidates),
        Route("/api/run/{run}/overview", api_overview),
        Route("/api/run/{run}/candidate/{cand}", api_candidate),
        Route("/api/run/{run}/diff", api_diff),
        Route("/api/run/{run}/checkpoints", api_checkpoints),
        Route("/api/run/{run}/review", api_review, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(TokenGate, token=token)])
    app.state.views = run_views
    app.state.token = token
    app.state.templates = Jinja2Templates(directory=HERE / "templates")  # autoescape on for .html
    return app
