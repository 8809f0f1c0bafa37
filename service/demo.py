"""The demo page: one HTML page and its static files, served by the service itself.

The page (service/static/) is plain HTML, CSS and JavaScript with no network access beyond
this service: it calls the public API (/models, /landmarks, /correspond, /propagate) like any
client. None of it appears in the OpenAPI document, which describes the API only.
"""

from __future__ import annotations

import html
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse

from service.problems import NOT_FOUND, Problem

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Everything the page loads comes from this service; nothing from a CDN.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'self'"
)
_BASE_PLACEHOLDER = '<base href="/">'

router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=1)
def _template() -> str:
    text = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if _BASE_PLACEHOLDER not in text:
        raise RuntimeError(f"{STATIC_DIR / 'index.html'} lacks {_BASE_PLACEHOLDER}")
    return text


def page_html(root_path: str) -> str:
    """The page with its `<base>` at the service root, `root_path` (JLAD_ROOT_PATH) included:
    every URL on the page is relative, so it reaches the API behind a path-prefix gateway."""
    base = html.escape(root_path.rstrip("/") + "/", quote=True)
    return _template().replace(_BASE_PLACEHOLDER, f'<base href="{base}">', 1)


@router.get("/")
@router.get("/demo")
async def demo_page(request: Request) -> HTMLResponse:
    return HTMLResponse(
        page_html(str(request.scope.get("root_path", ""))),
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.get("/demo/assets/{name:path}")
async def demo_asset(name: str) -> FileResponse:
    """A file of service/static/ (scripts, styles, sample pictures).

    A route rather than a mounted StaticFiles app: a Mount looks files up by the path with
    JLAD_ROOT_PATH removed, so behind a gateway that strips the prefix it finds nothing.
    """
    path = (STATIC_DIR / name).resolve()
    if not path.is_file() or not path.is_relative_to(STATIC_DIR):
        raise Problem(NOT_FOUND, f"the demo page has no file {name!r}")
    return FileResponse(
        path, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    )


def install_demo(app: FastAPI) -> None:
    """Serve the page at / and /demo, and its scripts, styles and sample pictures under
    /demo/assets/."""
    app.include_router(router)
