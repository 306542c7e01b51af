"""Patch a Hugging Face causal LM onto n x m ranks and generate greedily.

    torchrun --nproc_per_node 4 recipes/generate.py --groups 2 --segments 2
    deepspeed --num_gpus 4 recipes/generate.py --groups 2 --segments 2
    torchrun --nproc_per_node 4 recipes/generate.py --model path/to/save_pretrained_dir

Without ``--model`` it builds a small seeded model (``--arch``) and also checks the tokens against
the unpatched model. With ``--model`` every rank reads only its slices of the checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist

from ds_twolevel import TwoLevelLayout
from hf_integration import load_partitioned, patch_model
from hf_integration.testing import DECODERS, sample_batch, tiny_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="save_pretrained directory (default: a small seeded --arch model)")
    parser.add_argument("--arch", default="llama", choices=DECODERS)
    # not --n/--m: torchrun would take them as abbreviations of its own options
    parser.add_argument("--groups", type=int, default=2, help="n: head groups")
    parser.add_argument("--segments", type=int, default=2, help="m: head-dim segments")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--strategy", default="auto", choices=("auto", "score_allreduce", "qk_allgather"))
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    mesh = TwoLevelLayout.from_world_size(dist.get_world_size(), n=args.groups, m=args.segments).build()
    dense = None
    if args.model:
        model, report = load_partitioned(args.model, mesh, strategy=args.strategy)
    else:
        dense = tiny_model(args.arch)
        model = copy.deepcopy(dense)
        report = patch_model(model, mesh, strategy=args.strategy)
    ids, mask = (t.to(device) for t in sample_batch(0))
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id or 0)
    tokens = model.to(device).generate(ids, attention_mask=mask, **gen)
    if dist.get_rank() == 0:
        print(report)
        print("generated:", tokens[:, ids.shape[1]:].tolist())
        if dense is not None:
            same = torch.equal(tokens.cpu(), dense.generate(ids.cpu(), attention_mask=mask.cpu(), **gen))
            print(f"identical to the unpatched model: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
