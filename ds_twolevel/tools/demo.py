"""The main job: one transformer block forward + backward on dp x n x m local ranks vs dense."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ds_twolevel.layers.block import TwoLevelBlock
from ds_twolevel.tools.cli import int_in, positive_int
from ds_twolevel.parallel.collectives import CommCounter
from ds_twolevel.parallel.layout import TwoLevelLayout
from ds_twolevel.sharding.partition import AttentionSpec, check_partition
from ds_twolevel.strategies import registry
from ds_twolevel.testing.reference import DenseBlock
from ds_twolevel.layers.rope import rope_cos_sin
from ds_twolevel.testing.ranks import rel_err


@dataclass(frozen=True)
class DemoConfig:
    """Shapes and layout of the demo block."""

    n: int = 2
    """head groups."""
    m: int = 2
    """head-dim segments."""
    dp: int = 1
    """data-parallel replicas (each gets its own batch)."""
    strategy: str = "cost_model"
    """attention strategy: "cost_model" or one of the registry's universal strategies (score_allreduce, qk_allgather)."""
    batch: int = 2
    seq: int = 16
    hidden: int = 128
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 16
    intermediate: int = 256
    rope: str = "half"
    qk_norm: bool = False
    seed: int = 0

    def spec(self) -> AttentionSpec:
        return AttentionSpec(self.heads, self.kv_heads, self.head_dim, rope_style=self.rope, name="demo block")


