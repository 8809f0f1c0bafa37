"""`python -m service`: run the API on uvicorn with the JLAD_* settings.

SIGTERM (or Ctrl-C) stops taking connections, lets in-flight requests finish for up to
JLAD_SHUTDOWN_GRACE_S, drains the batcher and exits 0.

With JLAD_API_PROCESSES=N > 1 (needs JLAD_QUEUE=redis), this process binds the port and
supervises N uvicorn worker processes that accept on it (uvicorn's `Multiprocess`: a worker
that dies is replaced; SIGTERM reaches every worker, each shuts down gracefully). Each
worker builds its own app (`worker_app`), so each has its own metrics: /metrics describes
the process that answers it, and `jlad_api_process_info` says which one.
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI
from uvicorn.supervisors import Multiprocess

from service.app import create_app, uvicorn_config
from service.logs import configure_logging
from service.settings import Settings


def worker_app() -> FastAPI:
    """The app factory each API worker process calls (its own logging, app and metrics)."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    if settings.api_processes == 1:
        uvicorn.Server(uvicorn_config(settings)).run()
        return
    config = uvicorn_config(settings, "service.__main__:worker_app")
    socket = config.bind_socket()
    Multiprocess(config, sockets=[socket]).run()


if __name__ == "__main__":
    main()
