"""Long sequences side by side: DeepSpeed Ulysses vs two-level with sequence_parallel vs dense.

    python recipes/bench_long_sequences.py                      # s = 2048, 8192, 32768; writes docs/long_sequences.md
    python recipes/bench_long_sequences.py --seq 2048 --json out.json --no-page

A tiny Llama (hidden 256, 8 heads, 2 KV heads, head_dim 32, intermediate 1024, 2 layers, vocab 1000,
fp32, batch 1, sdpa), one forward + backward of the causal-LM loss, every configuration in fresh
processes (``ds_twolevel.testing.run_distributed``), with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
tensors leave the resident set:

* dense: the unpatched model in one process;
* Ulysses: ``UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", sequence_parallel_size=4, ...)``
  (DeepSpeed's own calls), each rank given its quarter of the tokens, global position ids and labels shifted
  before the cut (what ``UlyssesSPDataLoaderAdapter`` hands it), backpropagating its own share of the loss,
  then every gradient summed over the 4 ranks (what DeepSpeed's engine does after backward);
* two-level: ``patch_model(model, mesh, sequence_parallel=True)`` at 2 x 2, and with ``vocab_parallel=True``
  too at 2 x 2 and 1 x 4 (the embedding, LM head and cross entropy split by vocabulary rows), each rank's
  shard from ``shard_batch``.

Per rank: peak resident memory of the step above the level before it (VmHWM after, VmRSS before,
reset through /proc/self/clear_refs; the second of two steps), bytes sent (two-level: ``CommCounter``;
Ulysses: every torch.distributed collective it issues, counted with the same ring formula), the step's
CPU time (the rank's process CPU time: the machine may be shared), and the batch's loss against the
dense one. The worst rank is reported. Then the case Ulysses refuses: 4 attention heads on 8 ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read by glibc at start: the ranks inherit it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

VOCAB = 1000
MODEL = dict(vocab_size=VOCAB, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             intermediate_size=1024, num_hidden_layers=2, tie_word_embeddings=False, attention_dropout=0.0,
             pad_token_id=0, bos_token_id=None, eos_token_id=None)
FOUR_HEADS = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64)
"""the model of the 8-rank cases: Ulysses cannot use 8 ranks on its 4 heads."""
PAGE = Path(__file__).resolve().parents[1] / "docs" / "long_sequences.md"


def tiny_llama(seq: int, **overrides: Any):
    """The seeded benchmark Llama (sdpa attention), train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**MODEL, "max_position_embeddings": seq, **overrides}, attn_implementation="sdpa")
    return LlamaForCausalLM(config).float().train()


