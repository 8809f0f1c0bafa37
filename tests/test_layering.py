"""The two halves never import each other, and the README documents every setting."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_service_never_imports_torch_or_model_export() -> None:
    offenders = {
        f: n & {"torch", "model_export", "torchvision"}
        for f, n in imported_modules("service").items()
    }
    assert not {f: n for f, n in offenders.items() if n}


def test_model_export_never_imports_service() -> None:
    offenders = {f: n & {"service"} for f, n in imported_modules("model_export").items()}
    assert not {f: n for f, n in offenders.items() if n}


def test_client_needs_neither_torch_nor_onnxruntime() -> None:
    offenders = {
        f: n & {"torch", "onnxruntime", "model_export", "service", "fastapi"}
        for f, n in imported_modules("client/jlad_client").items()
    }
    assert not {f: n for f, n in offenders.items() if n}


def test_readme_documents_every_setting_and_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"JLAD_{name.upper()}"
        for name in Settings.model_fields
        if f"`JLAD_{name.upper()}`" not in readme
    ]
    assert not missing
    first_screen = "\n".join(readme.splitlines()[:30])
    assert "make run" in first_screen and "make test" in first_screen
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert {"run", "test", "models", "setup"} <= targets
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
