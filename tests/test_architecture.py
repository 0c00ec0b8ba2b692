"""Dependencies run one way: services → contracts + shared; shared imports no service and no
contract; no service imports another service (pulse and cells share ``services.clinical``), and
no module imports another module's private name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_BY = {"clinical": {"pulse", "cells"}}
"""Packages under services/ that are not a service but the common ground of the services named."""


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) of every import in ``path``, nested ones included."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("shared"), ids=lambda p: str(p.relative_to(ROOT)))
def test_shared_imports_no_service_and_no_contract(path: Path) -> None:
    for module, _ in _imports(path):
        assert not module.startswith(("services", "contracts")), f"{path.relative_to(ROOT)} imports {module}"


@pytest.mark.parametrize("path", _modules("contracts"), ids=lambda p: str(p.relative_to(ROOT)))
def test_contracts_import_only_shared(path: Path) -> None:
    for module, _ in _imports(path):
        assert not module.startswith("services"), f"{path.relative_to(ROOT)} imports {module}"


@pytest.mark.parametrize("path", _modules("services"), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_service_imports_no_other_service(path: Path) -> None:
    parts = path.relative_to(ROOT / "services").parts
    own = parts[0] if len(parts) > 1 else None
    for module, _ in _imports(path):
        if not module.startswith("services."):
            continue
        other = module.split(".")[1]
        allowed = {own} | {name for name, users in SHARED_BY.items() if own in users}
        assert other in allowed, f"{path.relative_to(ROOT)} (service {own}) imports {module}"


@pytest.mark.parametrize(
    "path", [p for package in ("services", "shared", "contracts", "nephrotrack") for p in _modules(package)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_private_name_is_imported_from_another_module(path: Path) -> None:
    for module, names in _imports(path):
        private = [name for name in names if name.startswith("_") and not name.startswith("__")]
        assert not private, f"{path.relative_to(ROOT)} imports private {private} from {module}"