def whole_batch(seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (1, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def _rss() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}


def measured(step: Callable[[], float]) -> dict[str, float]:
    """Peak MiB above the level before, CPU seconds and loss of the second of two calls of ``step``."""
    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss()["VmRSS"]
    start = time.process_time()
    loss = step()
    cpu = time.process_time() - start
    return {"peak_mib": (_rss()["VmHWM"] - before) / 1024, "cpu_s": cpu, "loss": loss}


# -- the three configurations (rank bodies) ----------------------------------------------------------
def dense_rank(seq: int) -> dict[str, float]:
    torch.set_num_threads(1)
    model = tiny_llama(seq)
    batch = whole_batch(seq)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return float(loss)

    return {**measured(step), "sent_mib": 0.0}


class CollectiveBytes:
    """Bytes this rank sends in the torch.distributed collectives issued while installed (ring formula)."""

    NAMES = {"all_to_all_single": "all_to_all", "all_reduce": "all_reduce",
             "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter"}
    SIZED_BY = {"all_to_all_single": (1, "input"), "all_reduce": (0, "tensor"),
                "all_gather_into_tensor": (0, "output_tensor"), "reduce_scatter_tensor": (1, "input")}
    """the argument (position, name) whose size the ring formula takes: this rank's tensor (all-to-all),
    the full tensor (the others)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        from ds_twolevel.parallel.collectives import ring_bytes

        self.sent = 0
        self.originals = {name: getattr(dist, name) for name in self.NAMES}
        for name, op in self.NAMES.items():
            original = self.originals[name]

            def counted(*args: Any, _op=op, _original=original, _by=self.SIZED_BY[name], **kwargs: Any) -> Any:
                ranks = dist.get_world_size(kwargs.get("group"))
                t = args[_by[0]] if len(args) > _by[0] else kwargs[_by[1]]
                self.sent += ring_bytes(_op, t.numel() * t.element_size(), ranks)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)


def ulysses_rank(seq: int, four_heads: bool = False) -> dict[str, float]:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    p, rank = dist.get_world_size(), dist.get_rank()
    model = tiny_llama(seq, **(FOUR_HEADS if four_heads else {}))
    mpu = UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", sequence_parallel_size=p, micro_batch_size=1,
                                                          seq_length=seq, seq_length_is_variable=False)
    group = mpu.get_sequence_parallel_group()
    batch = whole_batch(seq)
    shift = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    per = seq // p
    mine = slice(rank * per, (rank + 1) * per)
    shard = {"input_ids": batch["input_ids"][:, mine], "position_ids": torch.arange(seq)[None, mine],
             "shift_labels": shift[:, mine]}
    count = float((shift != -100).sum())
    counter = CollectiveBytes()

    def step() -> float:
        model.zero_grad(set_to_none=True)
        counter.sent = 0
        logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB).float(), shard["shift_labels"].view(-1),
                                                 ignore_index=-100, reduction="sum") / count  # this rank's share
        loss.backward()
        grads = [q.grad for q in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)  # the engine's gradient sum over the sequence-parallel ranks
        whole = loss.detach().reshape(1)
        dist.all_reduce(whole, group=group)
        return float(whole)

    return _with_bytes(step, counter)


def _with_bytes(step: Callable[[], float], counter: CollectiveBytes) -> dict[str, float]:
    out = measured(step)
    out["sent_mib"] = counter.sent / 2**20  # the second (measured) step's bytes
    return out


def twolevel_rank(seq: int, n: int, m: int, vocab_parallel: bool = False) -> dict[str, float]:
    import torch.distributed as dist

    from ds_twolevel import TwoLevelLayout
    from ds_twolevel.parallel.collectives import CommCounter
    from hf_integration import patch_model
    from hf_integration.sequence_data import shard_batch, whole_loss

    torch.set_num_threads(1)
    mesh = TwoLevelLayout.from_world_size(dist.get_world_size(), n=n, m=m).build()
    model = tiny_llama(seq)
    extra = {"vocab_parallel": True} if vocab_parallel else {}
    patch_model(model, mesh, sequence_parallel=True, strategy="seq_rows", probe=False, **extra)
    shard = shard_batch(whole_batch(seq), mesh)
    sent = {"bytes": 0}

    def step() -> float:
        model.zero_grad(set_to_none=True)
        with CommCounter() as comm:
            loss = model(**shard).loss
            loss.backward()
        sent["bytes"] = comm.bytes_sent()
        return float(whole_loss(loss, mesh))

    out = measured(step)
    out["sent_mib"] = sent["bytes"] / 2**20
    return out


def ulysses_refusal() -> str:
    """Ulysses on 8 ranks with 4 attention heads: its own error message."""
    return _refusal_rank_message(run_refusal)


def run_refusal() -> str:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    import deepspeed

    deepspeed.init_distributed("gloo")
    model = tiny_llama(256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    try:
        UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", sequence_parallel_size=8, micro_batch_size=1,
                                                        seq_length=256, seq_length_is_variable=False)
        return "ran"
    except Exception as err:  # noqa: BLE001 - the message is the figure
        return f"{type(err).__name__}: {err}"


def _refusal_rank_message(fn: Callable[[], str]) -> str:
    from ds_twolevel.testing import run_distributed

    return run_distributed(fn, 8, timeout=900)[0]


def eight_rank_case(seq: int, n: int, m: int) -> dict[str, float]:
    """Two-level with sequence_parallel and vocab_parallel on 8 ranks, 4 heads (the case Ulysses refuses)."""
    import torch.distributed as dist

    from ds_twolevel import TwoLevelLayout
    from hf_integration import patch_model
    from hf_integration.sequence_data import shard_batch, whole_loss

    torch.set_num_threads(1)
    mesh = TwoLevelLayout.from_world_size(dist.get_world_size(), n=n, m=m).build()
    model = tiny_llama(seq, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    patch_model(model, mesh, sequence_parallel=True, vocab_parallel=True, strategy="seq_rows", probe=False,
                kv_replication=n > 2)
    shard = shard_batch(whole_batch(seq), mesh)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(**shard).loss
        loss.backward()
        return float(whole_loss(loss, mesh))

    return measured(step)



def composed_rank(seq: int, sp: int, n: int, m: int) -> dict[str, float]:
    """Ulysses sp x two-level n x m through ``ds_twolevel.initialize`` (DeepSpeed's "sequence_parallel_size"),
    the 4-head model: each rank's s/sp tokens from ``shard_batch`` over sp, one forward + backward."""
    import torch.distributed as dist

    import ds_twolevel
    from ds_twolevel import TwoLevelLayout
    from hf_integration.sequence_data import shard_batch, whole_loss

    torch.set_num_threads(1)
    mesh = TwoLevelLayout(n=n, m=m, sp=sp, dp=dist.get_world_size() // (sp * n * m)).build()
    config = {"train_micro_batch_size_per_gpu": 1, "sequence_parallel_size": sp, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
              "zero_optimization": {"stage": 1}, "two_level": {"n": n, "m": m, "strategy": "cost_model"}}
    engine = ds_twolevel.initialize(model=tiny_llama(seq, **FOUR_HEADS), config=config, mesh=mesh)[0]
    shard = shard_batch(whole_batch(seq), mesh.axes.sp)

    def step() -> float:
        engine.module.zero_grad(set_to_none=True)
        loss = engine(**shard).loss
        engine.backward(loss)
        return float(whole_loss(loss, mesh.axes.sp))

    return measured(step)


def composed_case(seq: int) -> dict[str, Any]:
    """8 ranks, 4 heads, s = ``seq``: Ulysses' best (sp = 4; with dp = 2 each replica's ranks hold what sp = 4
    on 4 ranks holds) against Ulysses sp = 4 x two-level 1 x 2 on all 8, and dense."""
    from ds_twolevel.testing import run_distributed

    return {"seq": seq, "dense": run_distributed(dense_eight, 1, seq, timeout=3600)[0],
            "ulysses": _worst(run_distributed(ulysses_rank, 4, seq, True, timeout=3600)),
            "composed": _worst(run_distributed(composed_rank, 8, seq, 4, 1, 2, timeout=3600))}


def dense_eight(seq: int) -> dict[str, float]:
    torch.set_num_threads(1)
    model = tiny_llama(seq, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    batch = whole_batch(seq)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return float(loss)

    return measured(step)


# -- driver ------------------------------------------------------------------------------------------
def _worst(ranks: list[dict[str, float]]) -> dict[str, float]:
    return {"peak_mib": max(r["peak_mib"] for r in ranks), "cpu_s": max(r["cpu_s"] for r in ranks),
            "sent_mib": max(r.get("sent_mib", 0.0) for r in ranks), "loss": ranks[0]["loss"]}


def bench(seqs: list[int]) -> dict[str, Any]:
    from ds_twolevel.testing import run_distributed

    rows = []
    for seq in seqs:
        dense = run_distributed(dense_rank, 1, seq, timeout=3600)[0]
        configs = {"Ulysses sp=4": run_distributed(ulysses_rank, 4, seq, timeout=3600),
                   "two-level 2x2 SP": run_distributed(twolevel_rank, 4, seq, 2, 2, timeout=3600),
                   "two-level 2x2 SP+VP": run_distributed(twolevel_rank, 4, seq, 2, 2, True, timeout=3600),
                   "two-level 1x4 SP+VP": run_distributed(twolevel_rank, 4, seq, 1, 4, True, timeout=3600)}
        ulysses = _worst(configs["Ulysses sp=4"])
        rows.append({"seq": seq, "what": "dense (1 process)", **dense, "vs_dense": 1.0, "vs_ulysses": None,
                     "cpu_vs_ulysses": None, "loss_err": 0.0})
        for name, ranks in configs.items():
            w = _worst(ranks)
            rows.append({"seq": seq, "what": name, **w, "vs_dense": w["peak_mib"] / dense["peak_mib"],
                         "vs_ulysses": w["peak_mib"] / ulysses["peak_mib"], "cpu_vs_ulysses": w["cpu_s"] / ulysses["cpu_s"],
                         "loss_err": abs(w["loss"] - dense["loss"]) / abs(dense["loss"])})
        print(json.dumps(rows[-len(configs) - 1:], indent=1), flush=True)
    eight_seq = seqs[0]
    eight = {"refusal": ulysses_refusal(), "seq": eight_seq,
             "dense": run_distributed(dense_eight, 1, eight_seq, timeout=3600)[0]}
    for n, m in ((1, 8), (2, 4)):
        ranks = run_distributed(eight_rank_case, 8, eight_seq, n, m, timeout=3600)
        eight[f"{n}x{m}"] = _worst(ranks)
    composed = composed_case(max([s for s in seqs if s <= 8192] or seqs[:1]))
    return {"rows": rows, "eight": eight, "composed": composed}


def render(results: dict[str, Any], command: str) -> str:
    """The measured section of docs/long_sequences.md."""
    lines = [f"Measured with `{command}` (CPU, gloo, one thread per rank; worst rank):", "",
             "| s | configuration | peak MiB per rank | vs dense | vs Ulysses | MiB sent per rank | CPU s | CPU vs Ulysses "
             "| loss error vs dense |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['seq']} | {r['what']} | {r['peak_mib']:.0f} | {r['vs_dense']:.2f} | {fmt(r['vs_ulysses'], '.2f')} "
                     f"| {r['sent_mib']:.1f} | {r['cpu_s']:.2f} | {fmt(r['cpu_vs_ulysses'], '.2f')} | {r['loss_err']:.1e} |")
    lines += ["", *verdicts(results["rows"])]
    e = results["eight"]
    d = e["dense"]
    lines += ["", f"8 ranks, 4 attention heads (head_dim 64), s = {e['seq']}: Ulysses refuses "
              f"(`{e['refusal']}`).", "",
              "| configuration | peak MiB per rank | vs dense | loss error vs dense |", "|---|---|---|---|",
              f"| dense (1 process) | {d['peak_mib']:.0f} | 1.00 | 0 |"]
    for key in ("1x8", "2x4"):
        w = e[key]
        lines.append(f"| two-level {key} SP+VP | {w['peak_mib']:.0f} | {w['peak_mib'] / d['peak_mib']:.2f} | "
                     f"{abs(w['loss'] - d['loss']) / abs(d['loss']):.1e} |")
    c = results.get("composed")
    if c:
        u, t, d = c["ulysses"], c["composed"], c["dense"]
        lines += ["", f"8 ranks, the same 4-head model, s = {c['seq']}, composed through `ds_twolevel.initialize` (DeepSpeed's "
                  f"`\"sequence_parallel_size\": 4` with `\"two_level\": {{\"n\": 1, \"m\": 2}}`, ZeRO-1). Ulysses' best on 8 "
                  f"ranks is sp = 4 with dp = 2: each replica's ranks hold what sp = 4 on 4 ranks holds, measured here.", "",
                  "| configuration | peak MiB per rank | vs dense | vs Ulysses sp=4 | loss error vs dense |", "|---|---|---|---|---|",
                  f"| dense (1 process) | {d['peak_mib']:.0f} | 1.00 | - | 0 |",
                  f"| Ulysses sp=4 (dp=2 on 8 ranks) | {u['peak_mib']:.0f} | {u['peak_mib'] / d['peak_mib']:.2f} | 1.00 | "
                  f"{abs(u['loss'] - d['loss']) / abs(d['loss']):.1e} |",
                  f"| Ulysses sp=4 x two-level 1x2 | {t['peak_mib']:.0f} | {t['peak_mib'] / d['peak_mib']:.2f} | "
                  f"{t['peak_mib'] / u['peak_mib']:.2f} | {abs(t['loss'] - d['loss']) / abs(d['loss']):.1e} |"]
    return "\n".join(lines) + "\n"


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per s: two-level with both switches on against Ulysses and dense (the targets: at most 1.1x
    Ulysses' peak, at most 0.3x the dense peak)."""
    out = []
    for r in rows:
        if r["what"] == "two-level 2x2 SP+VP":
            met = r["vs_ulysses"] <= 1.1 and r["vs_dense"] <= 0.3
            out.append(f"- s = {r['seq']}: two-level 2x2 with sequence_parallel and vocab_parallel holds "
                       f"{r['vs_ulysses']:.2f}x Ulysses' peak per rank and {r['vs_dense']:.2f}x the dense peak "
                       f"({'within' if met else 'outside'} 1.1x Ulysses and 0.3x dense); it sends "
                       f"{r['sent_mib']:.1f} MiB per rank.")
    return out


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_page(section: str) -> None:
    """Replace the measured section of docs/long_sequences.md (between the bench markers)."""
    text = PAGE.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-page", action="store_true", help="do not rewrite docs/long_sequences.md")
    args = parser.parse_args(argv)
    results = bench(args.seq)
    command = "python recipes/bench_long_sequences.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = render(results, command.strip())
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.no_page:
        write_page(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
