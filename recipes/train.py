"""Train a small Llama whose attention is partitioned n x m, in a DeepSpeed engine (ZeRO over dp).

    deepspeed --num_gpus 8 recipes/train.py --deepspeed_config ds_configs/zero2_n2_m2.json
    torchrun --nproc_per_node 4 recipes/train.py --deepspeed_config ds_configs/zero2_n1_m2.json

(CPU: prefix ``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1``.) Byte-level tokens (vocab 256, nothing
to download) over the public-domain texts in ``recipes/data/``. Writes to ``--out``: checkpoints
(``ckpt/``, atomic), ``metrics.json``, ``loss.png`` and, with ``--export``, a dense Hugging Face
checkpoint (``dense/``) that plain ``LlamaForCausalLM.from_pretrained`` loads.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM  # before deepspeed.zero.Init (CPU_NOTES)

import ds_twolevel
from ds_twolevel.config import load_deepspeed_config

DATA = Path(__file__).resolve().parent / "data"


def model_config(seq: int) -> LlamaConfig:
    """8 query heads, 4 KV heads, head_dim 16: fits n in {1, 2, 4} x m in {1, 2, 4, 8}."""
    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=seq,
                       tie_word_embeddings=False, rms_norm_eps=1e-6, attention_dropout=0.0)


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON with a \"two_level\" section")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=10, help="print the loss every this many steps")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every this many steps (0: only at the end)")
    p.add_argument("--out", default="recipes/out", help="checkpoints, metrics.json, loss.png, dense/")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt/latest if it exists")
    p.add_argument("--export", action="store_true", help="write a dense Hugging Face checkpoint to --out/dense")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """config -> mesh -> model (under zero.Init if asked) -> engine."""
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


def train(engine, mesh, args: argparse.Namespace, tokens: torch.Tensor, first: int, out: Path) -> list[float]:
    """Steps first..args.steps; returns the (dp-averaged) loss of each step."""
    import torch.distributed as dist
    from tqdm import tqdm

    micro, gas, dp = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(), engine.dp_world_size
    is_main = dist.get_rank() == 0
    losses = []
    bar = tqdm(range(first, args.steps + 1), disable=not is_main, desc="train", unit="step")
    for step in bar:
        rows = ds_twolevel.replica_rows(global_batch(tokens, step, micro * gas * dp, args.seq, args.seed), mesh)
        total = torch.zeros((), device=engine.device)
        for ids in rows.split(micro):  # same rows on every tp rank of this replica
            ids = ids.to(engine.device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        dist.all_reduce(total, group=mesh.get_data_parallel_group())
        losses.append(float(total) / (gas * dp))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if is_main and (step % args.log_every == 0 or step == first):
            norm = engine.get_global_grad_norm()
            tqdm.write(f"step {step:5d}  loss {losses[-1]:.4f}  grad_norm {float(norm) if norm is not None else float('nan'):.4f}"
                       f"  lr {engine.get_lr()[0]:.2e}")
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            ds_twolevel.save_checkpoint(engine, out / "ckpt", client_state={"step": step, "losses": losses})
    return losses


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


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    engine, mesh = build(args)
    tokens = corpus()
    first, history = 1, []
    if args.resume and (out / "ckpt" / "latest").is_file():
        _, client = ds_twolevel.load_checkpoint(engine, out / "ckpt")
        first, history = client["step"] + 1, client.get("losses", [])
    t0 = time.time()
    with ds_twolevel.fail_fast(engine.two_level.config.timeout_s):
        losses = history + train(engine, mesh, args, tokens, first, out)
        seconds = time.time() - t0
        ds_twolevel.save_checkpoint(engine, out / "ckpt", client_state={"step": args.steps, "losses": losses})
        probe = global_batch(tokens, 0, 2, args.seq, args.seed + 1).to(engine.device)
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=probe).logits.float().cpu()
        if args.export:
            ds_twolevel.export_dense(engine, out / "dense")
    if dist.get_rank() == 0:
        layout = mesh.layout
        torch.save({"input_ids": probe.cpu(), "logits": logits}, out / "probe.pt")
        (out / "metrics.json").write_text(json.dumps(
            {"losses": losses, "layout": {"dp": layout.dp, "n": layout.n, "m": layout.m},
             "zero_stage": engine.zero_optimization_stage(), "seconds": seconds,
             "steps_run": args.steps - first + 1}, indent=1))
        plot(losses, 1, out / "loss.png")
        print(f"done: {len(losses)} steps, final loss {losses[-1]:.4f}; wrote {out}/loss.png, metrics.json", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
