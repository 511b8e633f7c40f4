"""The import contracts in pyproject.toml hold, can break, and the trainer names no method."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(cwd)})


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three packages and pyproject.toml, to break a rule in a copy."""
    root = tmp_path_factory.mktemp("tree")
    for pkg in ("pipelines", "rrd_fast", "export"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_import_contracts_hold() -> None:
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("pipelines/augment.py", "import rrd_fast.config", "pipelines import nothing from rrd_fast or export"),
    ("rrd_fast/methods/kd.py", "import rrd_fast.trainer", "methods and memories import no trainer"),
    ("rrd_fast/checkpoint.py", "import rrd_fast.cache", "no import cycles"),
])
def test_a_forbidden_arrow_breaks_a_contract(tree_copy: Path, module: str, line: str, contract: str) -> None:
    path = tree_copy / module
    original = path.read_text()
    path.write_text(original + f"\n{line}  # noqa\n")
    try:
        proc = _lint(tree_copy)
    finally:
        path.write_text(original)
    assert proc.returncode != 0
    assert f"{contract}" in proc.stdout and "BROKEN" in proc.stdout.split(contract, 1)[1].splitlines()[0], proc.stdout[-3000:]


def test_the_training_loop_names_no_method() -> None:
    from rrd_fast.methods import list_methods
    from rrd_fast.methods.base import list_terms

    names = set(list_methods()) | set(list_terms())
    source = (REPO / "rrd_fast" / "trainer.py").read_text()
    found = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in names:
            found.add(tok.string)
        elif tok.type == tokenize.STRING and tok.string.strip("'\"rbf") in names:
            found.add(tok.string)
    assert not found, f"rrd_fast/trainer.py names methods {sorted(found)}"
