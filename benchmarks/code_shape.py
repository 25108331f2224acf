"""The shape of the code: lines per module, the longest functions, the import graph.

    python benchmarks/code_shape.py              # pipeline/ and tools/
    python benchmarks/code_shape.py --longest 20

Reads the files as text (ast), imports nothing. The import graph lists, for
each module of pipeline/, the pipeline modules it imports at the top and
(in brackets) those it imports inside a function; a cycle among them is
printed as one line (top-level and deferred imports together).
"""
import argparse
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("pipeline", "tools")


def _modules(folder):
    path = os.path.join(ROOT, folder)
    return sorted(n[:-3] for n in os.listdir(path) if n.endswith(".py"))


def _tree(folder, name):
    with open(os.path.join(ROOT, folder, name + ".py"), encoding="utf-8") as f:
        text = f.read()
    return text, ast.parse(text)


def _functions(tree, prefix=""):
    """(qualified name, lines) of every function and method, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node.end_lineno - node.lineno + 1
            yield from _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")


def _pipeline_imports(tree, known):
    """{module: deferred?} of the pipeline modules `tree` imports."""
    top = {id(n) for n in tree.body}
    found = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module in ("upright.pipeline", "pipeline"):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("upright.pipeline.")):
            names = [node.module.rsplit(".", 1)[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.rsplit(".", 1)[1] for a in node.names
                     if a.name.startswith("upright.pipeline.")]
        for name in names:
            if name in known:
                deferred = id(node) not in top
                found[name] = found.get(name, True) and deferred
    return found


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--longest", type=int, default=10)
    args = parser.parse_args()
    functions, graph = [], {}
    known = set(_modules("pipeline"))
    for folder in FOLDERS:
        total = 0
        print(f"## {folder}/ lines")
        for name in _modules(folder):
            text, tree = _tree(folder, name)
            lines = text.count("\n")
            total += lines
            print(f"{lines:6d}  {folder}/{name}.py")
            functions += [(n, f"{folder}/{name}.py:{q}") for q, n in _functions(tree)]
            if folder == "pipeline":
                graph[name] = _pipeline_imports(tree, known - {name})
        print(f"{total:6d}  total")
    print(f"## the {args.longest} longest functions")
    for lines, where in sorted(functions, key=lambda x: (-x[0], x[1]))[:args.longest]:
        print(f"{lines:6d}  {where}")
    print("## pipeline import graph (module: top-level [deferred])")
    for name, deps in sorted(graph.items()):
        top = sorted(d for d, deferred in deps.items() if not deferred)
        later = sorted(d for d, deferred in deps.items() if deferred)
        print(f"{name}: {' '.join(top)}" + (f" [{' '.join(later)}]" if later else ""))
    cycles = _cycles({k: sorted(v) for k, v in graph.items()})
    print("## cycles: " + ("; ".join(" <-> ".join(c) for c in cycles) if cycles else "none"))


if __name__ == "__main__":
    main()
