"""Greedy generation with a two-level partitioned model inside DeepSpeed's InferenceEngine.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 4 recipes/infer_deepspeed.py \\
        --model recipes/out/dense --deepspeed_config ds_configs/inference_n2_m2.json \\
        --prompt "We hold these truths"

``ds_twolevel.init_inference`` is ``deepspeed.init_inference`` with the two-level policy: it
partitions the attention/MLP over the n*m ranks and wraps the model in DeepSpeed's engine
(DeepSpeed's own TP and kernel injection stay off). Every rank runs ``generate`` on the same
prompt; rank 0 prints. Byte-level tokens, as in ``recipes/train.py`` (``--export`` writes the
``--model`` directory this reads). The paths are checked before anything is imported or launched.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ds_twolevel.tools.cli import OneLineParser, positive_int


def fail(message: str) -> None:
    """One line from local rank 0 (every rank of a node would say the same), exit status 2."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"recipes/infer_deepspeed.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_paths(args: argparse.Namespace) -> None:
    """--model must be a local save_pretrained directory: never a Hub id (no network lookups)."""
    model = Path(args.model)
    if not model.is_dir():
        fail(f"--model {args.model}: no such directory; it takes a local dense checkpoint, e.g. the one "
             "`recipes/train.py --export` writes to recipes/out/dense (its --out/dense)")
    if not (model / "config.json").is_file():
        fail(f"--model {args.model}: no config.json in it; pass a save_pretrained directory "
             "(`recipes/train.py --export` writes one to recipes/out/dense)")
    if not Path(args.deepspeed_config).is_file():
        fail(f"--deepspeed_config {args.deepspeed_config}: no such file (the shipped ones are in ds_configs/)")
    from ds_twolevel.deepspeed.config import check_config_file

    check_config_file(args.deepspeed_config, prog="recipes/infer_deepspeed.py", inference=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="recipes/infer_deepspeed.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local dense Hugging Face checkpoint (train.py --export)")
    p.add_argument("--deepspeed_config", required=True, help="inference JSON with a \"two_level\" section")
    p.add_argument("--prompt", default="We hold these truths")
    p.add_argument("--max_new_tokens", type=positive_int, default=32)
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--out", default=None, help="write the generated ids as JSON here (rank 0)")
    p.add_argument("--no_check", action="store_true",
                   help="skip rank 0's comparison with the unpatched model (a model too large for one process)")
    args = p.parse_args(argv)
    check_paths(args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    import ds_twolevel

    model = LlamaForCausalLM.from_pretrained(args.model, local_files_only=True).eval()  # dense, then partitioned
    try:
        engine = ds_twolevel.init_inference(model, args.deepspeed_config)
    except ValueError as err:  # a layout / config the model or the world cannot take: refused before any collective
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"recipes/infer_deepspeed.py: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    prompt = torch.tensor([list(args.prompt.encode("utf-8"))])  # (1, s) byte ids
    with torch.no_grad():
        out = engine.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                              max_new_tokens=args.max_new_tokens, do_sample=False)
    if dist.get_rank() == 0:
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
        print(f"generated ({engine.two_level.mesh}; the weights of {args.model}, as trained there): {text!r}",
              flush=True)
        if not args.no_check:
            dense = LlamaForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
            with torch.no_grad():
                ref = dense.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=args.max_new_tokens, do_sample=False)
            same = torch.equal(out.cpu(), ref)
            print(f"identical to the unpatched model (one process, same weights): {same} "
                  f"({ref.shape[1] - prompt.shape[1]} new tokens compared)", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"ids": out[0].tolist()}))
    dist.barrier()


if __name__ == "__main__":
    main()
