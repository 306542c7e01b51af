"""Train a small Llama whose attention is partitioned n x m, in a DeepSpeed engine (ZeRO over dp).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 8 recipes/train.py \\
        --deepspeed_config ds_configs/zero2_n2_m2.json --export
    torchrun --nproc_per_node 4 recipes/train.py --deepspeed_config ds_configs/zero2_n1_m2.json
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 4 recipes/train.py \\
        --deepspeed_config ds_configs/zero2_sp2_n1_m2.json --export

With DeepSpeed's ``"sequence_parallel_size"`` (Ulysses outside the n x m group) each rank feeds its s/sp tokens;
its checkpoints resume at any dp x sp x n x m.

Byte-level tokens (vocab 256, nothing to download) over the public-domain texts in
``recipes/data/``. Writes to ``--out``: checkpoints (``ckpt/``, atomic), ``metrics.json`` (loss,
gradient norm and learning rate of every step, wall time of all segments), ``loss.png`` and, with
``--export``, a dense Hugging Face checkpoint (``dense/``) that plain
``LlamaForCausalLM.from_pretrained`` loads. ``DS_TWOLEVEL_STEPS`` in the environment changes the
default of ``--steps`` (the README test runs every command at a few steps).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ds_twolevel.tools.cli import OneLineParser, positive_int

import torch

import ds_twolevel
from ds_twolevel.deepspeed.config import check_config_file, load_deepspeed_config
from ds_twolevel.sharding.partition import AttentionSpec, check_partition, feasible_layouts

DATA = Path(__file__).resolve().parent / "data"
HEADS, KV_HEADS, HEAD_DIM = 8, 4, 16
MODEL = f"the recipe's Llama ({HEADS} heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM})"


def model_config(seq: int):
    """8 query heads, 4 KV heads, head_dim 16: fits n in {1, 2, 4} x m in {1, 2, 4, 8}."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                       max_position_embeddings=seq, tie_word_embeddings=False, rms_norm_eps=1e-6,
                       attention_dropout=0.0)


