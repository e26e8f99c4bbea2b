"""The layout keeps its promises (docs/architecture.md): no import cycles, small modules and functions, and no
code outside the strategies asking which strategy it runs under."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import trainrig

SRC = Path(trainrig.__file__).parent


def _modules() -> dict[str, Path]:
    def name(p: Path) -> str:
        parts = ["trainrig", *p.relative_to(SRC).with_suffix("").parts]
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return {name(p): p for p in SRC.rglob("*.py")}


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every trainrig module ``module`` imports when it runs, at the top or inside a function (a deferred import
    hides a cycle, it does not remove it), with the subpackages whose ``__init__`` that runs first; imports
    under ``if TYPE_CHECKING:`` (annotations only, never executed) are not counted."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 1)}
    return {m for m in found | parents if m in known and m != module and not module.startswith(m + ".")}


def test_no_import_cycles():
    known = _modules()
    graph = {m: _imports(m, p, known) for m, p in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return path + [m, dep]
            if dep not in state and (cycle := visit(dep, path + [m])):
                return cycle
        state[m] = 2
        return None
    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_modules_and_functions_stay_small():
    too_long = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.relative_to(SRC)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 40:
                too_long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not too_long, too_long


def test_only_strategies_ask_for_a_strategy_name():
    """Outside parallel/, code asks the strategy class (group, processes, check), never its name."""
    names = "|".join(re.escape(n) for n in trainrig.parallel.STRATEGIES)
    asks = re.compile(rf"strategy\s*(==|!=|in\b)|[\"']({names})[\"']\s*(==|!=|in\b)|\.name\s*(==|!=)\s*[\"']({names})")
    found = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in SRC.rglob("*.py") if "parallel" not in p.parts
             for i, line in enumerate(p.read_text().splitlines(), 1) if asks.search(line)]
    assert not found, found


def test_importing_trainrig_leaves_the_heavy_libraries_for_later():
    """``import trainrig`` (every CLI command, Ray trial worker and torchrun rank pays it) does not import
    torchvision (which loads torch._dynamo: ~2 s of a fresh process's ~3 s), Ray, matplotlib or the loggers;
    each is imported where it is used."""
    heavy = ("torchvision", "ray", "matplotlib", "torch._dynamo", "tensorboard", "mlflow", "wandb")
    code = f"import sys, trainrig.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]"], out.stdout
