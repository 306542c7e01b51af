"""Load a save_pretrained directory slice by slice onto n x m ranks, generate, save it dense again."""
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from ds_twolevel import TwoLevelLayout
from hf_integration import load_partitioned

model_dir = sys.argv[1] if len(sys.argv) > 1 else "recipes/out/tiny-llama"
dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
if dist.get_rank() == 0 and not os.path.isdir(model_dir):  # a tiny seeded model stands in for yours
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=4)).save_pretrained(model_dir)
dist.barrier()

mesh = TwoLevelLayout(n=2, m=2).build()              # 4 ranks: 2 head groups x 2 head-dim segments
model, report = load_partitioned(model_dir, mesh)   # each rank reads only its own slices
ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
model.save_pretrained(model_dir + "-dense")          # collective: gathers the shards, rank 0 writes
if dist.get_rank() == 0:
    dense = LlamaForCausalLM.from_pretrained(model_dir).eval()
    same = torch.equal(tokens, dense.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                              do_sample=False))
    print(report)
    print(f"generated {tokens[0, 8:].tolist()}; identical to the unpatched model: {same}")
dist.destroy_process_group()
