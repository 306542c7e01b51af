"""``ds-twolevel`` command line: one sub-command per module, each registering itself here."""
from __future__ import annotations

import argparse
import sys

from . import bench, convert, demo, planner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-twolevel", description="m x n partitioned attention")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a block on local gloo ranks and compare with dense")
    demo.add_arguments(p)
    p.set_defaults(func=demo.main)
    p = sub.add_parser("plan", help="rank every dp x n x m layout of P devices with the cost model")
    planner.add_arguments(p)
    p.set_defaults(func=planner.main)
    p = sub.add_parser("bench", help="benchmark layouts on local gloo ranks; write docs/performance tables")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)
    p = sub.add_parser("convert", help="dense fp32 weights (a Hugging Face directory) of a two-level DeepSpeed checkpoint")
    convert.add_arguments(p)
    p.set_defaults(func=convert.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad layout / shapes: a clear message, no traceback
        print(f"ds-twolevel: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
