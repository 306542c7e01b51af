"""Peak resident memory per rank: slice-by-slice loading vs loading the full model, then patching.

    python recipes/measure_lazy_load.py            # 4 ranks, n=2 x m=2, a ~90M-parameter Llama

Writes a seeded checkpoint with ``save_pretrained``, then runs two 4-rank gloo launches: each rank
records its peak RSS (VmHWM; ``resource.getrusage`` elsewhere) before and after loading.
"""
from __future__ import annotations

import argparse
import importlib
import resource
import tempfile
from pathlib import Path

import torch
import transformers

from ds_twolevel import TwoLevelLayout
from ds_twolevel.testing import run_distributed
from hf_integration import load_partitioned, patch_model


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB.

    Linux: VmHWM of /proc/self/status (ru_maxrss would carry over the launching process's peak,
    since rusage survives fork + exec); elsewhere ru_maxrss.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_checkpoint(directory: Path, args: argparse.Namespace) -> int:
    """A seeded Llama saved with save_pretrained (sharded safetensors); returns its bytes."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=args.hidden, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, intermediate_size=4 * args.hidden,
                                      num_hidden_layers=args.layers, vocab_size=args.vocab, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="100MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def warm_up(directory: str, n: int, m: int):
    """Build the mesh and import the model code first: their memory is not the weights'."""
    mesh = TwoLevelLayout(n=n, m=m).build()
    config = transformers.AutoConfig.from_pretrained(directory)
    getattr(transformers, config.architectures[0])
    importlib.import_module("transformers.conversion_mapping")  # imported by both loading paths
    return mesh


def rank_lazy(directory: str, n: int, m: int) -> dict:
    """Load only this rank's slices."""
    mesh = warm_up(directory, n, m)
    before = peak_rss_mib()
    model, report = load_partitioned(directory, mesh, probe=False)  # the probe's cost: recipes/measure_probe.py
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"before": before, "peak": peak_rss_mib(), "local_mib": local / 2**20, "report": str(report)}


def rank_full(directory: str, n: int, m: int) -> dict:
    """Baseline: every rank loads the whole model, then patches it."""
    mesh = warm_up(directory, n, m)
    before = peak_rss_mib()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    patch_model(model, mesh, probe=False)
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"before": before, "peak": peak_rss_mib(), "local_mib": local / 2**20, "report": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--m", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        full_bytes = write_checkpoint(Path(tmp), args)
        world = args.n * args.m
        rows = {name: run_distributed(fn, world, tmp, args.n, args.m, timeout=600)
                for name, fn in (("slices (load_partitioned)", rank_lazy), ("full from_pretrained + patch", rank_full))}
    print(rows["slices (load_partitioned)"][0]["report"])
    print(f"model: {full_bytes / 2**20:.0f} MiB fp32; layout n={args.n} x m={args.m} on {world} ranks")
    print(f"{'loading':<30} {'rank':>4} {'params held MiB':>16} {'peak RSS increase MiB':>22}")
    for name, results in rows.items():
        for rank, r in enumerate(results):
            print(f"{name:<30} {rank:>4} {r['local_mib']:>16.0f} {r['peak'] - r['before']:>22.0f}")


if __name__ == "__main__":
    main()
