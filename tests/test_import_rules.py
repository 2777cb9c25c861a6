"""The architecture's import rules (docs/architecture.md), checked over every import statement of `rlhf/` and `envs/`.

Function-level imports count: they run as soon as the function does. Imports under `if TYPE_CHECKING:` do not:
they never execute. A rule is about what a package can reach, so each is checked over the transitive closure of
imports, and importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf", "envs")

TOP_LEVEL = {"__init__", "__main__", "cli", "config"}
"""What `rlhf/` keeps at its top level: the entry point and the Hydra schema."""
SHIMS = {"report", "wandb_sync", "pretrained"}
"""Old public paths kept as deprecation shims (each only re-points to its new module)."""
SHARED_STAGE_MODULES = {"rlhf.stages", "rlhf.stages.base", "rlhf.stages.trl_common"}
"""The registry and what every stage shares: the only `rlhf.stages.*` modules a stage may import."""

FORBIDDEN = {
    "rlhf.ppo": ("rlhf.tracking", "rlhf.config", "rlhf.run", "rlhf.stages", "rlhf.cli"),
    "rlhf.models": (
        "rlhf.ppo",
        "rlhf.stages",
        "rlhf.run",
        "rlhf.tracking",
        "rlhf.rewards",
        "rlhf.task",
        "rlhf.config",
        "rlhf.cli",
    ),
    "rlhf.tracking": ("rlhf.ppo", "rlhf.stages"),
    "rlhf.common": tuple(
        f"rlhf.{p}"
        for p in ("ppo", "models", "run", "stages", "tracking", "rewards", "task", "config", "cli")
    ),
    "envs": ("rlhf",),
}
"""package -> what no module of it may reach, directly or through other modules."""


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST, package: str) -> list[str]:
    """Every module an import statement of `tree` names, outside `if TYPE_CHECKING:` blocks; `from a import b`
    yields both `a` and `a.b` (b may be a submodule)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (and the packages' `__init__` those imports run)."""
    files = {module_name(root, p): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for imported in imported_names(ast.parse(path.read_text(), str(path)), package):
            parts = imported.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & files.keys()
        graph[name] = edges - {name}
    return graph


def reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` reaches -> the module that imports it on one shortest path (for the message)."""
    seen, frontier = {start: ""}, [start]
    while frontier:
        nxt = []
        for module in frontier:
            for target in sorted(graph.get(module, ())):
                if target not in seen:
                    seen[target] = module
                    nxt.append(target)
        frontier = nxt
    del seen[start]
    return seen


def path_to(via: dict[str, str], start: str, target: str) -> str:
    chain = [target]
    while via[chain[-1]] != start:
        chain.append(via[chain[-1]])
    return " -> ".join([start, *reversed(chain)])


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(root: Path) -> list[str]:
    """Every broken rule, one line each, naming the chain of imports that breaks it."""
    graph = import_graph(root)
    found = []
    for module in sorted(graph):
        reached = reach(graph, module)
        for package, forbidden in FORBIDDEN.items():
            if within(module, package):
                for target in sorted(reached):
                    if any(within(target, f) for f in forbidden):
                        found.append(f"{package} must not reach {target}: {path_to(reached, module, target)}")
        if within(module, "rlhf.stages") and module not in SHARED_STAGE_MODULES:
            for target in sorted(reached):
                if within(target, "rlhf.stages") and target not in SHARED_STAGE_MODULES:
                    found.append(f"stages never import each other: {path_to(reached, module, target)}")
    return found


def test_the_project_keeps_its_import_rules():
    assert violations(ROOT) == []


def test_rlhf_top_level_keeps_only_the_entry_point_and_the_schema():
    modules = {p.stem for p in (ROOT / "rlhf").glob("*.py")}
    assert modules - SHIMS == TOP_LEVEL


@pytest.mark.parametrize("name", sorted(SHIMS))
def test_a_shim_only_points_to_its_new_module(name):
    """A shim holds no code of its own, so the concept still lives in one place."""
    tree = ast.parse((ROOT / "rlhf" / f"{name}.py").read_text())
    defined = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)]
    assert defined == []


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in PACKAGES:
        (root / pkg).mkdir(exist_ok=True)
    return root


CLEAN = {
    "rlhf/__init__.py": "",
    "rlhf/config.py": "from rlhf.ppo.config import PPOConfig\n",
    "rlhf/ppo/__init__.py": "",
    "rlhf/ppo/config.py": "from rlhf.common import fields\n",
    "rlhf/ppo/trainer.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rlhf.config import X\n",
    "rlhf/common/__init__.py": "",
    "rlhf/common/fields.py": "",
    "rlhf/tracking/__init__.py": "",
    "rlhf/tracking/console.py": "",
    "rlhf/stages/__init__.py": "",
    "rlhf/stages/base.py": "",
    "rlhf/stages/sft.py": "from rlhf.stages.base import StageResult\n",
    "rlhf/stages/ppo.py": "from rlhf.stages import REGISTRY\nfrom rlhf.ppo import trainer\n",
    "envs/__init__.py": "",
}


def test_a_clean_tree_passes(tmp_path):
    assert violations(write_tree(tmp_path, CLEAN)) == []


@pytest.mark.parametrize(
    ("path", "code", "expected"),
    [
        (
            "rlhf/ppo/trainer.py",
            "def step():\n    from rlhf.tracking.console import ppo_line\n",
            "rlhf.ppo must not reach rlhf.tracking.console: rlhf.ppo.trainer -> rlhf.tracking.console",
        ),
        (
            "rlhf/ppo/trainer.py",
            "from .config import PPOConfig\nfrom rlhf.common.fields import one_of\n",
            None,
        ),
        (
            "rlhf/common/fields.py",
            "import rlhf.config\n",
            "rlhf.common must not reach rlhf.config: rlhf.common.fields -> rlhf.config",
        ),
        (
            "rlhf/stages/sft.py",
            "from rlhf.stages import ppo\n",
            "stages never import each other: rlhf.stages.sft -> rlhf.stages.ppo",
        ),
        ("envs/__init__.py", "from rlhf.common import fields\n", "envs must not reach rlhf.common"),
    ],
)
def test_a_broken_rule_is_named_with_its_import_chain(tmp_path, path, code, expected):
    root = write_tree(tmp_path, {**CLEAN, path: code})
    found = violations(root)
    if expected is None:
        assert found == []
    else:
        assert any(line.startswith(expected) for line in found), found
