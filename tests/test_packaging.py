"""The installed import name and the layers of the package (pyproject's package-dir mapping)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Layer -> the layers it may import (besides itself and the standard library / third parties).
_BASE = {"astronn_dist.worker.contract", "astronn_dist.worker.config", "astronn_dist.worker.devices",
         "astronn_dist.worker.tables"}
LAYERS = {
    "astronn_dist.worker.contract": set(),
    "astronn_dist.worker.config": {"astronn_dist.worker.contract"},
    "astronn_dist.worker.devices": set(),
    "astronn_dist.worker.tables": set(),
    "astronn_dist.worker.science": _BASE,
    "astronn_dist.worker.api": _BASE | {"astronn_dist.worker.science"},
    "astronn_dist.worker.service": _BASE | {"astronn_dist.worker.science"},
    "astronn_dist.worker.modeling": _BASE | {"astronn_dist.worker.science"},
}


def _layer(module: str) -> str | None:
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "astronn_dist." + ".".join(parts)


@pytest.mark.parametrize("path", sorted((REPO / "worker").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_no_layer_imports_what_stands_above_it(path: Path):
    """The science core imports neither the service nor the model tooling nor the producer; the
    service and the tooling import neither each other nor the producer."""
    if "migrations" in path.parts:
        return
    module = _module_name(path)
    layer = _layer(module)
    if layer is None:  # astronn_dist.worker itself (the version): imports nothing of ours
        assert not {m for m in _imports(path) if m.startswith("astronn_dist")}
        return
    for imported in _imports(path):
        if not imported.startswith("astronn_dist.") or imported in ("astronn_dist.worker", "astronn_dist.worker.PIPELINE_VERSION"):
            continue
        target = _layer(imported)
        assert target is not None, f"{module} imports {imported}, which is in no worker layer"
        assert target == layer or target in LAYERS[layer], f"{module} ({layer}) imports {imported} ({target})"


def test_nothing_imports_the_folder_names():
    """Every import of our code goes through astronn_dist (a plain ``import worker`` would load a
    second copy of a module from the checkout, or another distribution's ``worker``)."""
    offenders = []
    for path in [*REPO.glob("worker/**/*.py"), *REPO.glob("producer/**/*.py"), *REPO.glob("tests/*.py"),
                 *REPO.glob("bench/*.py")]:
        for imported in _imports(path):
            if imported.split(".")[0] in ("worker", "producer"):
                offenders.append(f"{path.relative_to(REPO)}: {imported}")
    assert offenders == []


def test_outside_the_checkout_only_astronn_dist_is_importable(tmp_path: Path):
    """From another folder, the generic names are not ours to claim, and the producer's commands
    (produce, status, export, report) load no torch."""
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('worker') is None, 'worker is importable'\n"
        "assert importlib.util.find_spec('producer') is None, 'producer is importable'\n"
        "import astronn_dist.producer.cli, astronn_dist.producer.export, astronn_dist.worker.service.results\n"
        "import astronn_dist.producer.report.page  # report: matplotlib, no torch\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
