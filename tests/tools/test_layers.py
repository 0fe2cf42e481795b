"""The package's layers, declared top to bottom, and its imports checked against them: a module
imports only from its own layer or a lower one, and no set of modules imports itself round
(a lazy import inside a function counts as much as one at the top). docs/design.md describes
the layers; a new module must be placed in one here."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "flex_flash_infer"
BENCH = PACKAGE.parent / "flex_flash_infer_bench"

LAYERS = [
    # tools: the command line, warm-up and drawings; nothing below imports them (the benchmarks are
    # the package flex_flash_infer_bench above these, the host compile check a test helper)
    ("tools", {"__main__", "cli", "warmup", "plot"}),
    # front doors: what users call
    ("doors", {"flex_flash_infer", "api", "wrapper", "paged", "varlen", "integrations",
               "integrations.transformers", "block_mask"}),
    # backends: FlashInfer's runners and their kernels, the reference, gradients
    ("backends", {"backend_choice", "flashinfer_backend", "reference", "autograd", "column_merge",
                  "column_merge_triton", "paged_kernels", "tile_kernels", "score_mod_kernels"}),
    # planning: which launches cover a mask (routes, bands, key columns, splits, pages)
    ("planning", {"plan", "planner", "route", "bands", "columns", "far_bias", "native_soft_cap", "ragged",
                  "paged_plan"}),
    # masks: tile states of a mask_mod and the tables built from them (the BlockMask users hold
    # is a front door: it plans)
    ("masks", {"block_build", "tile_bounds"}),
    # mods: the mask and score_mod library
    ("mods", "mods"),
    # compile: FlashInfer variants generated from traced mods
    ("compile", {"codegen", "variant", "variant_paged"}),
    # core: tracing and evaluating mods, argument checks, warnings
    ("core", {"trace", "mask_eval", "validation", "notices", "nan_merge"}),
]


def layer_of(module: str) -> int:
    for depth, (_, members) in enumerate(LAYERS):
        if members == "mods" and (module == "mods" or module.startswith("mods.")):
            return depth
        if members != "mods" and module in members:
            return depth
    raise AssertionError(f"flex_flash_infer.{module} is in no layer: add it to tests/tools/test_layers.py's LAYERS")


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
    assert len(g) > 40 and "api" in g["flex_flash_infer"] and "trace" in g["codegen"]
    assert "tile_bounds" in g["block_mask"] and "mods._captured" in g["mods.alibi"]


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)


def test_imports_point_down_the_layers():
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
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


def test_every_declared_module_exists_once():
    declared = [m for _, members in LAYERS if members != "mods" for m in members]
    assert len(declared) == len(set(declared)), "a module declared in two layers"
    assert not set(declared) - set(graph()), f"declared but gone: {set(declared) - set(graph())}"


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
