"""gateway.protocol stays sans-IO: no I/O, logging or edge-layer imports.

Checked on the source with ``ast``, so an import hidden in a function body or
behind ``TYPE_CHECKING`` is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gateway.protocol

PACKAGE_DIR = Path(gateway.protocol.__file__).parent
MODULES = sorted(PACKAGE_DIR.glob("*.py"))
FORBIDDEN_ROOTS = {"asyncio", "socket", "ssl", "logging", "structlog", "pydantic"}
ALLOWED_GATEWAY = ("gateway.protocol", "gateway.errors")


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against gateway.protocol
                base = "gateway.protocol" if node.level == 1 else "gateway"
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.append(module)
            # "from gateway import net" imports gateway.net
            names.extend(f"{module}.{alias.name}" for alias in node.names if module == "gateway")
    return names


def is_forbidden(name: str) -> bool:
    root = name.split(".", 1)[0]
    if root in FORBIDDEN_ROOTS:
        return True
    if name == "gateway":
        return False
    if root == "gateway":
        return not any(name == ok or name.startswith(ok + ".") for ok in ALLOWED_GATEWAY)
    return False


def test_the_protocol_package_has_the_expected_modules() -> None:
    assert {path.name for path in MODULES} >= {
        "__init__.py",
        "constants.py",
        "errors.py",
        "framing.py",
        "handshake.py",
        "messages.py",
        "scram.py",
        "startup.py",
    }


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_protocol_module_imports_no_io_logging_or_edge_layers(path: Path) -> None:
    offending = [name for name in imported_modules(path) if is_forbidden(name)]
    assert offending == []


@pytest.mark.parametrize(
    ("source", "forbidden"),
    [
        ("import asyncio", True),
        ("import ssl as _ssl", True),
        ("from logging import getLogger", True),
        ("import structlog.stdlib", True),
        ("from pydantic import BaseModel", True),
        ("from gateway.net import listener", True),
        ("from gateway import config", True),
        ("from gateway.errors import GatewayError", False),
        ("from gateway.protocol.errors import ProtocolError", False),
        ("from . import messages", False),
        ("import hashlib", False),
    ],
)
def test_the_checker_itself_tells_forbidden_imports_apart(
    source: str, forbidden: bool, tmp_path: Path
) -> None:
    module = tmp_path / "sample.py"
    module.write_text(f"def f() -> None:\n    {source}\n", encoding="utf-8")
    assert any(is_forbidden(name) for name in imported_modules(module)) is forbidden
