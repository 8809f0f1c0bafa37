"""Small pieces every benchmark shares: the machine's description, latency summaries, the
synthetic test image, JSON output."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

PERCENTILES = (50, 95, 99)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs nvidia-smi sees (empty without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: cores, CPU, load right now, library versions."""
    import onnxruntime as ort

    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "gpus": gpu_names(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "platform": platform.platform(),
    }


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99, mean and max of `seconds`, in milliseconds (None when empty)."""
    if not seconds:
        empty: dict[str, float | None] = {f"p{p}_ms": None for p in PERCENTILES}
        return empty | {"mean_ms": None, "max_ms": None}
    ms = np.asarray(seconds, np.float64) * 1000.0
    summary: dict[str, float | None] = {
        f"p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES
    }
    summary["mean_ms"] = float(ms.mean())
    summary["max_ms"] = float(ms.max())
    return summary


def synthetic_rgb(height: int, width: int, seed: int = 0) -> NDArray[np.uint8]:
    """A deterministic photo-like test image `(height, width, 3)` uint8: smooth colour
    gradients plus blobs, so JPEG/PNG sizes and decode times resemble real photographs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [
            0.5 + 0.5 * np.sin(x / width * np.pi * (1 + c) + c) * np.cos(y / height * np.pi * 2)
            for c in range(3)
        ],
        axis=-1,
    )
    for _ in range(12):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.05, 0.2) * min(height, width)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius**2))
        image += blob[..., None] * rng.uniform(-0.6, 0.6, 3).astype(np.float32)
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    rgb: NDArray[np.uint8] = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return rgb


def encode_image(rgb: NDArray[np.uint8], fmt: str) -> bytes:
    """`rgb` encoded as `fmt` (`jpeg` at quality 90, or `png`)."""
    buffer = io.BytesIO()
    if fmt.lower() in ("jpg", "jpeg"):
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    else:
        Image.fromarray(rgb).save(buffer, format=fmt.upper())
    return buffer.getvalue()


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def declared_inputs(session: Any, feed: dict[str, Any]) -> dict[str, Any]:
    """The part of `feed` that an ONNX Runtime `session`'s graph takes (a zooming landmark
    graph also takes the image: docs/CONTRACT.md). model_export.quantize has the same for
    the exporter: bench must run where only the serving packages are installed (no torch),
    and model_export may not import service or bench."""
    return {i.name: feed[i.name] for i in session.get_inputs()}


def parse_int_list(text: str) -> list[int]:
    """`"1,2,4"` -> `[1, 2, 4]` (for command-line lists)."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values
