"""``ds-twolevel convert CKPT OUT``: the dense fp32 weights of a two-level DeepSpeed checkpoint.

DeepSpeed's ``zero_to_fp32.py`` (copied into every checkpoint directory) cannot merge two-level
shards: it takes every ``*_optim_states.pt`` for a data-parallel rank and stops ("Expected 2 of
'*_optim_states.pt' ... but found 4"). This converter reads each tensor-parallel rank's files
(:mod:`ds_twolevel.deepspeed.zero_files`), assembles the dense tensors from the checkpoint's recorded shard
coordinates (:mod:`ds_twolevel.sharding.shard_manifest`) and writes a Hugging Face directory
(``model.safetensors`` + ``config.json``) that ``from_pretrained`` loads. The values are ZeRO's
fp32 master weights (stage 0: the module's weights). No GPU, process group or engine is needed.

``ds_twolevel.save_checkpoint`` replaces the ``zero_to_fp32.py`` / ``zero_to_torch.py`` beside the
checkpoint with scripts that take DeepSpeed's arguments and call this converter (or, without
ds_twolevel installed, say in one line how to convert).

Example:
    $ ds-twolevel convert out/ckpt out/dense            # the checkpoint 'latest' names
    $ python out/ckpt/zero_to_fp32.py out/ckpt out/fp32 --safe_serialization
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ds_twolevel.sharding.shard_manifest import MANIFEST_NAME, ShardManifest

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_tag_dir(checkpoint_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """A tag directory itself, or the checkpoint ``tag`` (default: the one ``latest`` names) inside it."""
    from ds_twolevel.deepspeed.checkpoint import find_checkpoint

    path = Path(checkpoint_dir)
    if (path / MANIFEST_NAME).is_file() and tag is None:
        return path
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a directory; pass a checkpoint directory (the one holding 'latest')")
    tag_dir = path / find_checkpoint(path, tag)
    if not (tag_dir / MANIFEST_NAME).is_file():
        raise ValueError(f"{tag_dir} has no {MANIFEST_NAME}: it was not saved by ds_twolevel (use DeepSpeed's "
                         f"zero_to_fp32.py for checkpoints of unpartitioned models)")
    return tag_dir


def dense_fp32(checkpoint_dir: str | os.PathLike, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The dense fp32 state dict (unpatched model's names) of a checkpoint. Pure (no process group).

    Example:
        >>> state = dense_fp32("out/ckpt")     # LlamaForCausalLM(config).load_state_dict(state)
    """
    from ds_twolevel.deepspeed.checkpoint import dense_from_checkpoint

    return dense_from_checkpoint(resolve_tag_dir(checkpoint_dir, tag))["fp32"]


