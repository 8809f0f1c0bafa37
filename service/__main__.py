"""`python -m service`: run the API on uvicorn with the JLAD_* settings.

SIGTERM (or Ctrl-C) stops taking connections, lets in-flight requests finish for up to
JLAD_SHUTDOWN_GRACE_S, drains the batcher and exits 0.
"""

from __future__ import annotations

import uvicorn

from service.app import uvicorn_config
from service.logs import configure_logging
from service.settings import Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    uvicorn.Server(uvicorn_config(settings)).run()


if __name__ == "__main__":
    main()
