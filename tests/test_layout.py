"""The mandated folders live in one namespace and never shadow python-daemon's ``daemon``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, text=True,
                          capture_output=True).stdout.strip()


def test_import_daemon_is_python_daemon_from_repo_root() -> None:
    # With the repo root as cwd (first on sys.path), `daemon` must still be python-daemon.
    out = _python("import daemon; print(hasattr(daemon, 'DaemonContext'))", ROOT)
    assert out == "True"


def test_folders_map_into_virtio_diskd_namespace() -> None:
    out = _python("import virtio_diskd.daemon.cli as c, virtio_diskd.ioreq.xenstore.wire as w;"
                  "print(c.__file__); print(w.__file__)", Path("/"))
    cli_file, wire_file = out.splitlines()
    assert Path(cli_file).resolve() == ROOT / "daemon" / "cli.py"
    assert Path(wire_file).resolve() == ROOT / "ioreq" / "xenstore" / "wire.py"


def test_top_level_folders_are_namespace_portions() -> None:
    for folder in ("daemon", "backend", "ioreq"):
        assert not (ROOT / folder / "__init__.py").exists(), folder


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_backend_imports_neither_ioreq_nor_daemon_nor_trio() -> None:
    """Dependencies point one way: daemon → ioreq → backend; backend is sans-IO."""
    for path in (ROOT / "backend").rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(("virtio_diskd.ioreq", "virtio_diskd.daemon", "trio")), \
                f"{path.relative_to(ROOT)} imports {name}"
    for path in (ROOT / "ioreq").rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith("virtio_diskd.daemon"), f"{path} imports {name}"


def test_readme_setup_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = readme.split("<!-- setup -->", 2)[1]
    commands = [line for line in block.splitlines() if line and not line.startswith("```")]
    assert len(commands) == 2
    for command in commands:
        assert command in ci, command
