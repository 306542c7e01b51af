"""Patch a Hugging Face causal LM onto n x m ranks and generate greedily.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 recipes/generate.py -n 2 -m 2
    OMP_NUM_THREADS=1 deepspeed --num_gpus 4 recipes/generate.py -n 1 -m 4 --arch gpt_neox
    torchrun --nproc_per_node 4 recipes/generate.py --model path/to/save_pretrained_dir

Without ``--model`` it builds a small model with seeded random weights (``--arch``): its tokens mean
nothing, what counts is that they equal the unpatched model's. With ``--model`` every rank reads only
its slices of the checkpoint (a local directory: it is checked before anything is imported). Either
way rank 0 then generates with the unpatched model and prints whether the tokens are identical
(``--no-check`` skips that for a model too large for one process).

The layout flags are ``-n``/``--n`` and ``-m``/``--m``, as in ``ds-twolevel demo``; under torchrun or
the deepspeed launcher write ``-n 2 -m 2`` (the launchers read ``--n`` as an abbreviation of their
own options).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ds_twolevel.tools.cli import OneLineParser, positive_int

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "gemma", "gemma2", "gemma3_text", "olmo2",
         "mixtral", "granite", "cohere", "phi", "stablelm", "starcoder2", "olmo3", "smollm3", "glm4", "helium",
         "qwen2_moe", "qwen3_moe", "falcon", "gpt_oss")  # hf_integration.testing.DECODERS (a test keeps them equal)


def fail(message: str) -> None:
    """One line from rank 0 (every rank would say the same), exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"recipes/generate.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parse_args() -> argparse.Namespace:
    parser = OneLineParser(prog="recipes/generate.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", help="a local save_pretrained directory (default: a small seeded --arch model)")
    parser.add_argument("--arch", default="llama", choices=ARCHS)
    parser.add_argument("-n", "--n", type=positive_int, default=2, metavar="N",
                        help="head groups: each rank holds h/n query heads (default: %(default)s)")
    parser.add_argument("-m", "--m", type=positive_int, default=2, metavar="N",
                        help="head-dim segments: each rank holds d/m dims of each head (default: %(default)s)")
    parser.add_argument("--groups", type=positive_int, dest="n", help=argparse.SUPPRESS)  # older spellings
    parser.add_argument("--segments", type=positive_int, dest="m", help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=positive_int, default=16)
    parser.add_argument("--strategy", default="cost_model", choices=("cost_model", "score_allreduce", "qk_allgather"),
                        help="cost_model: per call, the least predicted time on the device's profile (default: "
                             "%(default)s)")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the unpatched model")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args()
    if args.model and not (Path(args.model) / "config.json").is_file():
        fail(f"--model {args.model}: no such save_pretrained directory (no config.json there); pass a local "
             "directory, or leave --model out for a small seeded --arch model")
    return args


def check_world(config, world: int, n: int, m: int) -> None:
    """Refuse a world size that n x m does not divide, naming the layouts this model can take."""
    from ds_twolevel.sharding.partition import feasible_layouts
    from hf_integration.policy import intermediate_size
    from hf_integration.specs import spec_for

    if world % (n * m) == 0:
        return
    spec, inter = spec_for(config).attention_spec(config, name=config.model_type), intermediate_size(config)
    fits = [f"dp={world // p} x n={a} x m={b}" for p in range(world, 0, -1) if world % p == 0 and inter % p == 0
            for a, b in feasible_layouts(spec, p)]
    fail(f"world size {world} is not a multiple of -n x -m = {n}*{m} = {n * m}; layouts of {world} "
         f"ranks this {config.model_type} model takes: {', '.join(fits)}")


def partitioned(args: argparse.Namespace, dense):
    """(model, report) on this rank's mesh; any layout / model problem is one line, exit 2."""
    import copy

    import torch.distributed as dist

    from ds_twolevel import TwoLevelLayout
    from hf_integration import load_partitioned, patch_model

    try:  # refused before any collective, the same on every rank
        mesh = TwoLevelLayout.from_world_size(dist.get_world_size(), n=args.n, m=args.m).build()
        if args.model:
            return load_partitioned(args.model, mesh, strategy=args.strategy)
        model = copy.deepcopy(dense)
        return model, patch_model(model, mesh, strategy=args.strategy)
    except ValueError as err:
        fail(str(err))


def main() -> None:
    args = parse_args()
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from hf_integration.testing import sample_batch, tiny_model

    use_cuda = torch.cuda.is_available()
    dense = None if args.model else tiny_model(args.arch)
    config = AutoConfig.from_pretrained(args.model, local_files_only=True) if args.model else dense.config
    check_world(config, int(os.environ.get("WORLD_SIZE", "1")), args.n, args.m)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    model, report = partitioned(args, dense)
    ids, mask = (t.to(device) for t in sample_batch(0))
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id or 0)
    tokens = model.to(device).generate(ids, attention_mask=mask, **gen)
    if dist.get_rank() == 0:
        print(report)
        weights = f"the weights of {args.model}" if args.model else f"seeded random weights ({args.arch})"
        print(f"generated ({weights}):", tokens[:, ids.shape[1]:].tolist())
        if not args.no_check:
            print(compare_with_dense(args, dense, ids, mask, tokens, gen), flush=True)
    dist.destroy_process_group()


def compare_with_dense(args: argparse.Namespace, dense, ids, mask, tokens, gen: dict) -> str:
    """Rank 0: greedy tokens of the unpatched model on one process against the partitioned model's."""
    import torch
    from transformers import AutoModelForCausalLM

    if dense is None:
        dense = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    ref = dense.generate(ids.cpu(), attention_mask=mask.cpu(), **gen)
    new = tokens.shape[1] - ids.shape[1]
    same = torch.equal(tokens.cpu(), ref)
    differ = int((tokens.cpu() != ref).sum()) if tokens.shape == ref.shape else "all"
    return (f"identical to the unpatched model: {same} ({new} new tokens x {ids.shape[0]} prompts compared"
            + ("" if same else f", {differ} differ") + ")")


if __name__ == "__main__":
    main()
