"""The per-launch token: who may read the runs, and who may review.

``adrs serve`` prints ``http://HOST:PORT/?token=T``. Opening it sets a cookie (HttpOnly,
SameSite=Strict, named for the port since cookies do not tell ports apart) and redirects to
the same page without the token, so it does not linger in the address bar or history.

- Reading (pages and JSON) needs the cookie or the ``X-ADRS-Token`` header. A server on
  127.0.0.1 is reachable by every user of a shared machine, and by any web page the
  researcher visits through DNS rebinding; runs hold unpublished code, prompts and replies.
- Writing (a review) needs the ``X-ADRS-Token`` header: the cookie alone is refused, so another
  site cannot make the browser review (it can neither read the token nor set the header
  without a CORS preflight, which this server never grants).
- Static files (the pinned libraries, the page scripts) hold no run data and need nothing.

Every response carries a Content-Security-Policy that allows only this server's own scripts:
a candidate's text rendered by mistake as markup still could not run.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

HEADER = "X-ADRS-Token"
QUERY = "token"
SAFE_METHODS = frozenset({"GET", "HEAD"})
PUBLIC_PREFIX = "/static/"
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                                "form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
REFUSED = ("403: this adrs web view needs its token. Open the URL that `adrs serve` printed "
           "(http://HOST:PORT/?token=...).")


@dataclass(frozen=True)
class Token:
    """The secret of one launch and the cookie that carries it for reads."""

    secret: str
    cookie: str

    def matches(self, given: str | None) -> bool:
        """Constant-time comparison with a presented token."""
        return given is not None and secrets.compare_digest(given.encode(), self.secret.encode())


def new_token(port: int) -> Token:
    """A fresh random token for a server on ``port``."""
    return Token(secrets.token_urlsafe(24), f"adrs_token_{port}")


def _without_token(request: Request) -> str:
    query = [(k, v) for k, v in request.query_params.multi_items() if k != QUERY]
    return request.url.path + (f"?{urlencode(query)}" if query else "")


class TokenGate(BaseHTTPMiddleware):
    """Refuses (403) requests without the token; turns ``?token=`` into a cookie; adds security headers."""

    def __init__(self, app: ASGIApp, token: Token) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await self._gate(request, call_next)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    async def _gate(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path.startswith(PUBLIC_PREFIX) and request.method in SAFE_METHODS:
            return await call_next(request)
        header_ok = self.token.matches(request.headers.get(HEADER))
        if request.method not in SAFE_METHODS:
            return await call_next(request) if header_ok else PlainTextResponse(REFUSED, status_code=403)
        if self.token.matches(request.query_params.get(QUERY)):
            response = RedirectResponse(_without_token(request), status_code=303)
            response.set_cookie(self.token.cookie, self.token.secret, httponly=True, samesite="strict", path="/")
            return response
        if header_ok or self.token.matches(request.cookies.get(self.token.cookie)):
            return await call_next(request)
        return PlainTextResponse(REFUSED, status_code=403)
