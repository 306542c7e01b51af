"""``ds-twolevel plan``: the layout planner's command line (a preset or a Hugging Face config.json).

``ds-twolevel plan --model llama-3-8b --devices 16 --phase decode --seq 8192 --batch 16`` lists
every dp x n x m layout with its predicted step time, memory and traffic, best first
(:func:`ds_twolevel.costmodel.planner.plan`). A ``config.json`` becomes the cost model's
``ModelConfig`` through ``hf_integration.specs.cost_model_config`` (its shapes, and the facts its
architecture's spec knows: gated MLP, q/k norms, RoPE style).
"""
from __future__ import annotations

import argparse
import json
import os

from ds_twolevel.costmodel import ModelConfig, Phase
from ds_twolevel.costmodel.hardware import HardwareProfile, get_profile
from ds_twolevel.costmodel.planner import PRESETS, format_plan, no_layout_message, plan
from ds_twolevel.costmodel.train_planner import format_train_plan, plan_train
from ds_twolevel.costmodel.training import ZERO_STAGES, TrainSetup
from ds_twolevel.tools.cli import positive_int
from ds_twolevel.strategies import registry

HELP = """\
List every dp x n x m layout of P devices for a model (a preset or a Hugging Face config.json) with
its predicted step time, memory and traffic, best first, and say why the others cannot run. n head
groups x m head-dim segments share each layer (n*m ranks; m = 1 is head-wise tensor parallelism),
dp replicas of it split the batch. Example: ds-twolevel plan --model llama-3-8b --devices 16
--phase decode --batch 64 --seq 8192. When no layout of P devices fits, it says so, names the
nearest device counts that have one, and exits with status 2.

--phase train models one training step of every dp x sp x n x m layout (sp: DeepSpeed Ulysses sequence
ranks outside the two-level group; Ulysses alone is n = m = 1): per-rank memory (weights, gradients and
Adam states under --zero, activations with or without --checkpointing, logits), bytes sent and step
time; it lists the layouts that fit --memory-gb, best first, and says in one line why the best wins.
Layouts with sp > 1 are predicted as the runtime runs them: without sequence_parallel and vocab_parallel.
Example: ds-twolevel plan --phase train --model llama-3-8b --devices 16 --seq 131072 --batch 1.
"""
HELP_FORMATTER = argparse.RawDescriptionHelpFormatter


def _read_json(path: str) -> dict:
    """A config.json as a dict; ValueError naming the path otherwise."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--model {path}: cannot read it as JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"--model {path}: a config.json holds a JSON object, got {type(config).__name__}")
    return config


def load_model(name_or_path: str) -> ModelConfig:
    """A preset name or the path of a Hugging Face ``config.json`` (or of its directory).

    A config is labelled with its ``_name_or_path`` (the Hub id it was saved from) when it has one,
    else with the path as given.

    Example:
        >>> load_model("llama-3-8b").kv_heads
        8
    """
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    from hf_integration.specs import cost_model_config  # transformers only for a config.json

    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    if not os.path.isfile(path):
        raise ValueError(f"--model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json path")
    config = _read_json(path)
    label = str(config.get("_name_or_path") or "") or name_or_path
    try:
        return cost_model_config(config, name=label)
    except (TypeError, ZeroDivisionError) as err:
        raise ValueError(f"--model {path}: unusable shapes in the config ({err})") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ds_twolevel.costmodel.hardware import PROFILES

    parser.add_argument("--model", required=True,
                        help=f"a preset ({', '.join(PRESETS)}) or the path of a Hugging Face config.json (or its directory)")
    parser.add_argument("--devices", type=positive_int, required=True, metavar="P", help="number of devices P")
    parser.add_argument("--seq", type=positive_int, default=4096, metavar="N",
                        help="prompt length (prefill) or KV-cache length (decode) (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=8, metavar="N",
                        help="global batch, split over dp (default: %(default)s)")
    parser.add_argument("--phase", choices=("prefill", "decode", "train"), default="prefill",
                        help="train: one training step of every dp x sp x n x m layout (Ulysses sp ranks outside a "
                             "two-level group), memory broken down (default: %(default)s)")
    parser.add_argument("--hardware", choices=sorted(PROFILES), default="h100",
                        help="hardware profile (default: %(default)s)")
    parser.add_argument("--strategy", choices=registry.choices(), default=registry.AUTO,
                        help="attention strategy (the registry's names); cost_model: per call, the least predicted time on the "
                             "hardware profile; "
                             "kv_shard: a KV cache held by position (prefill by seq_rows) (default: %(default)s)")
    train = parser.add_argument_group("training (--phase train)")
    train.add_argument("--zero", type=int, choices=ZERO_STAGES, default=3,
                       help="ZeRO stage, sharding over the dp x sp ranks of each shard (default: %(default)s)")
    train.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="activation checkpointing of every layer (default: on)")
    train.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=True,
                       help="two-level's residual stream split over its n x m ranks, in layouts with sp = 1 (off "
                            "at sp > 1, as the runtime composes Ulysses) (default: on)")
    train.add_argument("--vocab-parallel", action=argparse.BooleanOptionalAction, default=True,
                       help="embedding, LM head and loss split over n x m by vocabulary rows, in layouts with sp = 1 "
                            "(off at sp > 1) (default: on)")
    train.add_argument("--memory-gb", type=float, default=None, metavar="GB",
                       help="memory bound per device (default: the hardware profile's, 80 for h100)")


def train_main(args: argparse.Namespace, model: ModelConfig, hw: HardwareProfile) -> int:
    """``--phase train``: print every dp x sp x n x m layout that fits, best first, with the why line;
    ValueError (one line) when none fits."""
    setup = TrainSetup(args.batch, args.seq, zero=args.zero, checkpointing=args.checkpointing,
                       sequence_parallel=args.sequence_parallel, vocab_parallel=args.vocab_parallel)
    bound = None if args.memory_gb is None else args.memory_gb * 1e9
    rows = plan_train(model, args.devices, setup, hw, memory_bytes=bound)
    if not any(r.fits for r in rows):
        over = [r for r in rows if r.prediction is not None]
        why = (f"the least memory is {over[0].prediction.memory.total / 1e9:.1f} GB per rank "
               f"({over[0].layout.label}); add devices or use a shorter --seq" if over
               else "; ".join(f"{r.layout.dp} x {r.layout.sp} x {r.layout.n} x {r.layout.m}: {r.reason}"
                              for r in rows[:4]))
        raise ValueError(f"no dp x sp x n x m layout of {args.devices} devices can train {model.name} "
                         f"(batch {args.batch}, seq {args.seq}) within the memory bound: {why}")
    print(format_train_plan(model, args.devices, setup, hw, rows, memory_bytes=bound))
    return 0


def main(args: argparse.Namespace) -> int:
    """Print the plan; ValueError (one line, exit status 2) when no layout of P devices fits."""
    model, hw = load_model(args.model), get_profile(args.hardware)
    if args.phase == "train":
        return train_main(args, model, hw)
    phase = Phase(args.phase, args.batch, args.seq)
    rows = plan(model, args.devices, phase, hw, strategy=args.strategy)
    if not any(r.feasible for r in rows):
        raise ValueError(no_layout_message(model, args.devices, phase, hw, rows, strategy=args.strategy))
    print(format_plan(model, args.devices, phase, hw, rows))
    return 0
