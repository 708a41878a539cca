"""Who may use the studio, and from where.

- **Host.** Every request must name one of the studio's own addresses in its Host header: a web
  page elsewhere cannot point a DNS name at 127.0.0.1 and read the studio through it (DNS
  rebinding).
- **Token.** Off the loopback interface a token is required (made when not given, printed once,
  like Jupyter's): `?token=` once sets an HttpOnly, SameSite=Strict cookie and redirects to the
  same page without it; scripts may send `Authorization: Bearer TOKEN` instead.
- **Cross-site requests.** A request that changes anything (POST) must come from the studio's own
  page: same Origin (when the browser sends one), Sec-Fetch-Site same-origin (when it sends one),
  and the X-Lorakit-Studio header, which a cross-site form cannot set and a cross-site script
  cannot send without a CORS preflight the studio never answers.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlencode

COOKIE = "lorakit_studio"
HEADER = "x-lorakit-studio"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Guard:
    """The three checks above as one ASGI-level function: `refuse(request)` returns the response
    to send instead of the route's, or None to let the request through."""

    def __init__(self, hosts: set[str], token: str | None):
        self.hosts = {h.lower() for h in hosts}
        self.token = token

    def _token_ok(self, given: str | None) -> bool:
        return given is not None and self.token is not None and hmac.compare_digest(given, self.token)

    def refuse(self, request):
        from fastapi.responses import JSONResponse, RedirectResponse

        host = (request.headers.get("host") or "").lower()
        if host not in self.hosts:
            return JSONResponse(_error(f"unexpected Host {host!r}: open the studio at the address it printed",
                                       "host"), status_code=400)
        if self.token is not None:
            query = request.query_params.get("token")
            if query is not None and self._token_ok(query) and request.method in SAFE_METHODS:
                rest = {k: v for k, v in request.query_params.items() if k != "token"}
                target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
                response = RedirectResponse(target, status_code=303)
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
                return response
            bearer = request.headers.get("authorization", "")
            given = request.cookies.get(COOKIE) or (bearer[7:] if bearer.lower().startswith("bearer ") else None)
            if not self._token_ok(given):
                return JSONResponse(_error("this studio needs its token: open the URL `lorakit studio` printed "
                                           "(it carries ?token=...)", "token"), status_code=401)
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("origin")
            site = request.headers.get("sec-fetch-site")
            if origin is not None and origin.lower() not in {f"http://{h}" for h in self.hosts}:
                return JSONResponse(_error(f"cross-site request refused (Origin {origin})", "origin"), status_code=403)
            if site is not None and site not in ("same-origin", "none"):
                return JSONResponse(_error(f"cross-site request refused (Sec-Fetch-Site {site})", "origin"),
                                    status_code=403)
            if request.headers.get(HEADER) != "1":
                return JSONResponse(_error(f"requests that change something must send the {HEADER} header "
                                           "(the studio's own page does)", "origin"), status_code=403)
        return None


def _error(message: str, field: str | None = None, hint: str | None = None) -> dict:
    """The studio's one error shape: {"error": {"message", "hint", "field"}}."""
    return {"error": {"message": message, "hint": hint, "field": field}}


def hosts_for(host: str, port: int) -> set[str]:
    """The Host headers the studio answers to when bound to `host` (with its port): the loopback
    names, and for any other address that address and this machine's names (there the token is
    what keeps strangers out; the Host check still stops rebinding a foreign name)."""
    import socket

    names = {host, "localhost", "127.0.0.1", "[::1]"}
    if host not in ("127.0.0.1", "localhost", "::1"):
        names |= {socket.gethostname(), socket.getfqdn()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    return {f"{n}:{port}" for n in names if n and n not in ("0.0.0.0", "::")}


__all__ = ["COOKIE", "Guard", "HEADER", "hosts_for", "new_token"]