def run_rank(cfg: DemoConfig) -> dict:
    """Body of one rank: build dense + partitioned block, compare, count bytes."""
    layout = TwoLevelLayout(n=cfg.n, m=cfg.m, dp=cfg.dp)
    mesh = layout.build()
    torch.manual_seed(cfg.seed)
    spec = cfg.spec()
    dense = DenseBlock(cfg.hidden, spec, cfg.intermediate, qk_norm_eps=1e-6 if cfg.qk_norm else None)
    block = TwoLevelBlock.from_dense(dense, mesh.axes, strategy=cfg.strategy)
    gen = torch.Generator().manual_seed(cfg.seed + 1 + mesh.axes.dp.rank)  # each replica its own batch
    x = torch.randn(cfg.batch, cfg.seq, cfg.hidden, generator=gen)
    pos = torch.arange(cfg.seq).expand(cfg.batch, -1)
    rope = rope_cos_sin(pos, spec) if spec.rot_dim else None
    x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
    with CommCounter() as comm:
        y = block(x_par, position_embeddings=rope)
        y.square().mean().backward()
    y_ref = dense(x_ref, position_embeddings=rope)
    y_ref.square().mean().backward()
    grad_err = 0.0
    for prefix, layer in (("attn.", block.attn), ("mlp.", block.mlp)):
        ref_layer = getattr(dense, prefix[:-1])
        ref_grads = ref_layer.grad_state() if prefix == "attn." else {n: p.grad for n, p in ref_layer.named_parameters()}
        for name, (index, dim) in layer.shard_index().items():
            param = layer.get_parameter(name)
            grad_err = max(grad_err, rel_err(param.grad, ref_grads[name].index_select(dim, index)))
    n_local = sum(p.numel() for p in block.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    return {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "coord": (mesh.axes.dp.rank, mesh.axes.i, mesh.axes.j),
        "out_err": rel_err(y, y_ref), "input_grad_err": rel_err(x_par.grad, x_ref.grad), "param_grad_err": grad_err,
        "params_local": n_local, "params_dense": n_dense,
        "comm": {f"{op}/{axis}/{tag}{' (bwd)' if bwd else ''}": v for (op, axis, tag, bwd), v in comm.summary().items()},
    }


def report(cfg: DemoConfig, results: list[dict]) -> str:
    """Human-readable per-rank table."""
    lines = [f"ds-twolevel demo: dp={cfg.dp} x n={cfg.n} x m={cfg.m}, strategy={cfg.strategy}, "
             f"block H={cfg.hidden}, h={cfg.heads}, g={cfg.kv_heads}, d={cfg.head_dim}, b={cfg.batch}, s={cfg.seq}",
             f"{'rank':>4} {'(dp,i,j)':>9} {'out err':>9} {'dx err':>9} {'dW err':>9} {'params':>14}"]
    for r in results:
        share = f"{r['params_local']}/{r['params_dense']}"
        lines.append(f"{r['rank']:>4} {str(r['coord']):>9} {r['out_err']:9.1e} {r['input_grad_err']:9.1e} "
                     f"{r['param_grad_err']:9.1e} {share:>14} ({r['params_local'] / r['params_dense']:.0%})")
    lines.append("bytes sent by rank 0 per collective (op/axis/payload: calls, bytes):")
    for key, (calls, sent) in sorted(results[0]["comm"].items()):
        lines.append(f"  {key:<32} {calls:>3} call(s) {sent:>10,} B")
    worst = max(max(r["out_err"], r["input_grad_err"], r["param_grad_err"]) for r in results)
    lines.append(f"max relative error vs dense over all ranks: {worst:.1e} ({'OK' if worst <= 1e-5 else 'TOO LARGE'})")
    return "\n".join(lines)


ROPES = ("half", "interleaved", "none")
HELP = """\
Run one transformer block (attention + gated MLP) forward and backward on dp*n*m local ranks
(gloo; this command spawns them) and compare every rank with the dense block: the output, the
input gradient and every parameter gradient, and the bytes each collective sends.

The layout: the h query heads are split into n head groups (h/n heads per rank, GQA groups kept
whole) and each head's d dims into m segments (d/m dims per rank), so each of the n*m ranks of a
layer holds one (group i, segment j) block of W_q, W_k, W_v and W_o; dp replicas of the layer each
get their own batch. Example: --dp 2 -n 2 -m 2 on the default block (8 heads x 16 dims, 4 KV
heads) starts 8 ranks; rank 2 = (dp, i, j) (0, 1, 0) holds query heads 4-7 (KV heads 2-3) and dims
0-3 and 8-11 of each head (a rotate_half pair (t, t+8) never straddles two segments). A layout the
shapes cannot take exits with status 2 and names the layouts that fit.

--strategy cost_model (the default) picks, for every attention call, the strategy with the least
predicted time (compute, memory traffic and the bytes each collective sends) on the hardware profile
of the tensors' device; naming a strategy runs that one.
"""
HELP_FORMATTER = argparse.RawDescriptionHelpFormatter
_FLAG_HELP = {
    "n": "head groups: each rank holds h/n query heads (and g/n KV heads)",
    "m": "head-dim segments: each rank holds d/m dims of each of its heads",
    "dp": "data-parallel replicas of the n x m layer, each with its own batch",
    "strategy": "score strategy: cost_model picks, per call, the strategy with the least predicted time on the "
                "hardware profile of the tensors' device (the cost model's compute, memory and communication times)",
    "batch": "sequences per replica", "seq": "tokens per sequence", "hidden": "hidden size H",
    "heads": "query heads h", "kv_heads": "key/value heads g (h must be a multiple)",
    "head_dim": "dims per head d", "intermediate": "MLP intermediate size (a multiple of n*m)",
    "rope": "rotary embedding style", "qk_norm": "per-head Q/K RMSNorm (Qwen3 style)", "seed": "weights and inputs seed",
}


LAYOUT_FLAGS = ("n", "m")
"""spelled ``-n``/``--n`` and ``-m``/``--m`` here and in the recipes (under torchrun or the deepspeed
launcher write ``-n 2 -m 2``: the launchers read ``--n`` as an abbreviation of their own options)."""


def seed_int(text: str) -> int:
    """argparse type: a seed torch.manual_seed takes (0 <= seed < 2**63)."""
    return int_in(text, 0, 2**63, "an int in [0, 2**63)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    choices = {"strategy": (registry.AUTO, *registry.universal()), "rope": ROPES}
    for name, value in asdict(DemoConfig()).items():
        text = _FLAG_HELP[name]
        flags = (f"-{name}", f"--{name}") if name in LAYOUT_FLAGS else ("--" + name.replace("_", "-"),)
        if isinstance(value, bool):
            parser.add_argument(*flags, action="store_true", help=f"{text} (default: off)")
        elif name in choices:
            parser.add_argument(*flags, choices=choices[name], default=value, help=f"{text} (default: {value})")
        else:
            kind = seed_int if name == "seed" else positive_int
            parser.add_argument(*flags, type=kind, default=value, metavar="N", help=f"{text} (default: {value})")


def check(cfg: DemoConfig) -> None:
    """Everything a rank would refuse, refused here before any rank is spawned (ValueError)."""
    TwoLevelLayout(n=cfg.n, m=cfg.m, dp=cfg.dp)
    if cfg.heads % cfg.kv_heads:
        divisors = ", ".join(str(g) for g in range(1, cfg.heads + 1) if cfg.heads % g == 0)
        raise ValueError(f"--heads {cfg.heads} is not a multiple of --kv-heads {cfg.kv_heads} (each KV head serves "
                         f"h/g query heads); use a --kv-heads that divides {cfg.heads}: {divisors}")
    if cfg.rope != "none" and cfg.head_dim % 2:
        raise ValueError(f"--head-dim {cfg.head_dim} is odd, but --rope {cfg.rope} rotates pairs of dims; "
                         "use an even --head-dim or --rope none")
    check_partition(cfg.spec(), cfg.n, cfg.m)
    tp = cfg.n * cfg.m
    if cfg.intermediate % tp:
        raise ValueError(f"--intermediate {cfg.intermediate} is not divisible by n*m = {tp} (the MLP is split "
                         f"over the n*m ranks); use a multiple of {tp}, e.g. {-(-cfg.intermediate // tp) * tp}")


def main(args: argparse.Namespace) -> int:
    from ds_twolevel.testing.ranks import run_distributed

    cfg = DemoConfig(**{k: getattr(args, k) for k in asdict(DemoConfig())})
    check(cfg)  # validate before spawning anything
    world = cfg.dp * cfg.n * cfg.m
    results = [run_rank(cfg)] if world == 1 else run_distributed(run_rank, world, cfg)
    print(report(cfg, results))
    worst = max(max(r["out_err"], r["input_grad_err"], r["param_grad_err"]) for r in results)
    return 0 if worst <= 1e-5 else 1
