"""The modelled training table of docs/which_parallelism.md: the best layout, the best Ulysses-alone and
the best two-level-alone layout for Llama-3-8B and 70B on 16, 32 and 64 H100s, s = 8K to 1M, batch 1 and 8.

``python -m ds_twolevel.tools.train_table`` prints it as markdown (deterministic: the same code gives
the same text); ``--zero`` picks the ZeRO stage (default 3).
"""
from __future__ import annotations

import argparse

from ds_twolevel.costmodel.hardware import get_profile
from ds_twolevel.costmodel.planner import PRESETS
from ds_twolevel.costmodel.train_planner import grid_table
from ds_twolevel.costmodel.training import ZERO_STAGES, TrainSetup

MODELS = ("llama-3-8b", "llama-3-70b")


def table(zero: int = 3, hardware: str = "h100") -> str:
    """The markdown table for ZeRO stage ``zero`` on ``hardware`` (activation checkpointing;
    sequence_parallel and vocab_parallel on at sp = 1, off at sp > 1 as the runtime composes Ulysses).

    Example:
        >>> print(table(zero=3))
    """
    return grid_table({name: PRESETS[name] for name in MODELS}, get_profile(hardware),
                      setup=TrainSetup(batch=1, seq=8192, zero=zero))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_twolevel.tools.train_table", description=__doc__)
    parser.add_argument("--zero", type=int, choices=ZERO_STAGES, default=3, help="ZeRO stage (default: %(default)s)")
    args = parser.parse_args(argv)
    print(table(args.zero))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
