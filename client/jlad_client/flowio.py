"""Middlebury `.flo` optical-flow files: read and write.

The format: float32 tag 202021.25, int32 width, int32 height, then height*width*2 float32
values (u, v interleaved, row-major), all little-endian.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

FLO_TAG = 202021.25
# Middlebury marks unknown flow with values above this.
FLO_UNKNOWN_THRESHOLD = 1e9


def read_flo(path: str | Path) -> NDArray[np.float32]:
    """Read a `.flo` file into an array of shape (H, W, 2) holding (u, v) per pixel."""
    data = Path(path).read_bytes()
    if len(data) < 12:
        raise ValueError(f"{path}: too short for a .flo file ({len(data)} bytes)")
    tag = np.frombuffer(data, "<f4", count=1, offset=0)[0]
    if tag != np.float32(FLO_TAG):
        raise ValueError(f"{path}: bad .flo tag {tag!r} (expected {FLO_TAG})")
    width, height = (int(v) for v in np.frombuffer(data, "<i4", count=2, offset=4))
    expected = 12 + width * height * 2 * 4
    if width <= 0 or height <= 0 or len(data) != expected:
        raise ValueError(f"{path}: size {len(data)} does not match {width}x{height}")
    flow = np.frombuffer(data, "<f4", count=width * height * 2, offset=12)
    return flow.reshape(height, width, 2).astype(np.float32)


def write_flo(path: str | Path, flow: NDArray[np.floating]) -> None:
    """Write an (H, W, 2) flow array as a Middlebury `.flo` file."""
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must have shape (H, W, 2), got {flow.shape}")
    height, width = flow.shape[:2]
    header = np.array([FLO_TAG], "<f4").tobytes() + np.array([width, height], "<i4").tobytes()
    Path(path).write_bytes(header + np.ascontiguousarray(flow, "<f4").tobytes())


def valid_flow_mask(flow: NDArray[np.floating]) -> NDArray[np.bool_]:
    """(H, W) mask of pixels whose flow is known (finite and below the unknown marker)."""
    finite = np.isfinite(flow).all(axis=-1)
    known: NDArray[np.bool_] = np.abs(np.nan_to_num(flow)).max(axis=-1) < FLO_UNKNOWN_THRESHOLD
    both: NDArray[np.bool_] = finite & known
    return both
