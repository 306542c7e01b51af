"""``ds-twolevel`` command line: one sub-command per module, listed in :data:`SUBCOMMANDS`.

A sub-command's module defines ``add_arguments(parser)`` and ``main(args) -> int``; to add one,
add one line to :data:`SUBCOMMANDS`. Bad input ends with one line on stderr and exit status 2:
argparse's own errors (:class:`OneLineParser`) and every ``ValueError`` a sub-command raises.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from ds_twolevel import __version__

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: (module with add_arguments(parser) and main(args), one-line help)
    "demo": ("ds_twolevel.tools.demo", "run a transformer block on local gloo ranks and compare it with the dense block"),
    "plan": ("ds_twolevel.tools.plan", "rank every dp x n x m layout of P devices for a model with the cost model"),
    "bench": ("ds_twolevel.tools.bench", "benchmark layouts on local gloo ranks; write the docs/performance tables"),
    "convert": ("ds_twolevel.deepspeed.convert", "write dense fp32 weights (a Hugging Face directory) from a two-level DeepSpeed checkpoint"),
    "prebuild": ("ds_twolevel.deepspeed.env", "compile DeepSpeed's CPU shm comm op for this environment now"),
}

DESCRIPTION = ("Attention partitioned over n head groups x m head-dim segments: n*m ranks per layer, "
               "exactly equivalent to the dense layer.")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...; see prog --help``), exit 2.

    Under a launcher (``RANK`` set) only rank 0 prints it: every rank would say the same."""

    def error(self, message: str) -> NoReturn:
        line = f"{self.prog}: error: {message} (see {self.prog} --help)\n"
        self.exit(2, line if os.environ.get("RANK", "0") == "0" else None)


def int_in(text: str, low: int, high: int | None, what: str) -> int:
    """argparse type helper: ``text`` as an int in [low, high), else argparse's usage error naming ``what``."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value >= high):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a bad value becomes argparse's one-line usage error)."""
    return int_in(text, 1, None, "an int >= 1")


def _chosen(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names (its first word that is one), if any."""
    return next((word for word in argv if word in SUBCOMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the sub-command ``argv`` names is imported (all of them when ``argv`` is None),
    so ``ds-twolevel --help`` and ``--version`` import neither torch nor deepspeed."""
    parser = OneLineParser(prog="ds-twolevel", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    chosen = _chosen(argv) if argv is not None else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if argv is not None and name != chosen:
            sub.add_parser(name, help=help_text)  # listed in --help, its module not imported
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=getattr(module, "HELP", help_text), allow_abbrev=False,
                           formatter_class=getattr(module, "HELP_FORMATTER", argparse.HelpFormatter))
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; the exit status (2: bad input, one line on stderr)."""
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exit_:  # argparse: --help / --version (0) or a usage error (2), already printed
        return int(exit_.code or 0)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad layout / shapes: a clear message, no traceback
        print(f"ds-twolevel {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
