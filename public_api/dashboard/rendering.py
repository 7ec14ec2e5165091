"""Templates, the headers every dashboard answer carries, and the one place where the dashboard's
errors become pages (or fragments, or a trip to the login page)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse, RedirectResponse, Response

from inference_server.contract import (
    DASHBOARD_CSRF_FIELD,
    DASHBOARD_CSRF_HEADER,
    DashboardSession,
    OverviewPoint,
    PublicRoutes,
)
from public_api.dashboard.sessions import NoSessionError
from public_api.errors import PublicAPIError

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
LOGIN_PATH = f"{PublicRoutes.DASHBOARD}/login"
FRAGMENTS_PREFIX = f"{PublicRoutes.DASHBOARD}/fragments/"

# Scripts and styles from static files only (no inline ones, so an injected tag cannot run), no
# framing (clickjacking), forms posting back here only.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Pages hold a user's tasks and the session's CSRF token: never kept by a browser or a proxy.
NO_STORE = "no-store"


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _between(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return "-"
    return _seconds(((end or datetime.now(UTC)) - start).total_seconds())


def _ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    return f"{_seconds(max(0.0, (datetime.now(UTC) - value).total_seconds()))} ago"


def _mebibytes(value: int | None) -> str:
    if value is None:
        return "default"
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"


templates = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR),
    autoescape=select_autoescape(("html",)),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(when=_when, seconds=_seconds, ago=_ago, mebibytes=_mebibytes)
templates.globals.update(between=_between, base=PublicRoutes.DASHBOARD, csrf_field=DASHBOARD_CSRF_FIELD)


def render(
    name: str, context: dict[str, Any], *, session: DashboardSession | None = None, status_code: int = 200
) -> HTMLResponse:
    page = templates.get_template(name).render(session=session, **context)
    return HTMLResponse(page, status_code=status_code)


# --- the throughput and queue chart --------------------------------------------------------------

CHART_WIDTH = 720
CHART_HEIGHT = 160
CHART_MARGIN = 24


def throughput_chart(history: list[OverviewPoint]) -> dict[str, Any]:
    """Bar and line geometry of an inline SVG (no script, no external image): tasks ended per
    bucket as stacked bars (finished, failed), the queue depth at each bucket's end as a line."""
    plot_height = CHART_HEIGHT - 2 * CHART_MARGIN
    count = max(1, len(history))
    slot = (CHART_WIDTH - 2 * CHART_MARGIN) / count
    most_ended = max([point.finished + point.failed for point in history] + [1])
    deepest = max([point.queue_depth for point in history] + [1])
    bottom = CHART_HEIGHT - CHART_MARGIN
    bars = []
    line = []
    for index, point in enumerate(history):
        x = CHART_MARGIN + index * slot
        finished_h = plot_height * point.finished / most_ended
        failed_h = plot_height * point.failed / most_ended
        bars.append(
            {
                "x": round(x + slot * 0.15, 1),
                "width": round(max(1.0, slot * 0.7), 1),
                "finished_y": round(bottom - finished_h, 1),
                "finished_h": round(finished_h, 1),
                "failed_y": round(bottom - finished_h - failed_h, 1),
                "failed_h": round(failed_h, 1),
                "title": f"{_when(point.at)}: {point.finished} finished, {point.failed} failed, "
                f"{point.queue_depth} waiting",
            }
        )
        line.append(f"{x + slot / 2:.1f},{bottom - plot_height * point.queue_depth / deepest:.1f}")
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "margin": CHART_MARGIN,
        "bottom": bottom,
        "bars": bars,
        "queue_line": " ".join(line),
        "most_ended": most_ended,
        "deepest": deepest,
        "first": _when(history[0].at) if history else "",
        "last": _when(history[-1].at) if history else "",
    }


# --- answers and errors --------------------------------------------------------------------------


def is_fragment(request: Request) -> bool:
    return request.url.path.startswith(FRAGMENTS_PREFIX) or DASHBOARD_CSRF_HEADER.lower() in request.headers


def error_answer(request: Request, error: PublicAPIError) -> Response:
    """A refusal as people see it: the login page for a page without a session, a small fragment
    for the script that polls, an error page otherwise; the status code is the API's."""
    if isinstance(error, NoSessionError) and not is_fragment(request) and request.method == "GET":
        return RedirectResponse(LOGIN_PATH, status_code=303)
    if is_fragment(request):
        response: Response = HTMLResponse(
            templates.get_template("_error.html").render(status_code=error.status_code, detail=error.detail),
            status_code=error.status_code,
        )
    else:
        response = render(
            "error.html",
            {"status_code": error.status_code, "detail": error.detail},
            status_code=error.status_code,
        )
    for name, value in (error.headers or {}).items():
        if name.lower() == "retry-after":
            response.headers[name] = value
    return response


class DashboardRoute(APIRoute):
    """Every dashboard answer carries the security headers and is not stored; a PublicAPIError
    becomes a page here instead of the API's JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                response = await handler(request)
            except PublicAPIError as error:
                response = error_answer(request, error)
            except RequestValidationError as exc:
                # A bad query or path value: the same 422 the API gives, as a page.
                problems = "; ".join(
                    f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
                    for problem in exc.errors()
                )
                response = error_answer(request, PublicAPIError(422, problems))
            response.headers.update(SECURITY_HEADERS)
            response.headers.setdefault("Cache-Control", NO_STORE)
            return response

        return handle
