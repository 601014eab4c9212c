"""The direction of the dependencies, checked on the source (ast, nothing imported):

- rapnet/ (the model library) imports nothing from edge/, cloud/, orchestration/ or benchmarks/;
- edge/ never imports cloud/, except edge/embedded_cloud.py (the demo's embedded local cloud), and of
  orchestration/ only the planner side (orchestration.planner, orchestration.calibration);
- cloud/ never imports edge/ or orchestration/;
- the planner side imports nothing from the simulator, the traces, the live runs or any CLI module;
- no library module imports a CLI module (the modules behind the console scripts);
- no module reads another project module's private (_underscore) names.

Every import counts: module level and inside functions, `import x` and `from x import y`, relative ones
resolved against the importing module's package.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rapnet", "edge", "cloud", "orchestration", "benchmarks")
# The modules behind the console scripts (pyproject.toml [project.scripts]).
CLI_MODULES = frozenset({"rapnet.evaluate", "rapnet.train", "edge.agent", "cloud.cli", "orchestration.cli"})
PLANNER_SIDE = frozenset({"orchestration.planner", "orchestration.calibration"})
NOT_FOR_PLANNER = ("orchestration.simulator", "orchestration.traces", "orchestration.live")
EMBEDDED_CLOUD = "edge.embedded_cloud"
SCRIPT_PACKAGES = ("benchmarks",)  # scripts, not library code


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (for `from m import n`: m, or m.n when that is a module)
    names: tuple[str, ...]  # the names taken by `from m import ...` (empty for `import m`)
    line: int


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _project(module: str) -> bool:
    return any(_in(module, p) for p in PACKAGES)


def _is_package(name: str, sources: dict[str, str]) -> bool:
    return any(m.startswith(name + ".") for m in sources)


def _resolve(module: str, level: int, target: str | None, sources: dict[str, str]) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if not level:
        return target or ""
    package = module.split(".") if f"{module}.__init__" in sources else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, source: str, sources: dict[str, str]) -> tuple[list[Import], list[tuple[str, str, int]]]:
    """(every import of `module`, every `alias._name` attribute read where alias is an imported project module)."""
    tree = ast.parse(source, filename=module)
    found: list[Import] = []
    aliases: dict[str, str] = {}  # local name -> project module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, (), node.lineno))
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module, sources)
            names = tuple(a.name for a in node.names)
            modules_taken = [a for a in node.names if f"{base}.{a.name}" in sources or _is_package(f"{base}.{a.name}", sources)]
            other_names = tuple(n for n in names if n not in {a.name for a in modules_taken})
            if other_names or not modules_taken:  # `from pkg import module` counts as importing pkg.module only
                found.append(Import(module, base, other_names, node.lineno))
            for a in modules_taken:
                found.append(Import(module, f"{base}.{a.name}", (), node.lineno))
                aliases[a.asname or a.name] = f"{base}.{a.name}"
    private_reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _dotted(node.value)
            if chain is None:
                continue
            head, _, rest = chain.partition(".")
            if head in aliases:
                target = aliases[head] + ("." + rest if rest else "")
                if _project(target) and target != module:
                    private_reads.append((target, node.attr, node.lineno))
    return found, private_reads


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def check(sources: dict[str, str]) -> list[str]:
    """The rule violations, one line each, in a tree given as module name -> source. A package's `__init__`
    appears twice: as `pkg.__init__` (which marks `pkg` as a package for relative imports) and as `pkg`."""
    problems = []
    for module, source in sorted(sources.items()):
        if module.endswith(".__init__"):
            continue
        found, private_reads = imports_of(module, source, sources)
        library = not any(_in(module, p) for p in SCRIPT_PACKAGES) and module not in CLI_MODULES
        for imp in found:
            where = f"{module}:{imp.line} imports {imp.target}"
            t = imp.target
            if not _project(t):
                continue
            if _in(module, "rapnet") and not _in(t, "rapnet"):
                problems.append(f"{where}: rapnet/ is the model library and imports no other project package")
            if _in(module, "edge"):
                if _in(t, "cloud") and module != EMBEDDED_CLOUD:
                    problems.append(f"{where}: edge/ does not import cloud/ (only {EMBEDDED_CLOUD} does)")
                if _in(t, "orchestration") and t != "orchestration" and not any(_in(t, p) for p in PLANNER_SIDE):
                    problems.append(f"{where}: edge/ imports only the planner side of orchestration/ "
                                    f"({', '.join(sorted(PLANNER_SIDE))})")
                if _in(t, "benchmarks"):
                    problems.append(f"{where}: edge/ does not import benchmarks/")
            if _in(module, "cloud") and any(_in(t, p) for p in ("edge", "orchestration", "benchmarks")):
                problems.append(f"{where}: cloud/ imports neither edge/ nor orchestration/")
            if module in PLANNER_SIDE and (any(_in(t, p) for p in NOT_FOR_PLANNER) or t in CLI_MODULES):
                problems.append(f"{where}: the planner side imports nothing from the simulator, traces, live runs "
                                "or a CLI module")
            if library and t in CLI_MODULES:
                problems.append(f"{where}: a library module imports a CLI module")
            if library and _in(t, "benchmarks"):
                problems.append(f"{where}: a library module imports a benchmark script")
            for name in imp.names:
                if _private(name) and t != module:
                    problems.append(f"{module}:{imp.line} takes {t}.{name}: another module's private name")
        for target, name, line in private_reads:
            problems.append(f"{module}:{line} reads {target}.{name}: another module's private name")
    return problems


def project_sources(root: Path = ROOT) -> dict[str, str]:
    sources = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            sources[".".join(parts)] = path.read_text()
            if parts[-1] == "__init__":
                sources.setdefault(".".join(parts[:-1]), path.read_text())
    return sources


def test_the_project_keeps_the_dependency_rules():
    problems = check(project_sources())
    assert not problems, "\n".join(problems)


def test_the_checker_reports_every_kind_of_forbidden_import():
    tree = {
        "rapnet.__init__": "", "rapnet": "",
        "rapnet.network": "import torch\n",
        "rapnet.evaluate": "def main():\n    pass\n",
        "rapnet.helpers": "def f():\n    from edge import decide\n",  # function-level import
        "edge.__init__": "", "edge": "",
        "edge.decide": "from orchestration.planner import Planner\nfrom orchestration import calibration\n",
        "edge.link": "from cloud.security import TLSFiles\n",
        "edge.embedded_cloud": "from cloud.server import CloudServer\n",  # the one allowed exception
        "edge.report": "import orchestration.simulator\n",
        "edge.agent": "from rapnet.evaluate import main\n",  # a CLI may import a CLI
        "cloud.__init__": "", "cloud": "",
        "cloud.front": "from ..edge import link\n",  # relative, resolved
        "cloud.cli": "",
        "cloud.app": "def f():\n    import orchestration.planner\n",
        "orchestration.__init__": "", "orchestration": "",
        "orchestration.planner": "from .traces import ModelTraces\n",
        "orchestration.calibration": "from orchestration.cli import main\n",
        "orchestration.traces": "from .calibration import payload_sizes\nfrom rapnet.evaluate import run\n",
        "orchestration.cli": "",
        "orchestration.simulator": "from .planner import _helper\nfrom . import traces\nx = traces._cache\n",
        "orchestration.live": "import orchestration.planner as p\ny = p._local\nz = p.__doc__\n",
        "benchmarks.__init__": "", "benchmarks": "",
        "benchmarks.bench": "from orchestration.cli import _world\nfrom rapnet.evaluate import main\n",
    }
    problems = check(tree)
    expected = [
        "rapnet.helpers:2 imports edge.decide",  # rapnet imports edge (via `from edge import decide`)
        "edge.link:1 imports cloud.security",
        "edge.report:1 imports orchestration.simulator",
        "cloud.front:1 imports edge.link",
        "cloud.app:2 imports orchestration.planner",
        "orchestration.planner:1 imports orchestration.traces",
        "orchestration.calibration:1 imports orchestration.cli",
        "orchestration.traces:2 imports rapnet.evaluate",
        "orchestration.simulator:1 takes orchestration.planner._helper",
        "orchestration.simulator:3 reads orchestration.traces._cache",
        "orchestration.live:2 reads orchestration.planner._local",
        "benchmarks.bench:1 takes orchestration.cli._world",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)
    # and nothing else: the allowed imports stay quiet
    allowed = ("edge.decide", "edge.embedded_cloud", "edge.agent", "rapnet.network", "benchmarks.bench:2")
    assert not [p for p in problems if p.startswith(allowed)], problems
    assert len(problems) == len(expected) + 1, problems  # calibration -> cli breaks two rules
