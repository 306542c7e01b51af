"""The "two_level" DeepSpeed section and the shipped ds_configs/ (pure: no process group)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_twolevel.deepspeed.config import (TwoLevelConfig, check_deepspeed_config, load_deepspeed_config,
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

    tl, ds = load_deepspeed_config(path, inference="inference" in path.name)
    assert "two_level" not in ds
    sp = ds.get("sequence_parallel_size", 1)
    world = 2 * sp * tl.n * tl.m
    layout = check_deepspeed_config(tl, ds, world, device_type="cuda" if path.name.startswith("gpu") else "cpu")
    assert (layout.dp, layout.sp, layout.n, layout.m) == (2, sp, tl.n, tl.m)
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


def test_cost_model_is_the_one_name_of_the_chooser(tmp_path):
    """"cost_model" in JSON and Python; "auto" only from Python (accelerate fills JSON "auto" strings)."""
    from ds_twolevel.strategies import registry

    assert registry.AUTO == "cost_model" and "auto" not in registry.choices()
    assert TwoLevelConfig.from_dict({"n": 2, "m": 2}).strategy == "cost_model"
    assert TwoLevelConfig(n=2, m=2, strategy="auto").strategy == "cost_model"  # Python's older spelling
    assert registry.check_layer_strategy("auto") == "cost_model"
    with pytest.raises(ValueError, match=r'^"two_level.strategy": "auto" is read by accelerate .* write "strategy": '
                                         r'"cost_model"'):
        load_deepspeed_config(with_({}, strategy="auto"))
    tl, ds = load_deepspeed_config(with_({}))
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
    ({"n": 2, "m": 2, "heads": 4}, r'unknown key "heads" in "two_level" \(did you mean "probe"\?\)|unknown key "heads"'),
    ({"n": 2, "m": 2, "stratgy": "qk_allgather"}, r'^unknown key "stratgy" in "two_level" \(did you mean "strategy"\?\); '
                                                  r"its keys: n, m, dp, strategy,"),
    ({"n": 0, "m": 2}, r'^"two_level.n" must be an integer >= 1, got 0; e.g. "n": 2$'),
    ({"n": 2, "m": 2, "strategy": "fast"}, r'"two_level.strategy" must be one of'),
    ({"n": 2, "m": 2, "timeout_s": 0}, r'"two_level.timeout_s" must be a finite number in \[1, 604800\], got 0'),
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
    ({"sequence_parallel_size": 3}, {}, r'"sequence_parallel_size" = 3 with n\*m = 2\*2: .*sp\*n\*m = 12 ranks.*use sp=1, sp=2'),
    ({}, {"zero_init": True}, r'"two_level.zero_init" needs ZeRO stage 3 \(the config has stage 2\)'),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, {},
     r'zero_hpz_partition_size" = 2 groups consecutive ranks.*set it to 1'),
    ({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}}, {},
     r"zero_quantized_gradients\" reduces gradients by all-to-all over the ranks of each node"),
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

    from ds_twolevel.deepspeed.runtime import _resolve_config

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
    from ds_twolevel.deepspeed.faults import _is_peer_failure

    assert _is_peer_failure(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 8000ms"))
    assert _is_peer_failure(RuntimeError("Connection closed by peer [127.0.0.1]:29500"))
    assert not _is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not _is_peer_failure(ValueError("timed out"))


def test_a_model_without_a_policy_is_refused_with_the_fix():
    from torch import nn

    from ds_twolevel import TwoLevelLayout
    from ds_twolevel.deepspeed.runtime import default_policy

    tl, _ = load_deepspeed_config(BASE)
    with pytest.raises(ValueError, match=r"no two-level injection policy for Linear.*pass policy="):
        default_policy(nn.Linear(2, 2), TwoLevelLayout(n=1, m=1).build(), tl)


# -- one validation layer: type and range of every key we read, one line each -----------------------
def _from_json_text(tmp_path, text: str):
    """Load a config written as JSON text (Python's json reads Infinity / NaN literals)."""
    path = tmp_path / "ds.json"
    path.write_text(text)
    return load_deepspeed_config(path)


@pytest.mark.parametrize("two_level,message", [
    ('{"n": 2, "m": 2, "timeout_s": Infinity}',
     '"two_level.timeout_s" must be a finite number in [1, 604800], got Infinity; e.g. "timeout_s": 600'),
    ('{"n": 2, "m": 2, "timeout_s": NaN}',
     '"two_level.timeout_s" must be a finite number in [1, 604800], got NaN; e.g. "timeout_s": 600'),
    ('{"n": 2, "m": 2, "timeout_s": 1e-7}',
     '"two_level.timeout_s" must be a finite number in [1, 604800], got 1e-07; e.g. "timeout_s": 600'),
    ('{"n": 2, "m": 2, "timeout_s": "600"}',
     '"two_level.timeout_s" must be a finite number in [1, 604800], got "600"; e.g. "timeout_s": 600'),
    ('{"n": 2.0, "m": 2}', '"two_level.n" must be an integer >= 1, got 2.0; e.g. "n": 2'),
    ('{"n": true, "m": 2}', '"two_level.n" must be an integer >= 1, got true; e.g. "n": 2'),
    ('{"n": 2, "m": 2, "dp": 0}', '"two_level.dp" must be an integer >= 1 (or null), got 0; e.g. "dp": 2'),
    ('{"n": 2, "m": 2, "dist_backend": 7}',
     '"two_level.dist_backend" must be a non-empty string (or null), got 7; e.g. "dist_backend": "gloo"'),
    ('{"n": 2, "m": 2, "strategy": ["auto"]}',
     '"two_level.strategy" must be one of "cost_model", "score_allreduce", "qk_allgather", "seq_rows", got ["auto"]; '
     'e.g. "strategy": "cost_model"'),
])
def test_two_level_values_are_type_and_range_checked(tmp_path, two_level, message):
    """Table rows: Infinity / NaN gave OverflowError / ValueError from timedelta, 1e-7 a 0 ms socket timeout."""
    with pytest.raises(ValueError) as err:
        _from_json_text(tmp_path, '{"train_micro_batch_size_per_gpu": 2, "two_level": ' + two_level + "}")
    assert str(err.value) == message


@pytest.mark.parametrize("section,message", [
    ('"fp16": true', '"fp16" must be a JSON object, got true; e.g. "fp16": {}'),
    ('"zero_optimization": []', '"zero_optimization" must be a JSON object, got []; e.g. "zero_optimization": {}'),
    ('"zero_optimization": {"stage": 4}',
     '"zero_optimization.stage": Input should be 0, 1, 2, 3 or 3, got 4 (DeepSpeed\'s DeepSpeedZeroConfig)'),
    ('"zero_optimization": {"stage": 2, "stagee": 2}',
     '"zero_optimization.stagee": Extra inputs are not permitted, got 2 (DeepSpeed\'s DeepSpeedZeroConfig)'),
    ('"zero_optimization": {"stage": "2"}', '"zero_optimization.stage" is the string "2"; DeepSpeed reads numbers as '
                                            'JSON numbers: write "stage": 2 (no quotes)'),
    ('"zero_optimization": {"stage": 2, "reduce_bucket_size": "5e7"}',
     '"zero_optimization.reduce_bucket_size" is the string "5e7"; DeepSpeed reads numbers as JSON numbers: write '
     '"reduce_bucket_size": 5e7 (no quotes)'),
    ('"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}',
     '"zero_optimization.offload_optimizer": Input should be a valid dictionary or instance of '
     'DeepSpeedZeroOffloadOptimizerConfig, got "cpu" (DeepSpeed\'s DeepSpeedZeroConfig)'),
    ('"optimizer": {"type": "AdamW", "params": {"lr": "1e-3"}}',
     '"optimizer.params.lr" is the string "1e-3"; DeepSpeed reads numbers as JSON numbers: write "lr": 1e-3 (no quotes)'),
    ('"optimizer": {"type": "AdamW", "params": {"betas": 0.9}}',
     '"optimizer.params.betas" must be a list of 2 numbers, got 0.9; e.g. "betas": [0.9, 0.999]'),
    ('"optimizer": {"type": "AdamW", "params": {"weight_decay": true}}',
     '"optimizer.params.weight_decay" must be a finite number, got true; e.g. "weight_decay": 0.01'),
    ('"optimizer": {"type": "AdamW", "params": {"torch_adam": "yes"}}',
     '"optimizer.params.torch_adam" must be true or false, got "yes"; e.g. "torch_adam": false'),
    ('"tensor_parallel": {"autotp_size": Infinity}',
     '"tensor_parallel.autotp_size": Input should be a finite number, got Infinity (DeepSpeed\'s TPTrainingConfig)'),
    ('"train_micro_batch_size_per_gpu": 0',
     '"train_micro_batch_size_per_gpu" must be an integer >= 1 (or "auto" or null), got 0; e.g. "train_micro_batch_size_per_gpu": 2'),
    ('"gradient_accumulation_steps": 1.5',
     '"gradient_accumulation_steps" must be an integer >= 1 (or "auto" or null), got 1.5; e.g. "gradient_accumulation_steps": 2'),
    ('"gradient_clipping": NaN', '"gradient_clipping" must be a finite number >= 0, got NaN; e.g. "gradient_clipping": 1.0'),
    ('"gradient_clipping": true', '"gradient_clipping" must be a finite number >= 0, got true; e.g. "gradient_clipping": 1.0'),
    ('"wall_clock_breakdown": "no"', '"wall_clock_breakdown" must be true or false, got "no"; e.g. "wall_clock_breakdown": false'),
    ('"optimizer": {"type": "AdamW", "params": [0.001]}', '"optimizer.params" must be a JSON object, got [0.001]'),
    ('"scheduler": "WarmupLR"', '"scheduler" must be a JSON object, got "WarmupLR"; e.g. "scheduler": '
                                '{"type": "WarmupLR", "params": {"warmup_num_steps": 100}}'),
    ('"fp16": {"enabled": true}, "bf16": {"enabled": true}',
     '"fp16": DeepSpeed\'s config parser refused it: bfloat16 and fp16 modes cannot be simultaneously enabled'),
    ('"zero_optimization": {"stage": 3, "mics_shard_size": 2}',
     '"zero_optimization": DeepSpeed\'s config parser refused it: MiCS ZeRO-3 sharding has been removed; '
     "'zero_optimization.mics_shard_size' is no longer supported. See https://github.com/deepspeedai/DeepSpeed/issues/8489."),
])
def test_deepspeed_sections_are_checked_by_deepspeeds_parser(tmp_path, section, message):
    """DeepSpeed's own pydantic models (a section of the wrong type, a value out of range, a key a
    section does not have), plus what its parser lets through but fails on later: numbers written as
    strings, optimizer params of the wrong type, top-level values of another type than the default."""
    with pytest.raises(ValueError) as err:
        _from_json_text(tmp_path, "{" + section + ', "two_level": {"n": 2, "m": 2}}')
    assert str(err.value) == message


def test_inference_configs_are_checked_by_deepspeeds_inference_model():
    with pytest.raises(ValueError, match=r'^"dtype": .*got "fp64" \(DeepSpeed\'s DeepSpeedInferenceConfig\)'):
        load_deepspeed_config({"dtype": "fp64", "two_level": {"n": 2, "m": 2}}, inference=True)
    tl, ds = load_deepspeed_config({"dtype": "bf16", "replace_with_kernel_inject": False, "two_level": {"n": 2, "m": 2}},
                                   inference=True)
    assert ds == {"dtype": "bf16", "replace_with_kernel_inject": False}


def test_unknown_top_level_key_warns_once_with_did_you_mean_or_fails_under_strict_config(capfd, monkeypatch):
    from ds_twolevel.deepspeed import config_schema

    monkeypatch.setattr(config_schema, "_warned", set())
    monkeypatch.delenv("RANK", raising=False)
    cfg = with_({"gradient_clliping": 1.0})
    load_deepspeed_config(cfg)
    load_deepspeed_config(cfg)  # once per key and process
    err = capfd.readouterr().err
    assert err == ('ds-twolevel: warning: unknown key "gradient_clliping" in the DeepSpeed config (did you mean '
                   '"gradient_clipping"?); DeepSpeed ignores it ("two_level": {"strict_config": true} makes this an '
                   'error)\n')
    with pytest.raises(ValueError, match=r'^unknown key "gradient_clliping" in the DeepSpeed config \(did you mean '
                                         r'"gradient_clipping"\?\); DeepSpeed would ignore it'):
        load_deepspeed_config(with_({"gradient_clliping": 1.0}, strict_config=True))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(config_schema, "_warned", set())
    load_deepspeed_config(cfg)
    assert capfd.readouterr().err == ""  # rank 0 says it for every rank


def test_deepspeeds_key_list_is_read_from_deepspeed():
    from ds_twolevel.deepspeed.config_schema import deepspeed_keys

    keys = deepspeed_keys()
    assert {"zero_optimization", "optimizer", "scheduler", "gradient_clipping", "bf16", "tensor_parallel"} <= set(keys)
    assert keys["gradient_clipping"] == 1.0 and "two_level" not in keys
    assert {"dtype", "replace_with_kernel_inject", "tensor_parallel"} <= set(deepspeed_keys(inference=True))


def test_placeholders_accelerate_fills_are_accepted():
    cfg = with_({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                 "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}})
    tl, ds = load_deepspeed_config(cfg)
    assert check_deepspeed_config(tl, ds, 8).dp == 2


def test_a_config_that_is_not_an_object_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"DeepSpeed config '.*ds.json' must be a JSON object, got \[1, 2\]"):
        _from_json_text(tmp_path, "[1, 2]")
    with pytest.raises(ValueError, match=r"DeepSpeed config '.*ds.json' is not valid JSON: Expecting"):
        _from_json_text(tmp_path, '{"two_level": {"n": 2,}}')
    with pytest.raises(ValueError, match=r"a DeepSpeed config is a path or a dict, got 3"):
        load_deepspeed_config(3)


# -- property: whatever JSON value sits wherever, only ValueError escapes the loader ----------------
# written out here, not taken from the schema, so that a key the schema forgot is still exercised
PATHS = [(), ("two_level",), *[("two_level", k) for k in ("n", "m", "dp", "strategy", "kv_replication", "strict",
                                                           "timeout_s", "dist_backend", "zero_init", "sync_init", "probe", "hardware",
                                                           "reduce_dtype",
                                                           "x")],
         *[(k,) for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                          "gradient_clipping", "steps_per_print", "sequence_parallel_size", "zero_optimization", "fp16",
                          "bf16", "bfloat16", "tensor_parallel", "checkpoint", "optimizer", "scheduler", "dtype",
                          "replace_with_kernel_inject", "wall_clock_breakdown", "anything")],
         *[("zero_optimization", k) for k in ("stage", "zero_hpz_partition_size", "mics_shard_size",
                                              "zero_quantized_gradients", "offload_param")],
         ("fp16", "enabled"), ("bf16", "enabled"), ("tensor_parallel", "autotp_size"), ("tensor_parallel", "tp_size"),
         ("checkpoint", "writer"), ("checkpoint", "use_node_local_storage"), ("optimizer", "type"),
         ("optimizer", "params"), ("scheduler", "type"), ("scheduler", "params")]


AWKWARD = [float("nan"), float("inf"), -float("inf"), 0, -1, 1, 2, 4, 1e-7, 2.0, 2 ** 64, 10 ** 400, True, False, None,
           "", "auto", "2", "x" * 100, [], {}, [2], {"enabled": True}, {"stage": 3}]


def _json_values():
    from hypothesis import strategies as st

    special = st.sampled_from(AWKWARD)
    leaves = (special | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
              | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=6) | st.sampled_from(["stage", "enabled", "n", "m", "type", "params"]), inner, max_size=3),
        max_leaves=8)


