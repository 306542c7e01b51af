"""Greedy generation with a two-level partitioned model inside DeepSpeed's InferenceEngine.

    deepspeed --num_gpus 4 recipes/infer_deepspeed.py --model recipes/out/dense \\
        --deepspeed_config ds_configs/inference_n2_m2.json --prompt "We hold these truths"

(CPU: prefix ``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1``.) ``ds_twolevel.init_inference`` is
``deepspeed.init_inference`` with the two-level policy: it partitions the attention/MLP over the
n*m ranks and wraps the model in DeepSpeed's engine (DeepSpeed's own TP and kernel injection
stay off). Every rank runs ``generate`` on the same prompt; rank 0 prints. Byte-level tokens, as
in ``recipes/train.py``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

import ds_twolevel


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a dense Hugging Face checkpoint (e.g. train.py --export)")
    p.add_argument("--deepspeed_config", required=True, help="inference JSON with a \"two_level\" section")
    p.add_argument("--prompt", default="We hold these truths")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--out", default=None, help="write the generated ids as JSON here (rank 0)")
    args = p.parse_args(argv)
    model = LlamaForCausalLM.from_pretrained(args.model).eval()  # dense on every rank, then partitioned
    engine = ds_twolevel.init_inference(model, args.deepspeed_config)
    prompt = torch.tensor([list(args.prompt.encode("utf-8"))])  # (1, s) byte ids
    with torch.no_grad():
        out = engine.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                              max_new_tokens=args.max_new_tokens, do_sample=False)
    if dist.get_rank() == 0:
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
        print(f"generated ({engine.two_level.mesh}): {text!r}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"ids": out[0].tolist()}))
    dist.barrier()


if __name__ == "__main__":
    main()
