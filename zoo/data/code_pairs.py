"""Docstring -> code pairs extracted with `ast` from Python source text, for text-to-code retrieval.

`extract_doc_code_pairs(source)` takes the text of one Python file and returns, for every function, method and class
that has a docstring, in source order:

* `name`: its qualified name in the file ('Outer.method', 'func.<locals>.inner' is written 'func.inner');
* `query`: the first paragraph of its docstring (`inspect.cleandoc`, then up to the first blank line, lines joined by
  single spaces), as CodeSearchNet does (Husain et al. 2019, sec. 2.2: the documentation truncated to its first full
  paragraph);
* `document`: its source (decorators included, dedented) with every docstring inside it removed (its own and those of
  nested functions and classes), so no query's words appear in any document.

Definitions left without code once their docstrings are gone (a docstring-only body) and queries of fewer than
`MIN_QUERY_WORDS` words are skipped. Pure functions; the `stdlib_doc_code` builder (`zoo.data.builders`) applies them
to standard-library files.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap

MIN_QUERY_WORDS = 3  # [guess] shorter docstrings ('Return self.', 'Constructor.') say too little to retrieve by
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclasses.dataclass(frozen=True)
class DocCodePair:
  """One definition: `name` (qualified in its file), `query` (docstring summary), `document` (code, no docstrings)."""

  name: str
  query: str
  document: str


def docstring_summary(docstring: str) -> str:
  """The first paragraph of a docstring, its lines stripped and joined by single spaces."""
  lines = []
  for line in inspect.cleandoc(docstring).splitlines():
    if not line.strip():
      if lines:
        break
      continue
    lines.append(line.strip())
  return " ".join(lines)


def _docstring_node(node: ast.AST) -> ast.Expr | None:
  """The docstring statement of a module, function or class node, or None."""
  body = getattr(node, "body", None)
  if body and isinstance(body[0], ast.Expr):
    value = body[0].value
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
      return body[0]
  return None


def _offsets(lines: list[str]) -> list[int]:
  """Character offset of the start of each line (1-based line numbers index offsets[lineno - 1])."""
  offsets, total = [], 0
  for line in lines:
    offsets.append(total)
    total += len(line)
  return offsets


def _position(lines, offsets, lineno, col_offset):
  """The character offset of (lineno, UTF-8 byte column) in the text."""
  line = lines[lineno - 1]
  return offsets[lineno - 1] + len(line.encode("utf-8")[:col_offset].decode("utf-8", errors="replace"))


def _document(node, lines, offsets) -> str | None:
  """The source of `node` (decorators included) with every docstring inside it removed and blank lines left by them
  dropped, dedented; None when no code remains."""
  first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
  start, end = offsets[first - 1], _position(lines, offsets, node.end_lineno, node.end_col_offset)
  text, cuts = "".join(lines), []
  for inner in ast.walk(node):
    doc = _docstring_node(inner) if isinstance(inner, _DEFINITIONS) else None
    if doc is not None:
      cut_start = _position(lines, offsets, doc.lineno, doc.col_offset)
      cut_end = _position(lines, offsets, doc.end_lineno, doc.end_col_offset)
      separator = re.match(r"[ \t]*;[ \t]*", text[cut_end:])  # 'def f(): "doc"; return 1'
      cut_end += separator.end() if separator else 0
      # A nested definition whose body was only its docstring keeps a body: '...'.
      cuts.append((cut_start, cut_end, "..." if inner is not node and len(inner.body) == 1 else ""))
  cursor, pieces = start, []
  for cut_start, cut_end, replacement in sorted(cuts):
    pieces.append(text[cursor:cut_start] + replacement)
    cursor = cut_end
  pieces.append(text[cursor:end])
  kept = [line for line in "".join(pieces).splitlines() if line.strip()]
  code = textwrap.dedent("\n".join(kept))
  # No code left: a definition whose body was only its docstring (the header line is all that remains).
  body_left = any(
    not (isinstance(s, ast.Expr) and s is _docstring_node(node)) and not isinstance(s, ast.Pass) for s in node.body
  )
  return code if body_left else None


def extract_doc_code_pairs(source: str) -> list[DocCodePair]:
  """Every (qualified name, docstring summary, code without docstrings) of the functions, methods and classes of one
  Python file that have a docstring of at least `MIN_QUERY_WORDS` words and some code besides it, in source order.

  Args:
    source: the text of a Python file.

  Returns:
    The pairs, in the order of the definitions' first lines.

  Raises:
    SyntaxError: `source` is not valid Python for the running interpreter.
  """
  tree = ast.parse(source)
  lines = source.splitlines(keepends=True)
  offsets = _offsets(lines)
  pairs = []

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, _DEFINITIONS):
        name = f"{prefix}{child.name}"
        docstring = ast.get_docstring(child, clean=False)
        if docstring is not None:
          query = docstring_summary(docstring)
          document = _document(child, lines, offsets) if len(query.split()) >= MIN_QUERY_WORDS else None
          if document is not None:
            pairs.append(DocCodePair(name, query, document))
        visit(child, f"{name}.")
      else:
        visit(child, prefix)

  visit(tree, "")
  return pairs
