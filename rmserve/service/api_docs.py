"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with their scripts served by the app itself.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc's fonts from Google), so
they are blank in an air-gapped cluster. These are the same pages, written by FastAPI's
``get_swagger_ui_html`` and ``get_redoc_html``, pointing instead at the files of the
fastapi-standalone-docs package (Swagger UI, ReDoc and FastAPI's favicon, each folder with
its licence) mounted at ``/static/docs``. That package's ReDoc build is patched to load its
sidebar logo from ``<page>/logo-mini.svg`` rather than cdn.redoc.ly: hence
``/redoc/logo-mini.svg``.

Like ``/openapi.json`` and the pages, the assets need no API key: none of them is a secret,
and a browser sends no bearer key when it loads a page.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_URL", "DOCS_URL", "REDOC_URL", "add_api_docs", "assets_directory"]

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/static/docs"


def assets_directory() -> Path:
    """The package's folder of assets: swagger/, redoc/ and fastapi/ (the favicon)."""
    try:
        package = resources.files("fastapi_standalone_docs")
    except ModuleNotFoundError as e:
        raise RuntimeError(
            "the assets of /docs and /redoc come from the fastapi-standalone-docs package, "
            "which is not installed: pip install 'rmserve[serve]' (or [gpu])"
        ) from e
    return Path(str(package)) / "static"


def add_api_docs(app: FastAPI) -> None:
    """Swagger UI at /docs (and its OAuth2 redirect page), ReDoc at /redoc, their assets
    under /static/docs; ``app`` is created with ``docs_url=None, redoc_url=None``."""
    if app.openapi_url is None:
        raise ValueError("the API docs need the app's openapi_url")
    openapi_url = app.openapi_url
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url
    directory = assets_directory()
    app.mount(ASSETS_URL, StaticFiles(directory=directory), name="api-docs-assets")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root_path(request)
        assets = root + ASSETS_URL
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger/swagger-ui.css",
            swagger_favicon_url=f"{assets}/fastapi/favicon.png",
            oauth2_redirect_url=root + oauth2_redirect_url if oauth2_redirect_url else None,
        )

    async def redoc(request: Request) -> HTMLResponse:
        root = _root_path(request)
        assets = root + ASSETS_URL
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/fastapi/favicon.png",
            with_google_fonts=False,
        )

    async def redoc_logo(request: Request) -> FileResponse:
        return FileResponse(directory / "redoc" / "logo-mini.svg")

    app.add_route(DOCS_URL, swagger_ui, include_in_schema=False)
    if oauth2_redirect_url:

        async def oauth2_redirect(request: Request) -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

        app.add_route(oauth2_redirect_url, oauth2_redirect, include_in_schema=False)
    app.add_route(REDOC_URL, redoc, include_in_schema=False)
    app.add_route(f"{REDOC_URL}/logo-mini.svg", redoc_logo, include_in_schema=False)


def _root_path(request: Request) -> str:
    """The prefix a proxy serves the app under (uvicorn's --root-path), as FastAPI's pages
    read it."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")
