"""The configuration reference, read from the field docstrings of the schema (`pretrain config --keys`,
`--markdown`, and the README's table)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

from pretrain.config.schema import Config


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring literal written under it in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_help(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, docstring) for every leaf key, in declaration order."""
    rows = []
    docs = _attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(field_help(tp, prefix + f.name + "."))
        else:
            tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            if typing.get_origin(tp) is list:
                tname = f"list[{typing.get_args(tp)[0].__name__}]"
            elif typing.get_origin(tp) is dict:
                tname = "dict[" + ", ".join(a.__name__ for a in typing.get_args(tp)) + "]"
            rows.append((prefix + f.name, tname, getattr(default, f.name), docs.get(f.name, "")))
    return rows


def markdown_reference() -> str:
    """The README's configuration table: every key, its type, default and docstring."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tname, default, doc in field_help():
        lines.append(f"| `{key}` | {tname} | `{default!r}` | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
