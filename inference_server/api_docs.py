"""The API documentation pages, Swagger UI at /docs and ReDoc at /redoc, from assets served here.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, and ReDoc its fonts from Google: on a
network without internet (hospital networks often are) /docs renders as a blank page. The
scripts, stylesheet and favicon here come from the `fastapi-offline` wheel (its static folder
only) and are served by the service itself, so the pages need nothing from outside.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
# Where the pages' scripts, stylesheet and favicon are served; not a path any API route uses.
ASSETS_PATH = "/api-docs-assets"
ASSETS_DIRECTORY = Path(fastapi_offline.__file__).parent / "static"
SWAGGER_JS = "swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui.css"
REDOC_JS = "redoc.standalone.js"
FAVICON = "favicon.png"

# Swagger UI sends the schema to an online validator and shows its badge unless told not to:
# a request leaving the platform, and a broken image offline.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
# ReDoc's side menu always shows Redocly's logo from Redocly's CDN (no option turns it off):
# this policy keeps the browser from requesting any image from elsewhere, and ReDoc hides an
# image that fails. Only images: a script or stylesheet from outside stays a visible failure.
REDOC_CONTENT_SECURITY_POLICY = "img-src 'self' data:"


def install_offline_docs(app: FastAPI) -> None:
    """Serves /docs, /redoc and their assets; `app` must be made with docs_url and redoc_url None.

    Every URL in the pages is prefixed with the request's root path, so they work wherever a
    proxy mounts the service.
    """
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the app with docs_url=None and redoc_url=None: FastAPI's pages use a CDN")
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("the documentation pages need the app's OpenAPI schema (openapi_url)")
    if not (ASSETS_DIRECTORY / SWAGGER_JS).is_file():
        raise RuntimeError(f"the Swagger UI assets are missing from {ASSETS_DIRECTORY}")

    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIRECTORY), name="api-docs-assets")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/{SWAGGER_JS}",
            swagger_css_url=f"{root}{ASSETS_PATH}/{SWAGGER_CSS}",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/{FAVICON}",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )

    async def redoc(request: Request) -> HTMLResponse:
        root = _root_path(request)
        page = get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/{REDOC_JS}",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/{FAVICON}",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = REDOC_CONTENT_SECURITY_POLICY
        return page

    # Plain routes, as FastAPI adds its own pages: outside the API's routes and their access rules.
    app.add_route(DOCS_PATH, swagger_ui, include_in_schema=False)
    app.add_route(REDOC_PATH, redoc, include_in_schema=False)


def _root_path(request: Request) -> str:
    root = request.scope.get("root_path", "")
    return str(root).rstrip("/")
