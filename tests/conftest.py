"""Shared fixtures.

`model_dir`: a model repository exported, once per test session, from the committed
checkpoints in `checkpoints/` (the same command `make models` runs), so every test talks to
the real exported models. Set JLAD_TEST_MODEL_DIR to reuse an existing repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    override = os.environ.get("JLAD_TEST_MODEL_DIR")
    if override:
        return Path(override)
    out = tmp_path_factory.mktemp("models")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "model_export.export",
            "--checkpoints",
            str(ROOT / "checkpoints"),
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return out


@pytest.fixture
def anyio_backend() -> str:
    """The service runs on asyncio (uvicorn): async tests run there only, also where trio is
    installed (selenium pulls it in, and anyio's plugin would then run them on trio too)."""
    return "asyncio"