def _write_weights(state: dict[str, torch.Tensor], out: Path, *, safe: bool, max_shard_size: str | None) -> None:
    """``model.safetensors`` / ``pytorch_model.bin``, split into shards with an index when larger
    than ``max_shard_size`` (huggingface_hub's splitter, as DeepSpeed's script uses)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    name = "model.safetensors" if safe else "pytorch_model.bin"
    pattern = name.replace(".safetensors", "{suffix}.safetensors").replace(".bin", "{suffix}.bin")
    split = split_torch_state_dict_into_shards(state, filename_pattern=pattern, max_shard_size=max_shard_size or "1000GB")
    for file, keys in split.filename_to_tensors.items():
        shard = {k: state[k].contiguous() for k in keys}
        if safe:
            from safetensors.torch import save_file

            save_file(shard, str(out / file), metadata={"format": "pt"})
        else:
            torch.save(shard, out / file)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / (name + ".index.json")).write_text(json.dumps(index, indent=2))


def _config_json(manifest: ShardManifest) -> dict[str, Any] | None:
    model = manifest.info.get("model", {})
    config = model.get("config")
    if config is None:
        return None
    return {**config, "architectures": config.get("architectures") or [model.get("class")]}


def convert_checkpoint(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, *, tag: str | None = None,
                       dtype: str | torch.dtype = torch.float32, safe_serialization: bool = True,
                       max_shard_size: str | None = None, write_config: bool = True) -> Path:
    """Write the dense weights of a two-level checkpoint to ``output_dir`` (atomically: temp dir + rename).

    ``config.json`` is written from the model config recorded in the checkpoint, so that
    ``AutoModel*.from_pretrained(output_dir)`` loads the result.

    Example:
        >>> convert_checkpoint("out/ckpt", "out/dense")   # Qwen3ForCausalLM.from_pretrained("out/dense")
    """
    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in dense_fp32(tag_dir).items()}
    final = Path(output_dir).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _write_weights(state, tmp, safe=safe_serialization, max_shard_size=max_shard_size)
        config = _config_json(ShardManifest.read(tag_dir)) if write_config else None
        if config is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- command line ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (holding 'latest') or one tag directory")
    parser.add_argument("output", help="output directory (a Hugging Face model directory)")
    parser.add_argument("--tag", default=None, help="tag to convert (default: the one the latest file names)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    parser.add_argument("--bin", action="store_true", help="write pytorch_model.bin instead of model.safetensors")
    parser.add_argument("--max_shard_size", default=None, help="split the weights into files of this size (e.g. 5GB)")


def main(args: argparse.Namespace) -> int:
    out = convert_checkpoint(args.checkpoint, args.output, tag=args.tag, dtype=args.dtype,
                             safe_serialization=not args.bin, max_shard_size=args.max_shard_size)
    print(f"dense weights of {resolve_tag_dir(args.checkpoint, args.tag)} written to {out}")
    return 0


# -- the scripts that replace DeepSpeed's beside a checkpoint ----------------------------------------
_SCRIPT = '''#!/usr/bin/env python
"""Written by ds_twolevel in place of DeepSpeed's {name}: this checkpoint holds two-level (n x m)
tensor-parallel shards, which DeepSpeed's script cannot merge. Same arguments; runs ds_twolevel's
converter (the dense weights under the unpatched model's names).

    python {name} CHECKPOINT_DIR OUTPUT_DIR [--safe_serialization] [-t TAG]{dtype_usage}
"""
import argparse
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--safe_serialization", action="store_true")
    parser.add_argument("-t", "--tag", default=None)
    parser.add_argument("--exclude_frozen_parameters", action="store_true")
    parser.add_argument("-d", "--debug", action="store_true")
    {dtype_arg}
    args = parser.parse_args()
    try:
        from ds_twolevel.deepspeed.convert import convert_checkpoint
    except ImportError:
        sys.exit("{name}: this checkpoint holds two-level (n x m) shards that DeepSpeed's script cannot merge; "
                 "install ds_twolevel and run: ds-twolevel convert " + args.checkpoint_dir + " " + args.output_dir)
    if args.exclude_frozen_parameters:
        sys.exit("{name}: --exclude_frozen_parameters is not supported for two-level checkpoints; drop the flag")
    try:
        out = convert_checkpoint(args.checkpoint_dir, args.output_dir, tag=args.tag, dtype={dtype_value},
                                 safe_serialization=args.safe_serialization, max_shard_size=args.max_shard_size,
                                 write_config=False)
    except (ValueError, FileNotFoundError) as err:
        sys.exit("{name}: error: " + str(err))
    print("dense weights written to " + str(out))


if __name__ == "__main__":
    main()
'''


def recovery_script(name: str) -> str:
    """The text of ``zero_to_fp32.py`` or ``zero_to_torch.py`` (with ``--dtype``) for our checkpoints."""
    with_dtype = name == "zero_to_torch.py"
    return _SCRIPT.format(
        name=name, dtype_usage=" --dtype DTYPE" if with_dtype else "",
        dtype_arg=('parser.add_argument("--dtype", required=True, choices=["float32", "fp32", "float16", "fp16", '
                   '"bfloat16", "bf16"])') if with_dtype else "pass",
        dtype_value="args.dtype" if with_dtype else '"float32"')


def write_recovery_scripts(save_dir: Path) -> None:
    """Replace DeepSpeed's conversion scripts beside a checkpoint with ours (atomically)."""
    from ds_twolevel.deepspeed.checkpoint import write_atomic

    for name in ("zero_to_fp32.py", "zero_to_torch.py"):
        write_atomic(save_dir / name, recovery_script(name), mode=0o755)
