"""The package's shape: no import circles, no private names across modules, no facade imports inside it,
modules of one concern (docs/design.md, "Map of the packages").

The import graph is read from the source (``ast``), every import counted, function-local ones included: an
import moved into a function to dodge a circle is still a circle.
"""
import ast
import keyword
import re
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "radial_jax"
# The packages from the bottom up (docs/design.md §8): a module imports only from its own package or those below.
LAYERS = ("version", "defaults", "reporting", "scale", "data", "models", "checkpoints", "serving", "radial",
          "profiling", "training", "pipeline", "cli")
# Conveniences on the user's handle reach up by design: ``Model.generate``, ``Model.decoding`` and
# ``Model.tokenizer``.
UPWARD_ALLOWED = {("radial_jax.models.bundle", "radial_jax.serving.generation"),
                  ("radial_jax.models.bundle", "radial_jax.serving.decoding"),
                  ("radial_jax.models.bundle", "radial_jax.checkpoints.tokenizer")}
MAX_LINES = 400  # a longer module says why in a line starting with LONG_REASON near its top
LONG_REASON = "# Longer than 400 lines:"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, node) -> list:
    """``(module it resolves to, name or None)`` for each name an import statement brings in."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the package of ``module``
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    return [(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, alias.name)
            for alias in node.names]


def owning_module(name: str):
    """The module of ours that ``name`` (a dotted import target) lives in, or None when it is not ours."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_edges():
    """``{module: {(target module, name or None, line)}}`` over every import of the package."""
    edges = {}
    for module, path in MODULES.items():
        found = edges.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name in imported(module, node):
                    owner = owning_module(target)
                    if owner is not None and owner != module:
                        found.add((owner, name, node.lineno))
    return edges


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_circle_and_passes_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_has_no_circle():
    graph = {m: {target for target, _, _ in found} for m, found in import_edges().items()}
    assert cycles(graph) == []


def test_no_module_imports_a_private_name_of_another():
    private = sorted(f"{module}:{line} imports {name} from {target}"
                     for module, found in import_edges().items() for target, name, line in found
                     if name and name.startswith("_") and not name.startswith("__"))
    assert private == []


def test_no_module_inside_the_package_imports_the_package_facade():
    facade = sorted(f"{module}:{line}" for module, found in import_edges().items()
                    for target, _, line in found if target == "radial_jax" and module != "radial_jax")
    assert facade == []


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else len(LAYERS)  # the facade sits on top


def test_every_package_has_a_layer():
    assert {m.split(".")[1] for m in MODULES if "." in m} == set(LAYERS)


def test_a_package_imports_only_from_the_layers_below_it_and_commands_sit_on_top():
    upward = sorted(f"{module}:{line} imports {target}" for module, found in import_edges().items()
                    if not module.endswith(".cli")  # a command module may use anything
                    for target, _, line in found
                    if layer_of(target) > layer_of(module) and (module, target) not in UPWARD_ALLOWED)
    assert upward == []


def test_a_module_over_400_lines_says_why_at_its_top():
    unexplained = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(line.startswith(LONG_REASON) for line in lines[:60]):
            unexplained.append(f"{path.relative_to(PACKAGE.parent)}: {len(lines)} lines")
    assert unexplained == [], f"split these by concern, or say why not in a line starting with {LONG_REASON!r}"


SHARED_RUN = 6  # lines: a run this long, of the same shape in two family files, is boilerplate to share
VALUES = ("True", "False", "None")  # keywords that are values: blanked like numbers
_TOKEN = re.compile(r"""("[^"]*"|'[^']*'|\b\d[\w.]*|\b[A-Za-z_]\w*)""")


def line_shape(line: str) -> str:
    """A code line with its names (not keywords), numbers and strings blanked; a trailing comment's words kept
    (they differ where a line says something of its own). Blank and comment-only lines have no shape."""
    code, _, comment = line.partition("  #")
    code = code.strip()
    if not code or code.startswith("#"):
        return ""

    def blank(match):
        word = match.group()
        return word if keyword.iskeyword(word) and word not in VALUES else "_"

    return _TOKEN.sub(blank, code) + ("  #" + comment if comment else "")


def shared_runs(a: list, b: list, run: int = SHARED_RUN) -> list:
    """``(line in a, line in b)`` (1-based) where ``run`` shaped lines in a row have the same shapes in both."""
    shaped_a = [(i + 1, s) for i, s in enumerate(map(line_shape, a)) if s]
    shaped_b = [(i + 1, s) for i, s in enumerate(map(line_shape, b)) if s]
    seen = {}
    for k in range(len(shaped_a) - run + 1):
        seen.setdefault(tuple(s for _, s in shaped_a[k:k + run]), shaped_a[k][0])
    return [(seen[key], shaped_b[k][0]) for k in range(len(shaped_b) - run + 1)
            if (key := tuple(s for _, s in shaped_b[k:k + run])) in seen]


def test_the_run_finder_finds_same_shape_fields_and_passes_documented_ones():
    fields = ["class A:", "    a: int = 1", "    b: int = 2", "    c: str = 'x'", "    d: int = 4",
              "    e: bool = True"]
    renamed = ["class B:", "    p: int = 7", "    q: int = 8", "", "    r: str = 'y'", "    s: int = 9",
               "    t: bool = False"]
    assert shared_runs(fields, renamed) == [(1, 1)]
    documented = renamed[:2] + ["    q: int = 8  # the inner width"] + renamed[3:]
    assert shared_runs(fields, documented) == []


def config_class_lines(path: pathlib.Path) -> list:
    """The source lines of the family's config class (the name tables below it are data, alike by design)."""
    lines = path.read_text().splitlines()
    classes = [node for node in ast.parse("\n".join(lines)).body
               if isinstance(node, ast.ClassDef) and node.name.endswith("Config")]
    return [line for node in classes for line in lines[node.lineno - 1:node.end_lineno]]


def test_no_two_family_configs_share_a_run_of_same_shape_lines():
    texts = {p.name: config_class_lines(p) for p in sorted((PACKAGE / "models" / "families").glob("[!_]*.py"))}
    assert all(texts.values())
    pairs = [f"{a} ~ {b}: class lines {la} ~ {lb}" for i, a in enumerate(texts) for b in list(texts)[i + 1:]
             for la, lb in shared_runs(texts[a], texts[b])]
    assert pairs == [], "share what two families repeat (models/config_base.py), or say what each line holds"
