"""Imports go one way: no module of `editr1_jax` is part of an import cycle, so a lower layer never reaches up.

Every import statement counts, those inside functions too (a lazy import that dodges a cycle is still one).
`from pkg import name` is an import of the module `pkg.name` when there is one, else of `pkg`; importing `pkg.sub`
counts as importing `pkg.sub` only, so a package's `__init__` that imports its own modules (a registry) is not a
cycle with them. Read with `ast`: nothing is imported.
"""

import ast
import collections
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "editr1_jax"


def import_graph(package: pathlib.Path) -> dict[str, dict[str, int]]:
  """module -> {module of the package it imports: line of the first such import}, for every module under
  `package` (a package is its `__init__.py`)."""
  files = {}
  for path in sorted(package.rglob("*.py")):
    parts = path.relative_to(package.parent).with_suffix("").parts
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  graph = {}
  for name, path in files.items():
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]  # what `from . import` names
    edges = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = here.rsplit(".", node.level - 1)[0]  # the package that `level` dots name
          base = f"{up}.{base}" if base else up
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
      else:
        continue
      for target in targets:
        while target and target not in files:  # the deepest module of the package that it names, if any
          target = target.rpartition(".")[0]
        if target and target != name:
          edges[target] = min(edges.get(target, node.lineno), node.lineno)
    graph[name] = edges
  return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """Shortest cycles (each a list of modules, every one importing the next, the last the first) until every module
  on a cycle is in one of them; [] when the imports go one way."""
  found, covered = [], set()
  for start in sorted(graph):
    if start in covered:
      continue
    parent, queue = {}, collections.deque([start])
    while queue and start not in parent:
      node = queue.popleft()
      for target in sorted(graph[node]):
        if target not in parent:
          parent[target] = node
          queue.append(target)
    if start in parent:
      cycle = [parent[start]]
      while cycle[-1] != start:
        cycle.append(parent[cycle[-1]])
      found.append(cycle[::-1])
      covered.update(cycle)
  return found


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
  return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:] + cycle[:1])) + f" -> {cycle[0]}"


def test_editr1_jax_has_no_import_cycle():
  graph = import_graph(PACKAGE)
  assert "editr1_jax.sharding" in graph["editr1_jax.nft"]  # the graph is read at all
  cycles = import_cycles(graph)
  assert not cycles, "import cycles:\n" + "\n".join(describe(c, graph) for c in cycles)


def test_every_kind_of_import_counts(tmp_path):
  """Relative, absolute, `from pkg import submodule`, function-level: each is an edge; a cycle through them is
  found, and goes once one edge goes."""
  files = {"__init__.py": "",
           "low.py": "import os\n\n\ndef f():\n  from pkg.sub import high  # a submodule, inside a function\n",
           "mid.py": "from .low import f  # a name of a module\n",
           "sub/__init__.py": "from . import high  # the package's own module: not a cycle\n",
           "sub/high.py": "from .. import mid\n",
           "other.py": "import numpy\nimport pkg.sub.high\nfrom pkg import sub\n"}
  for name, text in files.items():
    (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pkg" / name).write_text(text)
  graph = import_graph(tmp_path / "pkg")
  assert graph == {"pkg": {}, "pkg.low": {"pkg.sub.high": 5}, "pkg.mid": {"pkg.low": 1}, "pkg.other":
                   {"pkg.sub.high": 2, "pkg.sub": 3}, "pkg.sub": {"pkg.sub.high": 1}, "pkg.sub.high": {"pkg.mid": 1}}
  assert import_cycles(graph) == [["pkg.low", "pkg.sub.high", "pkg.mid"]]
  assert describe(["pkg.low", "pkg.sub.high", "pkg.mid"], graph) == (
      "pkg.low (line 5) -> pkg.sub.high (line 1) -> pkg.mid (line 1) -> pkg.low")
  (tmp_path / "pkg" / "low.py").write_text("import os\n")
  assert import_cycles(import_graph(tmp_path / "pkg")) == []
