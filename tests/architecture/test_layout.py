"""The architecture, checked: package layers, no import cycles, a torch-free worker, one producer,
short hot-path functions.

Read from the source (``ast``), so a lazy import inside a function counts like a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("streamrec", "streams", "profiles", "alerts", "inference", "evaluation", "benchmarks", "devstack")
# What runs in the worker; everything else is offline tooling.
WORKER_PACKAGES = ("streams", "profiles", "alerts", "inference")
# Tools on top of everything: the CLI, the schema generator, the `validate` command.
OFFLINE = (
    "inference.training",
    "evaluation",
    "benchmarks",
    "devstack",
    "streamrec.cli",
    "streamrec.schemas",
    "streamrec.validate",
)
MAX_HOT_FUNCTION_LINES = 80


def _modules() -> Iterator[tuple[str, Path]]:
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            yield ".".join(parts), path


MODULES = dict(_modules())


def _imports(path: Path, module: str) -> set[str]:
    """First-party modules imported anywhere in the file (resolved to known module names)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = module.split(".")[: -node.level] if path.name != "__init__.py" else module.split(".")
            names.add(".".join([*base, node.module] if node.module else base))
    return {n for n in names if n in MODULES and n != module}


GRAPH = {m: _imports(p, m) for m, p in MODULES.items()}


def _is_offline(module: str) -> bool:
    return any(module == o or module.startswith(o + ".") for o in OFFLINE)


def _package(module: str) -> str:
    return module.split(".")[0]


def test_the_graph_is_read() -> None:
    assert "streams.pipeline" in GRAPH["streams.agents"] or "streams.context" in GRAPH["streams.agents"]
    assert "profiles.store" in GRAPH["streams.pipeline"]


def test_no_import_cycle_between_modules() -> None:
    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if seen.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in seen:
                visit(n)
        stack.pop()
        seen[m] = 2

    for m in sorted(GRAPH):
        if m not in seen:
            visit(m)


def test_packages_depend_one_way() -> None:
    """core ← profiles, inference, alerts ← streams; offline tools sit on top, nothing imports them."""
    allowed = {
        "streamrec": {"streamrec"},
        "profiles": {"streamrec", "profiles"},
        "alerts": {"streamrec", "alerts"},
        "inference": {"streamrec", "inference", "alerts"},
        "streams": {"streamrec", "profiles", "alerts", "inference", "streams"},
    }
    bad = []
    for m, deps in GRAPH.items():
        if _is_offline(m):
            continue
        for d in deps:
            if _is_offline(d):
                bad.append(f"{m} imports offline tooling {d}")
            elif _package(d) not in allowed.get(_package(m), set()):
                bad.append(f"{m} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def test_only_the_producer_module_constructs_a_kafka_producer() -> None:
    offenders = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name == "Producer" and m != "streamrec.kafka":
                    offenders.append(f"{m}:{node.lineno}")
    assert not offenders, f"construct producers through streamrec.kafka.KafkaProducer: {offenders}"


def test_hot_path_functions_are_short() -> None:
    long = []
    for m, path in MODULES.items():
        if _package(m) not in WORKER_PACKAGES or _is_offline(m):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_HOT_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, f"hot-path functions over {MAX_HOT_FUNCTION_LINES} lines: {long}"


def test_the_worker_imports_no_torch_matplotlib_or_tqdm() -> None:
    worker_modules = sorted(
        m for m in MODULES if _package(m) in (*WORKER_PACKAGES, "streamrec") and not _is_offline(m)
    )
    code = (
        "import importlib, sys\n"
        f"for m in {worker_modules!r}: importlib.import_module(m)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'matplotlib', 'tqdm', 'transformers'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the worker's modules import {out.stdout.strip()}"
    assert "streams.app" in worker_modules and "inference.encoder" in worker_modules


_BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed (blocked by the test)")
        return None

sys.meta_path.insert(0, Block())
"""


def test_a_worker_without_any_extra_imports_and_starts_its_app(tmp_path) -> None:
    """``pip install .`` without extras: no torch, transformers, matplotlib, tqdm, yaml, onnxruntime.

    The offline and optional libraries are made unimportable; every worker module must still
    import, and the faust app (plug-ins loaded lazily at start) must build.
    """
    blocked = ("torch", "transformers", "matplotlib", "tqdm", "yaml", "onnxruntime")
    worker_modules = sorted(
        m for m in MODULES if _package(m) in (*WORKER_PACKAGES, "streamrec") and not _is_offline(m)
    )
    code = _BLOCKER.format(blocked=blocked) + (
        "import importlib\n"
        f"for m in {worker_modules!r}: importlib.import_module(m)\n"
        "from streamrec.settings import Settings\n"
        "from streams.app import create_app\n"
        f"app = create_app(Settings(state_dir={str(tmp_path)!r}), encoder_factory=None)\n"
        "print(type(app).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("App")
