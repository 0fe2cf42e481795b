"""The package's layers, top to bottom, and its imports checked against them: a module imports only
from its own layer or a lower one, and no set of modules imports itself round (a lazy import inside
a function counts as much as one at the top). Each layer below the front doors is a folder of the
package (docs/design.md describes them); the front doors are the package's top-level modules."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "flex_flash_infer"
BENCH = PACKAGE.parent / "flex_flash_infer_bench"

# the front doors: what users call (the BlockMask users hold is one: it plans)
DOORS = {"flex_flash_infer", "api", "wrapper", "paged", "varlen", "block_mask", "context_parallel", "integrations",
         "integrations.transformers"}
LAYERS = [
    "tools",      # the command line, warm-up and drawings; nothing below imports them
    "doors",
    "backends",   # FlashInfer's runners and their kernels, the reference, gradients
    "planning",   # which launches cover a mask (routes, bands, key columns, splits, pages)
    "masks",      # tile states of a mask_mod and the tables built from them
    "mods",       # the mask and score_mod library
    "compile",    # FlashInfer variants generated from traced mods
    "core",       # tracing and evaluating mods, argument checks, warnings, the NaN-aware merge
]


def layer_of(module: str) -> int:
    if module == "__main__":   # `python -m flex_flash_infer` is the command line
        return LAYERS.index("tools")
    if module in DOORS:
        return LAYERS.index("doors")
    folder = module.split(".")[0]
    if folder in LAYERS and folder != "doors":
        return LAYERS.index(folder)
    raise AssertionError(f"flex_flash_infer.{module} is in no layer: a module goes in its layer's folder "
                         "(or, a front door, in DOORS of tests/tools/test_layers.py)")


def modules() -> dict:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "flex_flash_infer"
        found[name] = path
    return found


def imports(name: str, path: pathlib.Path, known) -> set:
    """The package's modules that this one imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    package = "" if package == "flex_flash_infer" else package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
                if not (base == "flex_flash_infer" or base.startswith("flex_flash_infer.")):
                    continue
                base = base[len("flex_flash_infer."):] if "." in base else ""
            targets = [f"{base}.{a.name}" if base else a.name for a in node.names]
            targets = [t if t in known else (base or "flex_flash_infer") for t in targets]
        else:
            continue
        for target in targets:
            target = target[len("flex_flash_infer."):] if target.startswith("flex_flash_infer.") else target
            if target in known and target != name:
                found.add(target)
    return found


GRAPH = None


def graph() -> dict:
    global GRAPH
    if GRAPH is None:
        known = modules()
        GRAPH = {name: imports(name, path, known) for name, path in known.items()}
    return GRAPH


def test_the_import_reader_sees_the_package():
    g = graph()
    assert len(g) > 40 and "api" in g["flex_flash_infer"] and "core.trace" in g["compile.codegen"]
    assert "masks.tile_bounds" in g["block_mask"] and "mods._captured" in g["mods.alibi"]


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)


def test_imports_point_down_the_layers():
    upward = [f"{name} ({LAYERS[layer_of(name)]}) imports {target} ({LAYERS[layer_of(target)]})"
              for name, targets in graph().items() for target in targets if layer_of(target) < layer_of(name)]
    assert not upward, "imports that climb a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    g, order, low, stack, on_stack, cycles = graph(), {}, {}, [], set(), []

    def visit(v):
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in order:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_every_layer_is_a_folder_and_every_door_exists():
    folders = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert folders == set(LAYERS) - {"doors"} | {"integrations"}, folders
    assert not DOORS - set(graph()), f"declared but gone: {DOORS - set(graph())}"


def _imported_modules(node) -> list:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level:
        return [node.module or ""]
    return []


def test_the_benchmarks_sit_above_the_library():
    """flex_flash_infer_bench imports the library; the library never imports it, but for the
    command line's bench command, inside the function that runs it."""
    climbing = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for n in ast.walk(f)}
        for node in ast.walk(tree):
            for target in _imported_modules(node):
                if target.split(".")[0] == "flex_flash_infer_bench" and (path.name != "cli.py"
                                                                         or id(node) not in in_functions):
                    climbing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target}")
    assert not climbing, "the library imports the benchmarks:\n" + "\n".join(climbing)
    bench_imports = {target.split(".")[0] for path in BENCH.rglob("*.py")
                     for node in ast.walk(ast.parse(path.read_text())) for target in _imported_modules(node)}
    assert "flex_flash_infer" in bench_imports and "flex_flash_infer_bench" not in bench_imports, \
        "the benchmarks import the library absolutely and each other relatively"
