"""OpenAI-compatible HTTP server (FastAPI) over the engine; `pixtral serve` runs it."""

from pixtral.server.app import ServerConfig, ServerState, build_app

__all__ = ["ServerConfig", "ServerState", "build_app"]