def corpus() -> torch.Tensor:
    """All of recipes/data/*.txt as UTF-8 bytes (the byte-level vocabulary: 256 ids)."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(DATA.glob("*.txt")))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def global_batch(tokens: torch.Tensor, step: int, rows: int, seq: int, seed: int) -> torch.Tensor:
    """Step ``step``'s (rows, seq) windows at seeded offsets: the same on every rank, every run."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq, (rows,), generator=gen)
    return torch.stack([tokens[s:s + seq] for s in starts.tolist()])  # (rows, seq)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="recipes/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON with a \"two_level\" section")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    steps = os.environ.get("DS_TWOLEVEL_STEPS", "200")
    p.add_argument("--steps", type=positive_int, default=steps,
                   help="optimizer steps (default: %(default)s; DS_TWOLEVEL_STEPS sets the default)")
    p.add_argument("--seq", type=positive_int, default=64, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=positive_int, default=10, help="print the loss every this many steps")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every this many steps (0: only at the end)")
    p.add_argument("--out", default="recipes/out", help="checkpoints, metrics.json, loss.png, dense/")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt/latest if it exists")
    p.add_argument("--export", action="store_true", help="write a dense Hugging Face checkpoint to --out/dense")
    return p.parse_args(argv)  # argparse applies type= to the string default too


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fail(message: str) -> None:
    """A launch the recipe cannot run: one line (from rank 0: every rank would say the same), exit 2."""
    if _rank() == 0:
        print(f"recipes/train.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_launch(args: argparse.Namespace) -> None:
    """Refuse, before any rank talks, a config, world size or layout the recipe's model cannot take."""
    if not Path(args.deepspeed_config).is_file():
        fail(f"--deepspeed_config {args.deepspeed_config}: no such file (the shipped ones are in ds_configs/)")
    tl, _ = check_config_file(args.deepspeed_config, prog="recipes/train.py")
    spec = AttentionSpec(HEADS, KV_HEADS, HEAD_DIM, rope_style="half", name=MODEL)
    check_partition(spec, tl.n, tl.m, kv_replication=tl.kv_replication)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tl.tp_size:
        layouts = [f"dp={world // p} x n={n} x m={m}" for p in range(world, 0, -1) if world % p == 0
                   for n, m in feasible_layouts(spec, p, kv_replication=tl.kv_replication)]
        fail(f"world size {world} is not a multiple of n*m = {tl.n}*{tl.m} = {tl.tp_size} ({args.deepspeed_config}); "
             f"launch {tl.tp_size} or {2 * tl.tp_size} ranks, or give \"two_level\" a layout that {world} ranks and "
             f"{MODEL} take: {', '.join(layouts)}")


def build(args: argparse.Namespace):
    """config -> mesh -> model (under zero.Init if asked) -> engine."""
    from transformers import LlamaForCausalLM  # before deepspeed.zero.Init (CPU_NOTES)

    tl, _ = load_deepspeed_config(args.deepspeed_config)
    mesh = ds_twolevel.build_mesh(args.deepspeed_config)
    torch.manual_seed(args.seed)
    if tl.zero_init:  # ZeRO-3: never materialise the whole dense model on one rank
        model = ds_twolevel.zero_init_model(lambda: LlamaForCausalLM(model_config(args.seq)),
                                            args.deepspeed_config, mesh)
    else:
        model = LlamaForCausalLM(model_config(args.seq))
    engine, _, _, _ = ds_twolevel.initialize(model=model, config=args.deepspeed_config, mesh=mesh)
    return engine, mesh


def train(engine, mesh, args: argparse.Namespace, tokens: torch.Tensor, first: int, out: Path,
          history: dict) -> dict:
    """Steps first..args.steps, appended to ``history`` (lists "losses", "grad_norms", "lrs")."""
    import torch.distributed as dist
    from tqdm import tqdm

    micro, gas, dp = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(), engine.dp_world_size
    is_main, t0, seconds = dist.get_rank() == 0, time.time(), history["seconds"]
    bar = tqdm(range(first, args.steps + 1), disable=not is_main, desc="train", unit="step")
    for step in bar:
        lr = float(engine.get_lr()[0])  # the rate this step uses (the scheduler moves it after the step)
        rows = ds_twolevel.replica_rows(global_batch(tokens, step, micro * gas * dp, args.seq, args.seed), mesh)
        total = torch.zeros((), device=engine.device)
        for ids in rows.split(micro):  # same rows on every tp rank of this replica
            loss = engine(**micro_batch(ids.to(engine.device), mesh)).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        dist.all_reduce(total, group=mesh.axes.zero.group)  # the replicas' losses (sp ranks: their shares)
        norm = engine.get_global_grad_norm()
        history["losses"].append(float(total) / (gas * dp))
        history["grad_norms"].append(float(norm) if norm is not None else float("nan"))
        history["lrs"].append(lr)
        history["seconds"] = seconds + time.time() - t0  # earlier segments (resumed runs) included
        bar.set_postfix(loss=f"{history['losses'][-1]:.4f}")
        if is_main and (step % args.log_every == 0 or step == first):
            tqdm.write(f"step {step:5d}  loss {history['losses'][-1]:.4f}  grad_norm {history['grad_norms'][-1]:.4f}"
                       f"  lr {lr:.2e}")
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            ds_twolevel.save_checkpoint(engine, out / "ckpt", client_state={"step": step, **history})
    return history


def micro_batch(ids: torch.Tensor, mesh) -> dict:
    """The engine's inputs for rows ``ids``: all of them, or under Ulysses (sp > 1) this rank's s/sp tokens
    with its share of the loss (``hf_integration.sequence_data.shard_batch``)."""
    if mesh.layout.sp == 1:
        return {"input_ids": ids, "labels": ids}
    from hf_integration.sequence_data import shard_batch

    return shard_batch({"input_ids": ids}, mesh.axes.sp)


def plot(losses: list[float], first: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(first, first + len(losses)), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title("two-level Llama under DeepSpeed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def resume(engine, args: argparse.Namespace, out: Path) -> tuple[int, dict]:
    """(first step, history) from --out/ckpt/latest with --resume, else (1, empty history)."""
    history = {"losses": [], "grad_norms": [], "lrs": [], "seconds": 0.0}
    if not args.resume:
        return 1, history
    if not (out / "ckpt" / "latest").is_file():
        if _rank() == 0:
            print(f"--resume: no checkpoint in {out / 'ckpt'} yet; starting at step 1", flush=True)
        return 1, history
    tag = (out / "ckpt" / "latest").read_text().strip()
    _, client = ds_twolevel.load_checkpoint(engine, out / "ckpt", tag=tag)
    for key in ("losses", "grad_norms", "lrs"):
        history[key] = list(client.get(key, []))
    history["seconds"] = float(client.get("seconds", 0.0))
    if _rank() == 0:
        print(f"resumed from step {client['step']} ({out / 'ckpt' / tag}); continuing to step {args.steps}", flush=True)
    return client["step"] + 1, history


def write_results(out: Path, history: dict, mesh, engine, args: argparse.Namespace, first: int) -> None:
    """Rank 0: metrics.json and loss.png."""
    layout = mesh.layout
    metrics = {"losses": history["losses"], "grad_norms": history["grad_norms"], "lrs": history["lrs"],
               "layout": {"dp": layout.dp, "sp": layout.sp, "n": layout.n, "m": layout.m},
               "zero_stage": engine.zero_optimization_stage(), "seconds": history["seconds"],
               "steps_run": args.steps - first + 1, "resumed_from": first - 1 if first > 1 else None}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot(history["losses"], 1, out / "loss.png")
    print(f"done: {len(history['losses'])} steps, final loss {history['losses'][-1]:.4f}; wrote {out}/loss.png, "
          "metrics.json" + (", dense/" if args.export else ""), flush=True)


def run(engine, mesh, args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from transformers import DynamicCache

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = corpus()
    first, history = resume(engine, args, out)
    with ds_twolevel.fail_fast(engine.two_level.config.timeout_s):
        if first <= args.steps:
            history = train(engine, mesh, args, tokens, first, out, history)
        ds_twolevel.save_checkpoint(engine, out / "ckpt", client_state={"step": args.steps, **history})
        probe = global_batch(tokens, 0, 2, args.seq, args.seed + 1).to(engine.device)
        engine.eval()
        with torch.no_grad():  # under Ulysses a KV cache runs the whole probe on every rank
            cache = {} if mesh.layout.sp == 1 else {"cache": DynamicCache()}
            logits = engine(input_ids=probe, **cache).logits.float().cpu()
        if args.export:
            ds_twolevel.export_dense(engine, out / "dense")
    if dist.get_rank() == 0:
        torch.save({"input_ids": probe.cpu(), "logits": logits}, out / "probe.pt")
        write_results(out, history, mesh, engine, args, first)
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    check_launch(args)  # the config and the layout, before transformers is imported or any rank talks
    try:  # everything ds_twolevel refuses (layout, model) it refuses here, before the first step
        engine, mesh = build(args)
    except ValueError as err:
        fail(str(err))
    run(engine, mesh, args)


if __name__ == "__main__":
    main()
