"""The "two_level" DeepSpeed section and the shipped ds_configs/ (pure: no process group)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_twolevel.config import (TwoLevelConfig, check_deepspeed_config, load_deepspeed_config,
                                save_deepspeed_config)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))
BASE = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2}, "two_level": {"n": 2, "m": 2}}


def with_(update: dict, **two_level) -> dict:
    cfg = json.loads(json.dumps(BASE))
    cfg.update(update)
    cfg["two_level"].update(two_level)
    return cfg


def test_ds_configs_exist():
    names = {p.name for p in CONFIGS}
    for stage in (0, 1, 2, 3):
        assert any(n.startswith(f"zero{stage}_") for n in names), stage
    assert any(n.startswith("inference") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads_through_dataclass_and_deepspeed(path):
    from deepspeed.inference.config import DeepSpeedInferenceConfig
    from deepspeed.runtime.config import DeepSpeedConfig

    tl, ds = load_deepspeed_config(path)
    assert "two_level" not in ds
    world = 2 * tl.n * tl.m
    layout = check_deepspeed_config(tl, ds, world, device_type="cuda" if path.name.startswith("gpu") else "cpu")
    assert (layout.dp, layout.n, layout.m) == (2, tl.n, tl.m)
    if "inference" in path.name:
        parsed = DeepSpeedInferenceConfig(**ds)
        assert not parsed.replace_with_kernel_inject
    else:
        parsed = DeepSpeedConfig(ds)  # DeepSpeed's own parser (no process group: world 1)
        assert parsed.zero_optimization_stage == ds["zero_optimization"]["stage"]
        assert parsed.gradient_clipping == ds["gradient_clipping"]  # explicit: it defaults to 1.0
        assert tl.zero_init == (parsed.zero_optimization_stage == 3 and "init" in path.name)


def test_round_trip_through_json(tmp_path):
    tl, ds = load_deepspeed_config(with_({}, strategy="qk_allgather", timeout_s=30.0))
    save_deepspeed_config(tl, ds, tmp_path / "c.json")
    tl2, ds2 = load_deepspeed_config(tmp_path / "c.json")
    assert (tl2, ds2) == (tl, ds)
    assert tl2.to_dict()["strategy"] == "qk_allgather"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_has_no_auto_placeholder(path):
    """accelerate and the HF Trainer fill (or refuse) every "auto" string of a DeepSpeed JSON."""
    assert '"auto"' not in path.read_text(), path


def test_cost_model_is_the_json_spelling_of_auto(tmp_path):
    assert TwoLevelConfig.from_dict({"n": 2, "m": 2, "strategy": "cost_model"}).strategy == "auto"
    assert TwoLevelConfig.from_dict({"n": 2, "m": 2, "strategy": "auto"}).strategy == "auto"  # old spelling read
    tl, ds = load_deepspeed_config(with_({}, strategy="auto"))
    save_deepspeed_config(tl, ds, tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["two_level"]["strategy"] == "cost_model"
    assert load_deepspeed_config(tmp_path / "c.json")[0] == tl


def test_missing_section_names_the_fix():
    cfg = with_({})
    del cfg["two_level"]
    with pytest.raises(ValueError, match=r'no "two_level" section; add e.g. "two_level": \{"n": 2, "m": 2\}'):
        load_deepspeed_config(cfg)


@pytest.mark.parametrize("section,match", [
    ({"n": 2}, r'"two_level" needs \[\'m\'\]'),
    ({"n": 2, "m": 2, "heads": 4}, r"unknown key\(s\) \['heads'\]"),
    ({"n": 0, "m": 2}, r'"two_level.n" must be an int >= 1, got 0'),
    ({"n": 2, "m": 2, "strategy": "fast"}, r'"two_level.strategy" must be one of'),
    ({"n": 2, "m": 2, "timeout_s": 0}, r'"two_level.timeout_s" must be a number of seconds > 0'),
    ({"n": 2, "m": 2, "strict": "yes"}, r'"two_level.strict" must be true or false'),
    ([2, 2], r'"two_level" must be a JSON object'),
])
def test_bad_section_is_refused(section, match):
    with pytest.raises(ValueError, match=match):
        TwoLevelConfig.from_dict(section)


def test_world_that_does_not_factor_lists_layouts():
    tl, ds = load_deepspeed_config(with_({}))
    with pytest.raises(ValueError, match=r"world size 6 is not a multiple of n\*m = 2\*2 = 4.*n=2 x m=3"):
        check_deepspeed_config(tl, ds, 6)


@pytest.mark.parametrize("update,two_level,match", [
    ({}, {"dp": 4}, r'"two_level" says dp=4 but 8 ranks / \(n\*m = 4\) give dp=2; launch 16 ranks or remove "dp"'),
    ({"tensor_parallel": {"autotp_size": 2}}, {}, r'autotp_size" = 2 contradicts "two_level".*remove "tensor_parallel"'),
    ({"sequence_parallel_size": 2}, {}, r'"sequence_parallel_size" = 2 is not supported'),
    ({}, {"zero_init": True}, r'"two_level.zero_init" needs ZeRO stage 3 \(the config has stage 2\)'),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, {},
     r'zero_hpz_partition_size" = 2 groups consecutive ranks.*set it to 1'),
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 2}}, {}, r'mics_shard_size" = 2 shards over consecutive'),
    ({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}}, {},
     r"zero_quantized_gradients\" reduces gradients by all-to-all over the ranks of each node"),
    ({"zero_optimization": {"stage": 4}}, {}, r'"zero_optimization.stage" must be 0, 1, 2 or 3, got 4'),
    ({"train_batch_size": 16}, {}, r'"train_batch_size" = 16 != micro batch 2 x gradient_accumulation_steps 1 x dp 2 '
                                   r"\(it was computed with the world size 8; batches count replicas, not ranks\); "
                                   r"set it to 4"),
    ({"fp16": {"enabled": True}}, {}, r'"fp16.enabled" is not supported on CPU; use "bf16"'),
    ({"checkpoint": {"writer": {"decoupled": True}}}, {}, r'remove "checkpoint.writer"'),
])
def test_contradictions_and_unhonourable_settings_are_refused(update, two_level, match):
    tl, ds = load_deepspeed_config(with_(update, **two_level))
    with pytest.raises(ValueError, match=match):
        check_deepspeed_config(tl, ds, 8)


def test_consistent_batch_and_dp_pass():
    tl, ds = load_deepspeed_config(with_({"train_batch_size": 4}, dp=2))
    assert check_deepspeed_config(tl, ds, 8).dp == 2


# -- initialize's argument handling and helpers (no process group) ------------------------------
def test_config_given_twice_or_not_at_all_is_refused():
    import argparse

    from ds_twolevel.deepspeed_integration import _resolve_config

    args = argparse.Namespace(deepspeed_config="a.json", local_rank=0)
    with pytest.raises(ValueError, match="given twice"):
        _resolve_config(BASE, args)
    with pytest.raises(ValueError, match="no DeepSpeed config"):
        _resolve_config(None, argparse.Namespace(local_rank=0))
    config, new_args = _resolve_config(None, args)
    assert config == "a.json" and new_args.deepspeed_config is None and args.deepspeed_config == "a.json"


def test_initialize_owns_the_mpu():
    import ds_twolevel

    with pytest.raises(ValueError, match="mpu= is set by ds_twolevel.initialize"):
        ds_twolevel.initialize(model=object(), config=BASE, mpu=object())


def test_replica_rows_need_a_batch_that_splits_over_dp():
    import torch

    from ds_twolevel import TwoLevelLayout, replica_rows

    mesh = TwoLevelLayout(n=1, m=1).build()  # one process: dp = 1
    batch = torch.arange(12).view(6, 2)
    assert torch.equal(replica_rows(batch, mesh), batch)


def test_peer_failures_are_recognised_and_other_errors_are_not():
    from ds_twolevel.deepspeed_integration import _is_peer_failure

    assert _is_peer_failure(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 8000ms"))
    assert _is_peer_failure(RuntimeError("Connection closed by peer [127.0.0.1]:29500"))
    assert not _is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not _is_peer_failure(ValueError("timed out"))


def test_a_model_without_a_policy_is_refused_with_the_fix():
    from torch import nn

    from ds_twolevel import TwoLevelLayout
    from ds_twolevel.deepspeed_integration import default_policy

    tl, _ = load_deepspeed_config(BASE)
    with pytest.raises(ValueError, match=r"no two-level injection policy for Linear.*pass policy="):
        default_policy(nn.Linear(2, 2), TwoLevelLayout(n=1, m=1).build(), tl)
