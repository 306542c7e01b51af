"""The modelled training table of docs/which_parallelism.md: the best layout, the best Ulysses-alone and
the best two-level-alone layout for Llama-3-8B and 70B on 16, 32 and 64 H100s, s = 8K to 1M, batch 1 and 8.

``python -m ds_twolevel.tools.train_table`` prints it as markdown (deterministic: the same code gives
the same text); ``--zero`` picks the ZeRO stage (default 3). ``--update PAGE`` rewrites, in place, the
page's table and its excerpt of ``ds-twolevel plan --phase train`` (Llama-3-8B, 16 GPUs, s = 128K, batch 1).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ds_twolevel.costmodel.hardware import H100_SXM, get_profile
from ds_twolevel.costmodel.planner import PRESETS
from ds_twolevel.costmodel.train_planner import format_train_plan, grid_table, plan_train
from ds_twolevel.costmodel.training import ZERO_STAGES, TrainSetup

MODELS = ("llama-3-8b", "llama-3-70b")
TABLE_HEAD = "| model | GPUs | seq | batch |"
EXCERPT_HEAD = "```text\n**llama-3-8b** training on 16 x"
EXCERPT_ROWS = 5
"""layouts the excerpt shows (the best and the next four)."""


def table(zero: int = 3, hardware: str = "h100") -> str:
    """The markdown table for ZeRO stage ``zero`` on ``hardware`` (activation checkpointing;
    sequence_parallel and vocab_parallel on at sp = 1, off at sp > 1 as the runtime composes Ulysses).

    Example:
        >>> print(table(zero=3))
    """
    return grid_table({name: PRESETS[name] for name in MODELS}, get_profile(hardware),
                      setup=TrainSetup(batch=1, seq=8192, zero=zero))


def excerpt() -> str:
    """The page's excerpt of the plan for Llama-3-8B on 16 H100s, batch 1 x seq 131072: the setup line,
    the header, the first :data:`EXCERPT_ROWS` layouts, "| ... |" and the why line.

    Example:
        >>> excerpt().splitlines()[0][:40]
        '**llama-3-8b** training on 16 x h100, ba'
    """
    model, setup = PRESETS["llama-3-8b"], TrainSetup(batch=1, seq=131072)
    lines = format_train_plan(model, 16, setup, H100_SXM, plan_train(model, 16, setup, H100_SXM)).splitlines()
    return "\n".join(lines[:4 + EXCERPT_ROWS] + ["| ... |"] + [l for l in lines if l.startswith("Why: ")])


def _replace_block(page: str, head: str, new: str, end: str) -> str:
    """``page`` with the block that starts at ``head`` and runs up to ``end`` replaced by ``new``."""
    if head not in page:
        raise ValueError(f"the page has no block starting {head.splitlines()[-1]!r}")
    start = page.index(head)
    stop = page.index(end, start + len(head))
    return page[:start] + new + page[stop:]


def update_page(path: str | Path) -> bool:
    """Rewrite ``path``'s table (ZeRO-3, H100) and plan excerpt with the current cost model; True when the
    text changed.

    Example:
        >>> update_page("docs/which_parallelism.md")
        False
    """
    path = Path(path)
    page = path.read_text()
    new = _replace_block(page, TABLE_HEAD, table(zero=3), "\n\n")
    new = _replace_block(new, EXCERPT_HEAD, "```text\n" + excerpt() + "\n", "```\n")
    if new != page:
        path.write_text(new)
    return new != page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_twolevel.tools.train_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zero", type=int, choices=ZERO_STAGES, default=3, help="ZeRO stage (default: %(default)s)")
    parser.add_argument("--update", metavar="PAGE", default=None,
                        help="rewrite PAGE's table (ZeRO-3) and plan excerpt in place instead of printing")
    args = parser.parse_args(argv)
    if args.update:
        print(f"{args.update}: {'updated' if update_page(args.update) else 'unchanged'}")
        return 0
    print(table(args.zero))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
