"""The web chat page: a small static app (plain HTML, CSS and JavaScript modules, no build step) at `/`.

    GET /                    index.html
    GET /web/<file>          the page's CSS, JavaScript and icon (only the files shipped in static/)
    GET /web/config.json     what the page needs to know about the server: model name, the model's
                             largest image side (the page resizes images to it before uploading),
                             the server's image limits (behind --api-key, like /v1/*)

The files ship inside the package and are read once, through importlib.resources, so they are found
in an installed wheel as well as in a source checkout. Every page response carries a
Content-Security-Policy that allows only this origin: no inline script or style, no other host; the
page talks only to our own /v1/chat/completions.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pixtral.server.errors import APIError

# blob: and data: images: the previews of attached images, and the images kept in a conversation.
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",  # a file is only ever what its Content-Type says
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded package serves its new page at once
}
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}


def static_files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, media type) for every file shipped in static/."""
    files = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in TYPES:
            files[entry.name] = (entry.read_bytes(), TYPES[suffix])
    if "index.html" not in files:
        raise RuntimeError("the web chat page is missing from the package (pixtral/server/web/static/index.html)")
    return files


def max_image_size(processor) -> int | None:
    """The longest image side the model takes (mistral-common resizes larger images down to it);
    None for a model without a vision encoder."""
    encoder = getattr(processor.tokenizer.instruct_tokenizer, "image_encoder", None)
    return None if encoder is None else int(encoder.image_config.max_image_size)


def add_web_routes(app: FastAPI, config: Callable[[Request], dict[str, Any]]) -> None:
    """Serve the page on `app`. `config(request)` answers /web/config.json (it checks the API key
    and raises the API's errors: 401 without the key, 503 while the model loads)."""
    files = static_files()

    def page_file(name: str) -> Response:
        content, media_type = files[name]
        return Response(content, media_type=media_type, headers=HEADERS)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> Response:
        return page_file("index.html")

    @app.get("/web/config.json", include_in_schema=False)
    async def web_config(request: Request) -> JSONResponse:
        return JSONResponse(config(request), headers=HEADERS)

    @app.api_route("/web/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def web_file(name: str) -> Response:
        if name not in files:  # only the shipped files: no path is ever built from the request
            raise APIError(404, f"no file {name!r} in the chat page")
        return page_file(name)
