"""Per-shard attention compute for the paper's shapes on one accelerator, against the dense layer.

One rank's shard of an n x m layer (H = 4096, 32 heads x 128, bf16) is timed on simulated axes (sizes,
no process group: ``ds_twolevel.tools.bench.shard_layer``), whose collectives run local ops of the same
output shapes, so the number is exactly one rank's compute; the ideal is dense time / (m n). Prefill (batch x seq tokens) and
decode (one token per sequence against a cache of seq). Then our layer at m = n = 1 against Hugging Face's
LlamaAttention (sdpa) on the same weights and input: time and largest difference. Last, the end-to-end
decode step: one rank's whole step of the paper's 2-layer model (attention and MLP, every block) on 16
simulated ranks - head-wise TP, two-level at every m > 1 on both KV-cache layouts with ``cost_model``, the
Helix-style layer - against the dense step (``ds_twolevel.tools.bench.decode_step``).

    python recipes/bench_gpu_shard.py                      # CUDA (or any accelerator), bf16, paper shapes
    python recipes/bench_gpu_shard.py --device cpu --small # the same code at small shapes (tests)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ds_twolevel.tools.bench import BenchConfig, ShardCase, sdpa_overhead, time_shards  # noqa: E402
from ds_twolevel.tools.bench.config import decode_strategies, prefill_strategies  # noqa: E402
from ds_twolevel.tools.bench.decode_step import DecodeModel, decode_layouts, time_decode_steps  # noqa: E402
from ds_twolevel.sharding.partition import AttentionSpec  # noqa: E402

PAPER_LAYOUTS = ((16, 1, "qk_allgather"), (8, 2, "score_allreduce"), (8, 2, "qk_allgather"),
                 (4, 4, "score_allreduce"), (4, 4, "qk_allgather"), (2, 8, "score_allreduce"),
                 (2, 8, "qk_allgather"), (4, 1, "qk_allgather"), (2, 2, "score_allreduce"), (2, 2, "qk_allgather"),
                 (1, 4, "score_allreduce"), (1, 4, "qk_allgather"))
"""(n, m, strategy): the 16-device layouts of the paper, and m n = 4."""
PREFILL_LAYOUTS = tuple((n, m, st) for n, m in ((8, 2), (4, 4), (2, 2), (1, 4)) for st in prefill_strategies())
"""the bench's prefill-only strategies (seq_rows), prefill only (decode's single row has no rows to split: it would fall back to auto).
Rank (0, 0)'s shard."""
DECODE_LAYOUTS = tuple((n, m, st) for n, m in ((8, 2), (4, 4), (2, 2), (1, 4)) for st in decode_strategies())
"""the bench's decode strategies whose cache is held by position (kv_shard), decode only: rank (0, 0)'s shard,
which holds the most positions (ceil((s-1)/m)), on a preallocated cache like every decode row."""


def cases(args: argparse.Namespace) -> list[ShardCase]:
    """The settings to time: paper shapes, or small ones with --small."""
    dtype = getattr(torch, args.dtype)
    # one shard at a time off CPU: the paper's decode cache is 21 GB dense (b=128, s=10000, bf16)
    kw = {"device": args.device, "dtype": dtype, "interleave": args.device == "cpu"}
    if args.small:
        spec = AttentionSpec(8, 8, 32, rope_style="half")
        return [ShardCase(256, spec, "prefill", 1, 256, 2, **kw), ShardCase(256, spec, "decode", 2, 256, 2, **kw)]
    spec = AttentionSpec(32, 32, 128, rope_style="half")
    return [ShardCase(4096, spec, "prefill", 1, args.seq, args.repeats, **kw),
            ShardCase(4096, spec, "decode", args.decode_batch, args.seq, args.repeats, **kw)]


def overhead_config(args: argparse.Namespace) -> BenchConfig:
    """Shapes of the m = n = 1 overhead measurement: the paper's layer (small with --small)."""
    if args.small:
        return BenchConfig(shard_hidden=64, shard_heads=4, shard_head_dim=16, overhead_seq=32, overhead_repeats=2)
    return BenchConfig(shard_hidden=4096, shard_heads=32, shard_head_dim=128, overhead_seq=args.seq,
                       overhead_repeats=3 * args.repeats)


