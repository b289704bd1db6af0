"""The explorer's guard: a random token on every request (given once as ``?token=``, then kept in an
HttpOnly SameSite=Strict cookie), a CSRF token on every POST, and a strict Content-Security-Policy."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

COOKIE = "xai_ui_token"
CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def csrf_for(token: str) -> str:
    """The CSRF token of a session (derived from its secret, so nothing is stored)."""
    return hmac.new(token.encode(), b"xai-ui-csrf", hashlib.sha256).hexdigest()


class Guard:
    """ASGI middleware: 401 without the token, 403 for a POST without the CSRF token."""

    def __init__(self, app: Any, token: str):
        self.app, self.token, self.csrf = app, token, csrf_for(token)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse

        request = Request(scope)
        given = request.query_params.get("token")
        via_query = given is not None and hmac.compare_digest(given.encode(), self.token.encode())
        cookie = request.cookies.get(COOKIE, "")
        if not (via_query or hmac.compare_digest(cookie.encode(), self.token.encode())):
            return await PlainTextResponse(
                "401: the explorer's token is missing or wrong (use the address `xai ui` printed)",
                status_code=401,
            )(scope, receive, send)
        if request.method not in ("GET", "HEAD"):
            sent = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent.encode(), self.csrf.encode()):
                return await PlainTextResponse("403: missing or wrong CSRF token", status_code=403)(
                    scope, receive, send
                )

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
                if via_query:
                    headers.append(
                        (b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode())
                    )
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