def _put(cfg, path: tuple[str, ...], value):
    """``cfg`` with ``value`` at ``path`` (creating objects on the way; replacing cfg when path is ())."""
    if not path:
        return value
    if not isinstance(cfg, dict):
        return cfg
    node = cfg
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return cfg


def _load_and_check(cfg, world: int = 8, device: str = "cpu") -> None:
    """load + check; ValueError is fine, anything else fails the test; what passes must be usable."""
    try:
        tl, ds = load_deepspeed_config(cfg)
        check_deepspeed_config(tl, ds, world, device_type=device)
    except ValueError:
        return
    assert 1 <= tl.timeout_s <= 7 * 24 * 3600, tl.timeout_s  # accepted means usable
    assert isinstance(tl.n, int) and isinstance(tl.m, int) and tl.n * tl.m <= world


def test_every_key_with_every_awkward_value():
    """Exhaustive over PATHS x AWKWARD (one edit each): only ValueError, or a usable config."""
    for path in PATHS:
        for value in AWKWARD:
            _load_and_check(_put(json.loads(json.dumps(BASE)), path, value))


def test_property_only_value_errors_escape_the_loader():
    """hypothesis: random JSON values (nested objects/lists/strings/numbers incl. NaN and Infinity/
    bools/null) at random positions of a valid config; load + check either pass or raise ValueError,
    and what passes has a usable timeout and layout."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(edits=st.lists(st.tuples(st.sampled_from(PATHS), _json_values()), min_size=1, max_size=3),
           world=st.sampled_from([1, 2, 4, 8, 16]), device=st.sampled_from(["cpu", "cuda"]))
    def run(edits, world, device):
        cfg = json.loads(json.dumps(BASE))
        for path, value in edits:
            cfg = _put(cfg, path, value)
        _load_and_check(cfg, world, device)

    run()


def test_build_mesh_in_a_single_process_refuses_at_once(monkeypatch):
    """No launcher (no WORLD_SIZE) or a world of 1: nobody to agree with, the error is raised as is
    before any rendezvous (under a launcher the ranks agree first: tests/test_fault_matrix.py)."""
    import torch.distributed as dist

    import ds_twolevel

    for world in (None, "1"):
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(ValueError, match=r'^"zero_optimization" must be a JSON object, got \[\]'):
            ds_twolevel.build_mesh({"zero_optimization": [], "two_level": {"n": 1, "m": 1}})
        assert not dist.is_initialized()


def test_steps_per_print_takes_accelerates_infinity_and_nothing_else_infinite(tmp_path):
    """accelerate's DeepSpeedPlugin writes ``steps_per_print = float("inf")`` (never print)."""
    tl, ds = _from_json_text(tmp_path, '{"two_level": {"n": 2, "m": 2}, "steps_per_print": Infinity}')
    assert ds["steps_per_print"] == float("inf")
    with pytest.raises(ValueError, match=r'"steps_per_print" must be an integer >= 0, got -Infinity'):
        _from_json_text(tmp_path, '{"two_level": {"n": 2, "m": 2}, "steps_per_print": -Infinity}')


