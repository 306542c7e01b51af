"""End-to-end greedy ``generate()`` on gloo ranks: two-level with its defaults against the peers a user
would pick, in one launch, on the same weights and prompts.

``python -m ds_twolevel.tools.bench.generation --out docs/`` writes ``generation_bench.md`` and
``generation_bench.json``. Each row times whole ``generate()`` calls barrier to barrier (the best of
``repeats``), and a call with one new token for the prefill, so that

* tokens per second = batch x new tokens / generate time;
* time per output token (TPOT) = (generate time - prefill time) / (new tokens - 1).

Peers: the dense model on one process; two-level at every n x m of the ranks with m > 1, defaults
(``patch_model`` then plain ``generate()``: preallocated cache, layout by the cost model); head-wise
TP with KV replication (n = ranks, m = 1; KV heads copied as vLLM does); DeepSpeed AutoTP
(``deepspeed.init_inference`` at tp = ranks); Hugging Face's native TP (``from_pretrained(...,
tp_plan="auto")``), or the error it raises. Every row's tokens are compared with the dense model's.
A second model, 2 layers of dense multi-head attention with many heads (the shape of the method's
source experiment, in miniature), compares two-level with head-wise TP.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ds_twolevel.tools.bench.measure import step_time

MD, JSON = "generation_bench.md", "generation_bench.json"


@dataclass(frozen=True)
class GenerationBenchConfig:
    """Shapes of the end-to-end generation bench."""

    ranks: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 2
    """fewer KV heads than ranks: head-wise TP needs KV replication, AutoTP leaves ranks idle."""
    head_dim: int = 32
    intermediate: int = 512
    layers: int = 2
    vocab: int = 1000
    prompts: tuple[int, ...] = (1024, 4096)
    batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 64
    repeats: int = 2
    mini_heads: int = 32
    """heads of the source-experiment miniature (multi-head attention, ``hidden / mini_heads`` dims each)."""
    mini_shape: tuple[int, int] = (8, 1024)
    """(batch, prompt) of the miniature."""
    seed: int = 0

    @classmethod
    def quick(cls) -> "GenerationBenchConfig":
        """Tiny shapes for the smoke test: seconds, not minutes."""
        return cls(hidden=64, heads=4, head_dim=16, intermediate=128, layers=1, vocab=64, prompts=(16,),
                   batches=(2,), new_tokens=4, repeats=1, mini_heads=8, mini_shape=(2, 16))

    def llama(self, *, heads: int | None = None, kv_heads: int | None = None):
        """The seeded tiny Llama (``heads``/``kv_heads`` override: the miniature's MHA)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        h = heads or self.heads
        config = LlamaConfig(hidden_size=self.hidden, num_attention_heads=h, num_key_value_heads=kv_heads or self.kv_heads,
                             head_dim=self.hidden // h if heads else self.head_dim, intermediate_size=self.intermediate,
                             num_hidden_layers=self.layers, vocab_size=self.vocab, attn_implementation="sdpa",
                             max_position_embeddings=max(self.prompts + (self.mini_shape[1],)) + self.new_tokens,
                             pad_token_id=0, bos_token_id=1, eos_token_id=None)
        torch.manual_seed(self.seed)
        return LlamaForCausalLM(config).eval()


@dataclass
class GenerationRow:
    """One peer at one shape (rank 0's timing; tokens compared on every rank, reported from rank 0)."""

    model: str
    peer: str
    batch: int
    prompt: int
    new_tokens: int
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    tokens_per_s: float = 0.0
    tpot_ms: float = 0.0
    same_tokens: bool | None = None
    kv_layout: str = ""
    error: str = ""
    times: list[float] = field(default_factory=list)


def _prompt(cfg: GenerationBenchConfig, batch: int, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * batch + length)
    return torch.randint(2, cfg.vocab, (batch, length), generator=gen)


def _measure(row: GenerationRow, generate: Callable[..., Any], ids: torch.Tensor, want: torch.Tensor | None,
             repeats: int, alone: bool = False) -> None:
    """Time ``generate`` (full and prefill-only) and compare its tokens with ``want``."""
    kw = dict(do_sample=False, pad_token_id=0)
    full = lambda: generate(ids, max_new_tokens=row.new_tokens, min_new_tokens=row.new_tokens, **kw)
    prefill = lambda: generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    out: dict[str, Any] = {}
    step_time(lambda: out.setdefault("tokens", full()), alone)  # warm-up, and the tokens
    row.times = [step_time(full, alone) for _ in range(repeats)]
    row.seconds = min(row.times)
    row.prefill_seconds = min(step_time(prefill, alone) for _ in range(repeats))
    row.tokens_per_s = row.batch * row.new_tokens / row.seconds
    decode = row.seconds - row.prefill_seconds  # <= 0 only when other load swamps the run: no figure then
    row.tpot_ms = 1e3 * decode / max(row.new_tokens - 1, 1) if decode > 0 else float("nan")
    tokens = out.get("tokens")
    if want is not None and tokens is not None:
        row.same_tokens = bool(torch.equal(tokens, want))


def _dense_tokens(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """The unpatched model's greedy tokens (every rank computes them: the reference each row compares with)."""
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def _two_level_peers(cfg: GenerationBenchConfig, dense, *, heads: int, kv_heads: int) -> list[tuple[str, Any]]:
    """(name, patched model) for every n x m with m > 1 of the ranks, and head-wise TP (m = 1)."""
    from ds_twolevel.parallel.layout import TwoLevelLayout
    from ds_twolevel.sharding.partition import AttentionSpec, feasible_layouts
    from hf_integration import patch_model

    spec = AttentionSpec(heads, kv_heads, cfg.hidden // heads if heads != cfg.heads else cfg.head_dim, rope_style="half")
    peers = []
    for n, m in feasible_layouts(spec, cfg.ranks, kv_replication=True):
        model = copy.deepcopy(dense)
        patch_model(model, TwoLevelLayout(n=n, m=m).build(), kv_replication=n > kv_heads)
        name = (f"two-level {n}x{m} (defaults)" if m > 1 else
                f"head-wise TP n={n}" + (" + KV replication" if n > kv_heads else ""))
        peers.append((name, model))
    return peers


def _autotp(cfg: GenerationBenchConfig, dense) -> Any:
    os.environ["LOCAL_SIZE"] = os.environ["WORLD_SIZE"]  # else inference_all_reduce segfaults on CPU
    import deepspeed

    from ds_twolevel.deepspeed.runtime import release_shm_workspace

    engine = deepspeed.init_inference(copy.deepcopy(dense), tensor_parallel={"tp_size": cfg.ranks},
                                      dtype=torch.float32, replace_with_kernel_inject=False)
    release_shm_workspace()
    return engine.module


def _hf_native_tp(cfg: GenerationBenchConfig, path: str) -> Any:
    """Hugging Face's own tensor parallelism over all ranks (raises what it raises)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).eval()


def _error_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"


def bench_rank(cfg: GenerationBenchConfig, save_dir: str) -> list[dict]:
    """Body of every rank: build the peers once, then time each at every shape (rank 0's rows reported)."""
    import torch.distributed as dist

    rows: list[GenerationRow] = []
    dense = cfg.llama()
    if dist.get_rank() == 0:
        dense.save_pretrained(save_dir)
    dist.barrier()
    peers: list[tuple[str, Any, bool]] = [("dense, 1 process", dense, True)]
    peers += [(name, model, False) for name, model in _two_level_peers(cfg, dense, heads=cfg.heads,
                                                                       kv_heads=cfg.kv_heads)]
    failed: dict[str, str] = {}
    for name, build in ((f"DeepSpeed AutoTP tp={cfg.ranks}", lambda: _autotp(cfg, dense)),
                        (f"HF native TP tp={cfg.ranks}", lambda: _hf_native_tp(cfg, save_dir))):
        try:
            peers.append((name, build(), False))
        except Exception as err:  # the peer refuses this layout: recorded, not fatal
            failed[name] = _error_line(err)
    with torch.no_grad():
        for batch in cfg.batches:
            for prompt in cfg.prompts:
                ids = _prompt(cfg, batch, prompt)
                want = _dense_tokens(dense, ids, cfg.new_tokens)
                for name, model, alone in peers:
                    row = GenerationRow("tiny Llama", name, batch, prompt, cfg.new_tokens)
                    try:
                        _measure(row, model.generate, ids, None if alone else want, cfg.repeats, alone)
                    except Exception as err:
                        row.error = _error_line(err)
                    row.kv_layout = _layout_of(model, batch, prompt, cfg.new_tokens)
                    rows.append(row)
                rows += [GenerationRow("tiny Llama", name, batch, prompt, cfg.new_tokens, error=msg)
                         for name, msg in failed.items()]
        rows += _miniature(cfg)
    return [asdict(r) for r in rows]


def _layout_of(model, batch: int, prompt: int, new: int) -> str:
    from hf_integration.generation import choose_kv_layout
    from hf_integration.modules import HFTwoLevelAttention

    if not any(isinstance(m, HFTwoLevelAttention) for m in model.modules()):
        return ""
    return choose_kv_layout(model, batch=batch, prompt=prompt, new_tokens=new)


def _miniature(cfg: GenerationBenchConfig) -> list[GenerationRow]:
    """The source's experiment in miniature: 2 layers of multi-head attention with many heads, two-level
    against head-wise TP, at one shape."""
    mini_cfg = replace(cfg, layers=2)
    dense = mini_cfg.llama(heads=cfg.mini_heads, kv_heads=cfg.mini_heads)
    batch, prompt = cfg.mini_shape
    ids = _prompt(cfg, batch, prompt)
    want = _dense_tokens(dense, ids, cfg.new_tokens)
    label = f"2-layer MHA, {cfg.mini_heads} heads x {cfg.hidden // cfg.mini_heads}"
    rows = []
    for name, model in _two_level_peers(mini_cfg, dense, heads=cfg.mini_heads, kv_heads=cfg.mini_heads):
        row = GenerationRow(label, name, batch, prompt, cfg.new_tokens)
        _measure(row, model.generate, ids, want, cfg.repeats)
        row.kv_layout = _layout_of(model, batch, prompt, cfg.new_tokens)
        rows.append(row)
    return rows


def run(cfg: GenerationBenchConfig, timeout: float = 3600) -> list[dict]:
    """Launch ``cfg.ranks`` gloo ranks and return rank 0's rows."""
    from ds_twolevel.testing import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(bench_rank, cfg.ranks, cfg, str(Path(tmp) / "model"), timeout=timeout)[0]


# -- report -----------------------------------------------------------------------------------------
def _cell(row: dict) -> str:
    if row["error"]:
        return f"| {row['peer']} | failed: `{row['error']}` | | | |"
    tpot = "n/a (load)" if row["tpot_ms"] != row["tpot_ms"] else f"{row['tpot_ms']:.2f}"
    same = {True: "yes", False: "**no**", None: "(reference)"}[row["same_tokens"]]
    layout = f" ({row['kv_layout']} cache)" if row["peer"].startswith("two-level") else ""
    return (f"| {row['peer']}{layout} | {row['tokens_per_s']:,.0f} | {tpot} | "
            f"{row['prefill_seconds'] * 1e3:,.0f} | {same} |")


def verdicts(rows: list[dict]) -> list[str]:
    """Per shape: the fastest peer by TPOT, and whether two-level's default beats the peers on 4 ranks."""
    out = []
    for key in sorted({(r["model"], r["batch"], r["prompt"]) for r in rows}):
        ok = [r for r in rows if (r["model"], r["batch"], r["prompt"]) == key and not r["error"]
              and r["tpot_ms"] == r["tpot_ms"]]  # NaN: no figure
        ranked = [r for r in ok if not r["peer"].startswith("dense")]
        if not ranked:
            continue
        best = min(ranked, key=lambda r: r["tpot_ms"])
        ours = [r for r in ranked if r["peer"].startswith("two-level")]
        peers = [r for r in ranked if not r["peer"].startswith("two-level")]
        line = (f"- {key[0]}, b={key[1]}, prompt {key[2]:,}: fastest decode (TPOT) of {len(ranked)} distributed "
                f"peers: {best['peer']} ({best['tpot_ms']:.2f} ms)")
        if ours and peers:
            mine, theirs = min(ours, key=lambda r: r["tpot_ms"]), min(peers, key=lambda r: r["tpot_ms"])
            ratio = mine["tpot_ms"] / theirs["tpot_ms"]
            line += f"; best two-level / best other peer ({theirs['peer']}) = {ratio:.2f}x"
        out.append(line)
    return out


def long_context_verdict(rows: list[dict], cfg: GenerationBenchConfig) -> str:
    """At the longest prompt and largest batch: is two-level's default decode step (TPOT) at most AutoTP's and
    head-wise TP + KV replication's, measured in the same run?"""
    key = ("tiny Llama", max(cfg.batches), max(cfg.prompts))
    sel = {r["peer"]: r for r in rows if (r["model"], r["batch"], r["prompt"]) == key}
    missing = [name for name, r in sel.items() if ("AutoTP" in name or "KV replication" in name
                                                   or name.startswith("two-level"))
               and (r["error"] or r["tpot_ms"] != r["tpot_ms"])]
    if missing:
        return f"- long-context verdict: no figure for {', '.join(missing)} in this run (failed, or other load swamped its decode)"
    ours = [r for name, r in sel.items() if name.startswith("two-level")]
    others = [r for name, r in sel.items() if "AutoTP" in name or "KV replication" in name]
    mine = min(ours, key=lambda r: r["tpot_ms"])
    worst = max(mine["tpot_ms"] / r["tpot_ms"] for r in others)
    names = " and ".join(f"{r['peer']} {r['tpot_ms']:.2f} ms" for r in others)
    return (f"- long-context verdict (b={key[1]}, prompt {key[2]:,}): two-level's default decode step "
            f"{'<=' if worst <= 1.0 else '>'} the peers': {mine['peer']} {mine['tpot_ms']:.2f} ms against {names} "
            f"({'met' if worst <= 1.0 else 'not met'})")


def report(rows: list[dict], cfg: GenerationBenchConfig, meta: dict) -> str:
    """The markdown page."""
    parts = [
        "# End-to-end generation against the peers\n",
        "Regenerate with `python -m ds_twolevel.tools.bench.generation --out docs/` "
        f"({meta['when']}, commit {meta['commit']}, {meta['machine']}). Greedy `generate()` of "
        f"{cfg.new_tokens} new tokens on {cfg.ranks} gloo ranks (one thread each), fp32, a seeded tiny Llama "
        f"(hidden {cfg.hidden}, {cfg.heads} heads, {cfg.kv_heads} KV heads of {cfg.head_dim}, {cfg.layers} layers, "
        f"vocabulary {cfg.vocab}). Each time is the best of {cfg.repeats} calls, barrier to barrier; TPOT = "
        "(generate time - prefill time) / (new tokens - 1). \"same tokens\": identical to the dense model's. "
        "Two-level rows name the KV layout the cost model chose. CPU times say which layout moves less and "
        "waits less on 4 processes; they are not GPU figures.\n",
        "Where each wins:\n", "\n".join(verdicts(rows) + [long_context_verdict(rows, cfg)]) + "\n",
        "The Helix-style layout (KV sharded by sequence, W_q/W_k/W_v replicated) is not a `generate()` peer here: "
        "its layer (`ds_twolevel/tools/bench/helix.py`) is measured per decode step, exact against the dense model, "
        "in performance.md section 3, and compared in the model in decode_study.md (\"Two-level against Helix\").\n"]
    for key in sorted({(r["model"], r["batch"], r["prompt"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["batch"], r["prompt"]) == key]
        parts.append(f"## {key[0]}, batch {key[1]}, prompt {key[2]:,}\n\n"
                     "| peer | tokens/s | TPOT ms | prefill ms | same tokens |\n|---|---|---|---|---|\n"
                     + "\n".join(_cell(r) for r in sel) + "\n")
    return "\n".join(parts)


def _meta() -> dict:
    import platform
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"when": time.strftime("%Y-%m-%d"), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the start"}


def write(out: Path, cfg: GenerationBenchConfig, results: Path | None = None) -> list[Path]:
    """Run the bench (or read ``results``, a JSON it wrote) and write the page and the JSON into ``out``."""
    if results is not None:
        saved = json.loads(results.read_text())
        rows, meta, cfg = saved["rows"], saved["meta"], _config_from(saved["config"])
    else:
        meta = _meta()
        rows = run(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON).write_text(json.dumps({"meta": meta, "config": asdict(cfg), "rows": rows}, indent=1) + "\n")
    (out / MD).write_text(report(rows, cfg, meta))
    return [out / MD, out / JSON]


def _config_from(saved: dict) -> GenerationBenchConfig:
    tuples = {k: tuple(v) for k, v in saved.items() if isinstance(v, list)}
    return GenerationBenchConfig(**{**saved, **tuples})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_twolevel.tools.bench.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder to write into (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--from-json", type=Path, default=None, help="render a saved generation_bench.json again")
    args = parser.parse_args(argv)
    cfg = GenerationBenchConfig.quick() if args.quick else GenerationBenchConfig()
    for path in write(args.out, cfg, args.from_json):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
