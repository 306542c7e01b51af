"""Train a small Llama whose attention is partitioned n x m with the Hugging Face Trainer + DeepSpeed.

    deepspeed --num_gpus 4 recipes/train_hf_trainer.py --deepspeed_config ds_configs/zero2_n2_m2.json
    torchrun --nproc_per_node 4 recipes/train_hf_trainer.py --deepspeed_config ds_configs/zero2_n1_m2.json

(CPU: prefix ``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1``.) The Trainer's own loop, logging and checkpoints;
``ds_twolevel.hf_trainer`` adds what it needs: ``training_arguments`` (``tensor_parallel.autotp_size =
n*m`` so that DeepSpeed's groups are the layout's and every rank of a layer gets the same batch; the
arguments the config fixes; gloo on CPU) and ``TwoLevelTrainer`` (saves dense checkpoints with every
rank). Byte-level tokens of ``recipes/data/`` (nothing to download). Writes ``--out/dense``, which
plain ``LlamaForCausalLM.from_pretrained`` loads, and ``--out/checkpoint-N`` every ``--save_steps``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ds_twolevel.tools.cli import OneLineParser

import torch

from ds_twolevel.deepspeed.config import check_config_file

DATA = Path(__file__).resolve().parent / "data"


class ByteWindows(torch.utils.data.Dataset):
    """Fixed windows of ``seq`` UTF-8 bytes over recipes/data/*.txt (input_ids = labels)."""

    def __init__(self, seq: int) -> None:
        text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(DATA.glob("*.txt")))
        tokens = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        self.windows = tokens[: tokens.numel() // seq * seq].view(-1, seq)  # (windows, seq)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="recipes/train_hf_trainer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON with a \"two_level\" section")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--seq", type=int, default=64, help="bytes per sequence")
    p.add_argument("--save_steps", type=int, default=50, help="Trainer checkpoint every this many steps")
    p.add_argument("--out", default="recipes/out/trainer", help="checkpoint-N/ and dense/")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_config_file(args.deepspeed_config, prog="recipes/train_hf_trainer.py")  # before any import below
    from transformers import LlamaConfig, LlamaForCausalLM

    import ds_twolevel
    from ds_twolevel.hf_trainer import TwoLevelTrainer, training_arguments
    from hf_integration import patch_model

    mesh = ds_twolevel.build_mesh(args.deepspeed_config)        # before TrainingArguments (gloo on CPU)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                                         max_position_embeddings=args.seq, tie_word_embeddings=False))
    report = patch_model(model, mesh)                           # every rank: its n*m share of each layer
    if torch.distributed.get_rank() == 0:
        print(report, flush=True)
    targs = training_arguments(args.out, deepspeed=args.deepspeed_config, max_steps=args.steps, logging_steps=10,
                               save_steps=args.save_steps, save_total_limit=2, report_to=[], seed=args.seed,
                               disable_tqdm=True)
    trainer = TwoLevelTrainer(model=model, args=targs, train_dataset=ByteWindows(args.seq))
    result = trainer.train()
    trainer.save_model(str(Path(args.out) / "dense"))              # every rank gathers; rank 0 writes
    if trainer.is_world_process_zero():
        print(f"\ndone: {result.global_step} steps, mean loss {result.training_loss:.4f}; "
              f"wrote {args.out}/dense (LlamaForCausalLM.from_pretrained loads it)", flush=True)


if __name__ == "__main__":
    main()
