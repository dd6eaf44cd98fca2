"""SameSiteOnly: the middleware that keeps other web sites away from a local server.

A page on any web site can make a browser send requests to 127.0.0.1: form posts and
`fetch(..., {mode: "no-cors"})` go out without asking, and DNS rebinding makes the attacker's
own host name point at us. So, with or without a token:

- the `Host` must be one of this server's names (loopback, the address it binds, and the
  configured public names): a rebound name is refused;
- an `Origin`, when a browser sends one (it does on every cross-site POST), must be the
  request's own `Host`: no other site's page, not even one on another local port;
- a POST's body must be JSON (`application/json`): what a cross-site form or simple request
  sends (form, multipart, text) is refused. A POST with no body at all needs no type.

`open_paths` (a health check) skip the `Host` rule: probes and load balancers name the
server by addresses no one configures, and those paths only read.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
UNSPECIFIED = ("0.0.0.0", "::", "")  # a bind address that is every address: no name of its own


def host_name(host: str) -> str:
    """The name in a `Host` header or URL authority, without its port or IPv6 brackets."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def server_names(bind_host: str, public: Iterable[str] = ()) -> frozenset[str]:
    """The host names a request to this server may carry: loopback, the bound address
    (unless it is every address) and the configured public names, lowercased."""
    names = {*LOOPBACK_NAMES, *(name.strip().lower() for name in public if name.strip())}
    if bind_host not in UNSPECIFIED:
        names.add(host_name(bind_host).lower())
    return frozenset(names)


class SameSiteOnly:
    """Refuse (403, JSON) requests another site's page could have made; see the module."""

    def __init__(
        self,
        app: ASGIApp,
        names: Collection[str],
        json_posts_under: str = "/",
        open_paths: Collection[str] = (),
        hint: str = "",
    ) -> None:
        self.app = app
        self.names = frozenset(names)
        self.json_posts_under = json_posts_under  # where a POST body must be JSON
        self.open_paths = frozenset(open_paths)
        self.hint = hint  # how to let a name in, said with a refused Host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = self.refusal(scope)
            if refused is not None:
                await JSONResponse({"error": refused}, 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> str | None:
        """Why the request is refused, or None when it may go on."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        path = scope["path"]
        if path not in self.open_paths and host_name(host).lower() not in self.names:
            return f"host {host!r} is not a name of this server" + self.hint
        origin = headers.get("origin")
        if origin is not None and origin.partition("://")[2].lower() != host.lower():
            return f"requests from pages of {origin} are not accepted"
        if scope["method"] == "POST" and path.startswith(self.json_posts_under):
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            bodiless = not kind and headers.get("content-length", "0") == "0"
            bodiless = bodiless and "transfer-encoding" not in headers
            if kind != "application/json" and not bodiless:
                return "a POST body must be application/json"
        return None
