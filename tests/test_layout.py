"""The house rules: one namespace, dependencies one way, the simulator sealed off.

* The mandated folders live in one namespace and never shadow python-daemon's
  ``daemon``.
* Dependencies point one way: daemon → ioreq → backend; backend is sans-IO.
* The simulated world (``ioreq/sim/``) and the tools (``daemon/tools/``) are
  imported only by tests, by each other, and lazily by the CLI; the product
  never imports them.  The simulated guest driver imports nothing of the
  device (``backend/``), so it checks the device instead of agreeing with it.
* Xen knowledge lives under ``ioreq/``: no xenstore device path and no guest
  mapping call in ``daemon/``; one definition of the MMIO window.
* One name per concept: no class name is defined in two modules.

Each rule is a function over a source tree; the last tests plant a violation of
every rule in a copy of the tree and show that each is caught.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("daemon", "backend", "ioreq")
SIMULATOR = "virtio_diskd.ioreq.sim"
TOOLS = "virtio_diskd.daemon.tools"


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
    for folder in FOLDERS:
        assert not (ROOT / folder / "__init__.py").exists(), folder


def test_readme_setup_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = readme.split("<!-- setup -->", 2)[1]
    commands = [line for line in block.splitlines() if line and not line.startswith("```")]
    assert len(commands) == 2
    for command in commands:
        assert command in ci, command


# -- the rules, as functions over a tree ---------------------------------------------------


def _module(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(("virtio_diskd", *rel.parts)).removesuffix(".__init__")


def _sources(root: Path) -> Iterator[tuple[str, Path]]:
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            yield _module(root, path), path


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(imported module, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, id(node) in top
            for alias in node.names:  # "from virtio_diskd.ioreq import sim"
                yield f"{node.module}.{alias.name}", id(node) in top


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_product(module: str) -> bool:
    return not (_within(module, SIMULATOR) or _within(module, TOOLS))


def one_way_dependencies(root: Path) -> list[str]:
    """daemon → ioreq → backend; backend knows neither Xen nor trio."""
    found = []
    for module, path in _sources(root):
        for name, _top in _imports(path):
            if _within(module, "virtio_diskd.backend") and (
                    name.startswith(("virtio_diskd.ioreq", "virtio_diskd.daemon"))
                    or name.split(".")[0] == "trio"):
                found.append(f"{module} imports {name}")
            if _within(module, "virtio_diskd.ioreq") and name.startswith("virtio_diskd.daemon"):
                found.append(f"{module} imports {name}")
    return found


def simulator_sealed_off(root: Path) -> list[str]:
    """Only tests, tools and the simulator itself import the simulator or the tools;
    the CLI may reach the tools lazily (inside a function)."""
    found = []
    for module, path in _sources(root):
        if not _is_product(module):
            continue
        for name, top in _imports(path):
            if _within(name, SIMULATOR) or (_within(name, TOOLS) and (
                    module != "virtio_diskd.daemon.cli" or top)):
                found.append(f"{module} imports {name}")
    return found


def simulated_driver_is_independent(root: Path) -> list[str]:
    """The simulator carries its own copy of the rules it checks the device against."""
    return [f"{module} imports {name}" for module, path in _sources(root)
            if _within(module, SIMULATOR)
            for name, _top in _imports(path)
            if name.startswith(("virtio_diskd.backend", "virtio_diskd.daemon"))]


_XEN_IN_DAEMON = re.compile(r"/local/domain|backend/virtio_disk|\.(foreignmemory|gnttab|"
                            r"map_resource|map_domain_grant_refs|map)\(")


def xen_knowledge_under_ioreq(root: Path) -> list[str]:
    """No xenstore device path and no guest-memory mapping call in the daemon's process
    modules; one definition of the MMIO window."""
    found = []
    for module, path in _sources(root):
        text = path.read_text()
        if _within(module, "virtio_diskd.daemon") and _is_product(module):
            found += [f"{module}: {m.group(0)!r}" for m in _XEN_IN_DAEMON.finditer(text)]
        redefined = re.search(r"^WINDOW_SIZE\s*=", text, re.M) or re.search(r"\b0x200\b", text)
        if redefined and _is_product(module) and module != "virtio_diskd.backend.mmio":
            found.append(f"{module} defines the MMIO window size again")
    return found


def one_name_per_class(root: Path) -> list[str]:
    where: dict[str, list[str]] = {}
    for module, path in _sources(root):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(module)
    return [f"class {name} in {', '.join(mods)}" for name, mods in where.items()
            if len(mods) > 1]


RULES: list[Callable[[Path], list[str]]] = [
    one_way_dependencies, simulator_sealed_off, simulated_driver_is_independent,
    xen_knowledge_under_ioreq, one_name_per_class,
]


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_the_tree_keeps_the_rule(rule: Callable[[Path], list[str]]) -> None:
    assert rule(ROOT) == []


def test_sans_io_modules_do_no_io() -> None:
    """The protocol cores take bytes and events and return effects."""
    for rel in ("backend/mmio.py", "backend/virtqueue.py", "backend/blk.py",
                "ioreq/xenbus.py", "ioreq/xen/abi.py"):
        for name, _top in _imports(ROOT / rel):
            assert name.split(".")[0] not in {"trio", "socket", "threading", "subprocess",
                                              "asyncio", "select"}, f"{rel} imports {name}"


# -- each rule catches a planted violation ---------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _plant(path: Path, text: str) -> None:
    path.write_text(path.read_text() + "\n" + text + "\n")


PLANTED = {
    one_way_dependencies: ("backend/blk.py", "import trio"),
    simulator_sealed_off: ("daemon/worker.py",
                           "from virtio_diskd.ioreq.sim.hypervisor import Hypervisor"),
    simulated_driver_is_independent: ("ioreq/sim/linux_driver.py",
                                      "from virtio_diskd.backend.virtqueue import "
                                      "vring_need_event"),
    xen_knowledge_under_ioreq: ("daemon/supervisor.py",
                                "ROOT = '/local/domain/0/backend/virtio_disk'"),
    one_name_per_class: ("ioreq/server.py", "class VirtioBlk:\n    pass"),
}


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_a_planted_violation_is_caught(tree: Path, rule: Callable[[Path], list[str]]) -> None:
    assert rule(tree) == []
    rel, text = PLANTED[rule]
    _plant(tree / rel, text)
    assert rule(tree), f"{rule.__name__} missed: {text!r} in {rel}"


def test_the_cli_may_reach_the_tools_only_lazily(tree: Path) -> None:
    _plant(tree / "daemon/cli.py", "from virtio_diskd.daemon.tools import bench")
    assert simulator_sealed_off(tree) == ["virtio_diskd.daemon.cli imports "
                                          "virtio_diskd.daemon.tools",
                                          "virtio_diskd.daemon.cli imports "
                                          "virtio_diskd.daemon.tools.bench"]


def test_a_second_window_size_is_caught(tree: Path) -> None:
    _plant(tree / "ioreq/devconfig.py", "WINDOW_SIZE = 0x200")
    assert xen_knowledge_under_ioreq(tree) == [
        "virtio_diskd.ioreq.devconfig defines the MMIO window size again"]
