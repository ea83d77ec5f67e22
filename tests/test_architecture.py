"""The layers of docs/architecture.md hold: every module of the package (and the packaged
configs) is in a layer; no import runs upward, none closes a circle, and no function imports a
module of the package. Failures name the file and line."""
import ast
import os
import re

import pytest

from conftest import REPO_ROOT

PACKAGE = "datafree_jax"
PACKAGE_DIR = os.path.join(REPO_ROOT, PACKAGE)
DOC = os.path.join(REPO_ROOT, "docs", "architecture.md")


def layer_table(text: str) -> list:
  """[(layer name, [module patterns])] of the doc's '| layer | modules |' table, bottom first."""
  rows = re.findall(r"^\| *([^|]+?) *\| *([^|]+?) *\|$", text, re.M)
  rows = [(name, [m.strip() for m in mods.split(",")]) for name, mods in rows
          if name != "layer" and not set(name) <= {"-"}]
  assert rows, "docs/architecture.md has no '| layer | modules |' table"
  return rows


def modules() -> dict:
  """{dotted name relative to the package: file path} of every module of the package (the
  packaged configs as configs.*, through the package's link to them)."""
  out = {}
  for root, dirs, files in os.walk(PACKAGE_DIR, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
    for name in sorted(files):
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), PACKAGE_DIR)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        if rel:
          out[".".join(rel)] = os.path.join(root, name)
  return out


def layer_of(module: str, table: list):
  for i, (_, patterns) in enumerate(table):
    for p in patterns:
      if module == p or (p.endswith(".*") and module.startswith(p[:-1])):
        return i
  return None


def imports_of(path: str, known: dict) -> list:
  """[(line, imported module relative to the package, at module level?)] of our own imports."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda, ast.ClassDef))
      if isinstance(child, ast.Import):
        for alias in child.names:
          if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
            out.append((child.lineno, alias.name[len(PACKAGE) + 1:], not in_function))
      elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 and (
          child.module == PACKAGE or child.module.startswith(PACKAGE + ".")):
        base = child.module[len(PACKAGE) + 1:]
        for alias in child.names:
          sub = f"{base}.{alias.name}" if base else alias.name
          # `from datafree_jax.models import BN_INPUTS` imports the package models.
          out.append((child.lineno, sub if sub in known else base, not in_function))
      visit(child, nested)
  visit(tree, False)
  return [(line, mod, top) for line, mod, top in out if mod]


@pytest.fixture(scope="module")
def graph():
  table = layer_table(open(DOC, encoding="utf-8").read())
  known = modules()
  edges = {m: imports_of(p, known) for m, p in known.items()}
  return table, known, edges


def _where(known, module, line):
  return f"{os.path.relpath(known[module], REPO_ROOT)}:{line}"


def test_every_module_has_a_layer(graph):
  table, known, _ = graph
  missing = sorted(m for m in known if layer_of(m, table) is None)
  assert not missing, f"modules in no layer of docs/architecture.md: {missing}"


def test_no_import_runs_upward(graph):
  table, known, edges = graph
  upward = []
  for m, imports in edges.items():
    for line, target, _ in imports:
      lm, lt = layer_of(m, table), layer_of(target, table)
      if lm is not None and lt is not None and lt > lm:
        upward.append(f"{_where(known, m, line)}: {m} ({table[lm][0]}) imports {target} "
                      f"({table[lt][0]})")
  assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_function_imports_a_module_of_the_package(graph):
  _, known, edges = graph
  inside = [f"{_where(known, m, line)}: imports {target} inside a function"
            for m, imports in edges.items() for line, target, top in imports if not top]
  assert not inside, "\n".join(inside)


def find_circles(edges: dict) -> list:
  """The strongly connected components of more than one module (or a module importing
  itself), each sorted (Tarjan's algorithm)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in edges.get(v, ()):
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      strong(v)
  return out


def test_the_imports_draw_no_circle(graph):
  _, known, edges = graph
  simple = {m: {t for _, t, _ in imports if t in known} for m, imports in edges.items()}
  circles = find_circles(simple)
  described = []
  for comp in circles:
    lines = [f"{_where(known, m, line)}: {m} -> {t}" for m in comp
             for line, t, _ in edges[m] if t in comp]
    described.append(f"circle of {len(comp)} modules:\n  " + "\n  ".join(lines))
  assert not circles, "\n".join(described)


def test_the_guard_finds_what_it_guards_against():
  """The checks above on a made-up graph: an upward import, a circle and a nested import are
  each found (a guard that cannot fail guards nothing)."""
  table = layer_table("| layer | modules |\n|---|---|\n| base | a, m.* |\n| top | b |\n")
  assert [layer_of(m, table) for m in ("a", "m.x", "b", "c")] == [0, 0, 1, None]
  assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert find_circles({"a": {"a"}}) == [["a"]]
  assert find_circles({"a": {"b"}, "b": set()}) == []
  src = os.path.join(REPO_ROOT, "tests", "_guard_probe.py")
  try:
    with open(src, "w", encoding="utf-8") as f:
      f.write("from datafree_jax import paths\n\ndef f():\n  from datafree_jax import log\n")
    assert imports_of(src, {"paths": "", "log": ""}) == [(1, "paths", True), (4, "log", False)]
  finally:
    os.remove(src)
