"""The generated parts of docs/reference_config.md and docs/reference_cli.md, from the code itself.

``python -m ds_twolevel.tools.reference`` rewrites the blocks between ``<!-- generated: NAME -->`` and
``<!-- end generated -->`` in those pages; tests/test_docs_reference.py fails when a page differs
from what the code generates (a ``"two_level"`` key or a flag added without the docs).

Example:
    >>> print(two_level_table())   # | key | type | default | meaning |
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
HELP_COLUMNS = "100"
"""argparse wraps help at the terminal width: fixed here so the pages do not depend on it."""


def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's attribute docstrings (the string right after each field), one line each."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    out = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            out[node.target.id] = " ".join(str(after.value.value).split())
    return out


def _kind(key) -> str:
    from ds_twolevel.deepspeed.config_schema import _choices

    if key.choices:
        return ", ".join(f"`{json.dumps(c)}`" for c in _choices(key)) + (" or null" if key.nullable else "")
    text = {"int": "integer", "number": "number", "bool": "bool", "str": "string"}.get(key.kind, key.kind)
    if key.low is not None:
        text += f" ≥ {key.low:g}" + (f", ≤ {key.high:g}" if key.high is not None else "")
    return text + (" or null" if key.nullable else "")


def two_level_table() -> str:
    """Markdown table of every ``"two_level"`` key: type, default, meaning (from ``TwoLevelConfig``)."""
    from ds_twolevel.deepspeed.config import REQUIRED, TwoLevelConfig, keys

    docs = field_docs(TwoLevelConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(TwoLevelConfig)}
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key in keys():
        name = key.path.split(".", 1)[1]
        default = "required" if name in REQUIRED else f"`{json.dumps(defaults[name])}`"
        meaning = docs[name].replace("|", "\\|")
        rows.append(f"| `{name}` | {_kind(key)} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def cli_help() -> str:
    """``ds-twolevel --help`` and every sub-command's ``--help``, as fenced text blocks."""
    from ds_twolevel.tools.cli import SUBCOMMANDS, build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        parts = [("ds-twolevel --help", build_parser([]).format_help())]
        for name in SUBCOMMANDS:
            parser = build_parser([name])
            sub = next(a for a in parser._actions if a.dest == "command").choices[name]  # noqa: SLF001
            parts.append((f"ds-twolevel {name} --help", sub.format_help()))
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "".join(f"### `{title}`\n\n```text\n{text.rstrip()}\n```\n\n" for title, text in parts)


GENERATORS = {"two-level-keys": two_level_table, "cli-help": cli_help}
PAGES = ("reference_config.md", "reference_cli.md")


def render(text: str) -> str:
    """``text`` with every generated block replaced by what its generator returns now."""
    return BLOCK.sub(lambda m: m.group(1) + GENERATORS[m.group("name")]() + m.group(4), text)


def main() -> None:
    for page in PAGES:
        path = DOCS / page
        path.write_text(render(path.read_text()))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
