"""Container health check: exit 0 when the local jlad process answers its probe.

Used by the image's HEALTHCHECK and by docker/compose.yaml. It needs nothing beyond the
standard library, so it runs in any jlad image (no curl in the slim bases).

    python /opt/jlad/healthcheck.py            # GET /healthz (alive)
    python /opt/jlad/healthcheck.py /readyz    # GET /readyz (ready to take traffic)
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def probe_url(path: str) -> str:
    """The URL of `path` on this container's own jlad port (JLAD_PORT, default 8000)."""
    port = os.environ.get("JLAD_PORT", "8000")
    return f"http://127.0.0.1:{port}/{path.lstrip('/')}"


def main(argv: list[str]) -> int:
    url = probe_url(argv[1] if len(argv) > 1 else "/healthz")
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        print(f"unhealthy: {url}: {error}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