def decode_model(args: argparse.Namespace) -> tuple[DecodeModel, int]:
    """The end-to-end decode step's model and rank count: the paper's (small with --small)."""
    kw = {"device": args.device, "dtype": getattr(torch, args.dtype)}
    if args.small:
        return DecodeModel(256, AttentionSpec(8, 8, 32, rope_style="half"), 1024, 2, 2, 256, **kw), 4
    return DecodeModel(4096, AttentionSpec(32, 32, 128, rope_style="half"), 4 * 4096, 2, args.decode_batch, args.seq,
                       **kw), 16


def run_decode_steps(args: argparse.Namespace, result: dict) -> None:
    """The end-to-end decode step of every layout, printed and saved."""
    case, ranks = decode_model(args)
    print(f"\nend-to-end decode step, {case.layers} layers, b = {case.batch}, cache {case.seq}, rank (0, 0) of {ranks}:")
    print("| family | n x m | KV cache | ran | step ms | dense ms | ratio to ideal |")
    print("|---|---|---|---|---|---|---|")
    result["decode_steps"] = time_decode_steps(case, decode_layouts(ranks, case.spec), args.repeats)
    for r in result["decode_steps"]:
        print(f"| {r['family']} | {r['n']} x {r['m']} | {r['cache_layout']} | {r['ran']} | {r['ms']:.3f} | "
              f"{r['dense_ms']:.3f} | {r['ratio_to_ideal']:.2f}x |")
    _save(args, result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--seq", type=int, default=10000, help="prefill length and decode KV length")
    parser.add_argument("--decode-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="small shapes (CPU tests)")
    parser.add_argument("--no-overhead", action="store_true", help="skip our m = n = 1 layer vs HF LlamaAttention (sdpa)")
    parser.add_argument("--no-decode-step", action="store_true", help="skip the end-to-end decode step")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    start = time.time()
    name = torch.get_device_module(args.device).get_device_name() if args.device != "cpu" else "cpu"
    result = {"device": str(name), "torch": torch.__version__, "dtype": args.dtype, "shards": [], "overhead": []}
    layouts = PAPER_LAYOUTS[-5:] if args.small else PAPER_LAYOUTS
    print(f"device {args.device} ({name}), torch {torch.__version__}, {args.dtype}")
    print("| phase | batch | seq | n x m | strategy | shard ms | dense ms | ratio to ideal | same-path ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in cases(args):
        own = PREFILL_LAYOUTS if case.phase == "prefill" else DECODE_LAYOUTS
        extra = own[-2:] if args.small else own
        for r in time_shards(case, layouts + extra):
            result["shards"].append(r)
            print(f"| {r['phase']} | {r['batch']} | {r['seq']} | {r['n']} x {r['m']} | {r['strategy']} | "
                  f"{r['ms']:.3f} | {r['dense_ms']:.3f} | {r['ratio_to_ideal']:.2f}x | {r['ratio_to_same_path']:.2f}x |")
        _save(args, result)
    if not args.no_overhead:
        result["overhead"] = sdpa_overhead(overhead_config(args), args.device, getattr(torch, args.dtype))
        print("\nour layer at m = n = 1 vs HF LlamaAttention (sdpa), prefill, same weights and input:")
        print("| h | g | seq | HF ms | ours ms | overhead (fastest) | overhead (median of rounds) | max diff / max abs |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["overhead"]:
            print(f"| {r['heads']} | {r['kv_heads']} | {r['seq']} | {r['hf_ms']:.3f} | {r['ours_ms']:.3f} | "
                  f"{r['overhead']:+.1%} | {r['overhead_median_of_rounds']:+.1%} | {r['max_rel_diff']:.1e} |")
        _save(args, result)
    if not args.no_decode_step:
        run_decode_steps(args, result)
    print(f"{time.time() - start:.0f} s")
    return 0


def _save(args: argparse.Namespace, result: dict) -> None:
    """Write what is measured so far (a later failure keeps the earlier tables)."""
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))

if __name__ == "__main__":
    raise SystemExit(main())