def test_ulysses_layout_from_sequence_parallel_size():
    """DeepSpeed's own key sets sp: dp = world / (sp*n*m), ranks m fastest, then n, sp, dp."""
    layout = check_deepspeed_config(*load_deepspeed_config(with_({"sequence_parallel_size": 2}, n=1, m=2)), 8)
    assert (layout.dp, layout.sp, layout.n, layout.m) == (2, 2, 1, 2)
    assert [layout.sp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [layout.coordinate(r)[0] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("update, two_level, match", [
    ({"sequence_parallel_size": 4}, {"n": 1, "m": 2}, r"needs a multiple of sp\*n\*m = 8 ranks, the world has 4; .*use sp=1, sp=2"),
    ({"sequence_parallel_size": 2}, {"sequence_parallel": True}, r'"sequence_parallel": false'),
    ({"sequence_parallel_size": 2}, {"vocab_parallel": True}, r'"vocab_parallel": false'),
    ({"sequence_parallel_size": 2, "data_parallel_size": 1}, {}, r'remove "data_parallel_size"'),
    ({"sequence_parallel_size": 2, "zero_optimization": {"stage": 3, "reduce_scatter": False}}, {},
     r'reduce_scatter": false at ZeRO stage 3'),
    ({"sequence_parallel_size": 0}, {}, r'"sequence_parallel_size" must be an int >= 1, got 0'),
])
def test_ulysses_combinations_refused(update, two_level, match):
    tl, ds = load_deepspeed_config(with_(update, **{"n": 1, "m": 2, **two_level}))
    with pytest.raises(ValueError, match=match):
        check_deepspeed_config(tl, ds, 4)


def test_ulysses_head_rules():
    """(h/n) % sp, Ulysses' KV rule and one head size, with the n that fit."""
    from ds_twolevel.parallel.ulysses import check_ulysses

    check_ulysses("m", heads=8, kv_heads=2, n=2, sp=4, head_dim=16, v_head_dim=16)  # KV head replicated 4x
    with pytest.raises(ValueError, match=r"\(h/n\) % sp == 0; with sp=4 use n in \{1, 2\}"):
        check_ulysses("m", heads=8, kv_heads=8, n=4, sp=4, head_dim=16, v_head_dim=16)
    with pytest.raises(ValueError, match=r"KV heads \(g/n = 6/2 = 3\) divisible by sp, or sp divisible by them"):
        check_ulysses("m", heads=12, kv_heads=6, n=2, sp=2, head_dim=16, v_head_dim=16)
    with pytest.raises(ValueError, match=r"head_dim 16 and v_head_dim 8"):
        check_ulysses("m", heads=8, kv_heads=8, n=1, sp=2, head_dim=16, v_head_dim=8)


def test_accelerate_and_trainer_refuse_ulysses_before_any_process_group():
    """accelerate's and the Trainer's Ulysses groups ignore the two-level ones: refused, pointing to initialize."""
    from ds_twolevel.accelerate import build_mesh, deepspeed_config

    cfg = with_({"sequence_parallel_size": 2}, n=1, m=2)
    for call in (lambda: deepspeed_config(cfg, world_size=4), lambda: build_mesh(cfg)):
        with pytest.raises(ValueError, match=r'"sequence_parallel_size" = 2 .* runs through ds_twolevel.initialize'):
            call()
    assert deepspeed_config(with_({}, n=1, m=2), world_size=4)["tensor_parallel"] == {"autotp_size": 2}
