"""The package's import graph has no circles, and only the model families test architecture names.

Walks every edtools module with ast (module-level, in-function and TYPE_CHECKING imports alike).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edtools"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the edtools modules it imports anywhere in its source (a name imported from a package that
    is itself a module of it counts as that module)."""
    files = {_module_name(p): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    # importing a.b.c runs a/__init__ and a/b/__init__ first; a package's own modules importing it are not
    # circles of the code, so only the explicitly named modules are edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_walk_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "edtools.errors" in graph["edtools.config"]
    assert "edtools.models.single_file" in graph["edtools.models.sd"]  # imported inside a function
    assert "edtools.models.families" in graph["edtools.models.sd"]


def test_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


# String tests on an architecture or family name: `architecture == "sdxl"`, `architecture in (...)`,
# `.architecture.startswith(...)`, `TABLE[architecture]`, `x == "sd2"`. Outside models/families/ the package
# asks the family instead.
_ARCHITECTURE_TESTS = re.compile(
    r"architecture\w*\s*[!=]="
    r"|architecture\w*\s+(?:not\s+)?in\s*[\(\[\{\"']"
    r"|architecture\w*\)?\.startswith"
    r"|\[\s*[\w.]*architecture\w*\s*\]"
    r"|[!=]=\s*[\"'](?:sd|sd1|sd2|sdxl)[\"']"
    r"|[\"'](?:sd|sd1|sd2|sdxl)[\"']\s*(?:[!=]=|\bin\b)"
    r"|\bin\s*[\(\[\{]\s*[\"'](?:sd|sd1|sd2|sdxl)[\"']"
)


def architecture_tests(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        if "families" in path.relative_to(package).parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if _ARCHITECTURE_TESTS.search(code):
                found.append(f"{path.relative_to(package.parent)}:{number}: {line.strip()}")
    return found


def test_the_grep_finds_architecture_tests(tmp_path):
    (tmp_path / "a.py").write_text(
        'x = 1 if architecture == "sdxl" else 2\n'
        "y = TABLE[components.architecture]\n"
        'z = arch in ("sd1", "sd2")\n'
        'if architecture.startswith("sd"):\n'
        "    pass\n"
        'ok = family(architecture).name  # architecture == "sdxl" in a comment is fine\n',
        encoding="utf-8",
    )
    assert [line.split(": ", 1)[0] for line in architecture_tests(tmp_path)] == [
        f"{tmp_path.name}/a.py:{n}" for n in (1, 2, 3, 4)
    ]


def test_only_the_families_test_architecture_names():
    found = architecture_tests()
    assert found == [], "architecture string tests outside edtools/models/families/:\n" + "\n".join(found)


# The flow of the package, bottom to top: a module imports from its own layer or the ones below, never above.
# (The package's __init__ only re-exports and is not a layer.)
LAYERS = (
    ("errors", "atomic"),
    ("dataset",),  # the scan: folders, headers, captions, multiply.txt / loss_scale.txt
    ("balance",),  # schedules, held-out images, reports, rebalancing rules
    ("data",),  # loading: images, captions, batches, latents
    ("models",),  # families, loaders, LoRA, single files
    ("presets", "coerce", "config", "flags"),  # settings: what the model and the GPU allow
    ("train", "demo"),
    ("widgets", "cli", "__main__", "install"),
)


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else None
    for number, names in enumerate(LAYERS):
        if top in names:
            return number
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        here = _layer(module)
        for target in sorted(targets):
            there = _layer(target)
            if here is not None and there is not None and there > here:
                found.append(f"{module} -> {target}")
    return found


def test_every_module_has_a_layer():
    tops = {m.split(".")[1] for m in import_graph() if "." in m}
    assert sorted(t for t in tops if _layer(f"edtools.{t}") is None) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {"edtools.dataset.scan": {"edtools.train.loop"}, "edtools.train.loop": {"edtools.dataset.scan"}}
    assert upward_imports(graph) == ["edtools.dataset.scan -> edtools.train.loop"]


def test_imports_only_go_down_the_flow():
    found = upward_imports(import_graph())
    assert found == [], (
        "imports up the flow (scan -> balance -> data -> models -> settings -> train -> UI):\n"
        + ("\n".join(found))
    )
