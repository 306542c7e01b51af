"""The main job as a user runs it (the console script spawns its own ranks), and every bad flag of
``demo`` and ``plan``: one line on stderr, exit status 2, no traceback, before any rank starts."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)


def test_console_script_demo_default_layout():
    exe = shutil.which("ds-twolevel")
    assert exe, "ds-twolevel console script not installed (run: bash install.sh)"
    proc = _run(exe, "demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "dp=1 x n=2 x m=2" in out
    rows = re.findall(r"^\s+(\d) \((\d), (\d), (\d)\)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)/(\d+)", out, re.M)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    for row in rows:
        assert max(float(e) for e in row[4:7]) <= 1e-5
    assert "all_gather/m/q" in out or "/m/scores" in out
    assert out.strip().endswith("(OK)")


@pytest.mark.parametrize("flags", [["--m", "4", "--n", "1", "--dp", "2", "--strategy", "score_allreduce",
                                    "--qk-norm", "--kv-heads", "2"]])
def test_module_demo_with_flags(flags):
    proc = _run(sys.executable, "-m", "ds_twolevel", "demo", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # s = 16 causal prefill at m = 4: 8 causal blocks, reduce-scatter of scores; at d = 16 gathering V
    # and all-to-all'ing the output rows sends fewer bytes than gathering the probabilities
    assert "dp=2 x n=1 x m=4" in proc.stdout and "reduce_scatter/m/scores" in proc.stdout
    assert "all_gather/m/v" in proc.stdout and "all_to_all/m/attn_rows" in proc.stdout
    assert "all_gather/m/probs" not in proc.stdout
    assert "all_reduce/m/q_sumsq" in proc.stdout


def test_demo_refuses_bad_layout_with_the_fix():
    proc = _run(sys.executable, "-m", "ds_twolevel", "demo", "--n", "3")
    assert proc.returncode == 2
    assert "num_heads (8) is not divisible by n=3" in proc.stderr and "n=2 x m=3" not in proc.stderr
    assert "nearest that fit: 4 devices: n=4 x m=1, n=2 x m=2, n=1 x m=4; 8 devices: n=4 x m=2" in proc.stderr


# -- bad input: one line on stderr, exit status 2, no traceback, nothing spawned ------------------------
def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """ds_twolevel.tools.cli.main in this process (what the console script runs); (status, stdout, stderr)."""
    from ds_twolevel.tools import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse's own errors, --help, --version
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line(code: int, out: str, err: str, *expected: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not out.strip(), (code, out, err)
    assert "Traceback" not in err and "error:" in lines[0], err
    for text in expected:
        assert text in lines[0], (text, lines[0])


DEMO_BAD = [
    *[([flag, value], f"argument -{flag[2:]}/{flag}: must be an int >= 1, got {value!r}")
      for flag in ("--n", "--m") for value in ("0", "-2", "x", "1.5")],
    *[([flag, value], f"argument {flag}: must be an int >= 1, got {value!r}")
      for flag in ("--dp", "--batch", "--seq", "--hidden", "--heads", "--kv-heads", "--head-dim",
                   "--intermediate") for value in ("0", "-2", "x", "1.5")],
    (["--strategy", "bogus"], "argument --strategy: invalid choice: 'bogus' (choose from 'cost_model', "
                              "'score_allreduce', 'qk_allgather')"),
    (["-n", "3"], "num_heads (8) is not divisible by n=3"),
    (["--rope", "rotary"], "argument --rope: invalid choice: 'rotary' (choose from 'half', 'interleaved', 'none')"),
    (["--seed", "-1"], "argument --seed: must be an int in [0, 2**63), got '-1'"),
    (["--seed", "x"], "argument --seed: must be an int in [0, 2**63), got 'x'"),
    (["--qk-norm=yes"], "argument --qk-norm: ignored explicit argument 'yes'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--n", "3"], "num_heads (8) is not divisible by n=3"),
    (["--m", "3"], "do not split into m=3 equal segments"),
    (["--kv-heads", "3"], "--heads 8 is not a multiple of --kv-heads 3 (each KV head serves h/g query heads); "
                          "use a --kv-heads that divides 8: 1, 2, 4, 8"),
    (["--kv-heads", "16"], "--heads 8 is not a multiple of --kv-heads 16"),
    (["--head-dim", "15"], "--head-dim 15 is odd, but --rope half rotates pairs of dims"),
    (["--intermediate", "6"], "--intermediate 6 is not divisible by n*m = 4 (the MLP is split over the n*m ranks); "
                              "use a multiple of 4, e.g. 8"),
]


@pytest.mark.parametrize("flags,expected", DEMO_BAD, ids=[" ".join(f) for f, _ in DEMO_BAD])
def test_demo_bad_value_is_one_line_exit_2(capsys, flags, expected):
    _assert_one_line(*_cli(capsys, "demo", *flags), expected)


PLAN = ["plan", "--model", "llama-3-8b", "--devices", "16"]
PLAN_BAD = [
    *[([flag, value], f"argument {flag}: must be an int >= 1, got {value!r}")
      for flag in ("--devices", "--seq", "--batch") for value in ("0", "-3", "x")],
    (["--phase", "bogus"], "argument --phase: invalid choice: 'bogus' (choose from 'prefill', 'decode', 'train')"),
    (["--zero", "4"], "argument --zero: invalid choice: 4 (choose from 0, 1, 2, 3)"),
    (["--hardware", "tpu"], "argument --hardware: invalid choice: 'tpu' (choose from 'cpu', 'h100')"),
    (["--strategy", "fast"], "argument --strategy: invalid choice: 'fast'"),
    (["--model", "no-such-model"], "--model 'no-such-model' is neither a preset (llama-3-8b, llama-3-70b, paper) nor a config.json"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("flags,expected", PLAN_BAD, ids=[" ".join(f) for f, _ in PLAN_BAD])
def test_plan_bad_value_is_one_line_exit_2(capsys, flags, expected):
    _assert_one_line(*_cli(capsys, *PLAN, *flags), expected)


@pytest.mark.parametrize("content,expected", [
    ("{not json", "cannot read it as JSON"),
    ("[1, 2]", "a config.json holds a JSON object, got list"),
    ('{"model_type": "llama"}', "config has no hidden_size/num_attention_heads"),
    ('{"hidden_size": "big", "num_attention_heads": 4}', "unusable shapes in the config"),
    ('{"hidden_size": 64, "num_attention_heads": 0}', "unusable shapes in the config"),
])
def test_plan_bad_config_json_is_one_line_exit_2(capsys, tmp_path, content, expected):
    (tmp_path / "config.json").write_text(content)
    _assert_one_line(*_cli(capsys, "plan", "--model", str(tmp_path), "--devices", "4"), expected)


def test_missing_arguments_and_subcommand_are_one_line(capsys):
    _assert_one_line(*_cli(capsys, "plan", "--model", "llama-3-8b"), "the following arguments are required: --devices")
    _assert_one_line(*_cli(capsys), "the following arguments are required: {demo,plan,bench,")
    _assert_one_line(*_cli(capsys, "train"), "invalid choice: 'train'")


def test_plan_without_a_feasible_layout_names_the_nearest_device_counts(capsys):
    from ds_twolevel.costmodel import Phase
    from ds_twolevel.costmodel.hardware import H100_SXM
    from ds_twolevel.costmodel.planner import PRESETS, plan

    code, out, err = _cli(capsys, "plan", "--model", "llama-3-8b", "--devices", "3")
    _assert_one_line(code, out, err, "no dp x n x m layout of 3 devices can run llama-3-8b",
                     "1 x 3 x 1: num_heads (32) is not divisible by n=3",
                     "3 x 1 x 1: batch (8) is not divisible by dp=3",
                     "Nearest device counts with a feasible layout: 2 (best ", ") and 4 (best ")
    phase = Phase("prefill", 8, 4096)
    feasible = lambda p: any(r.feasible for r in plan(PRESETS["llama-3-8b"], p, phase, H100_SXM))
    assert feasible(2) and feasible(4) and not feasible(3)


def test_plan_of_a_config_json_is_labelled_with_its_name(capsys, tmp_path):
    config = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4,
              "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps({**config, "_name_or_path": "my-org/tiny-llama"}))
    code, out, _ = _cli(capsys, "plan", "--model", str(tmp_path / "config.json"), "--devices", "4")
    assert code == 0 and out.startswith("**my-org/tiny-llama** on 4 x h100"), out[:200]
    (tmp_path / "config.json").write_text(json.dumps(config))  # no name inside: the path as given
    code, out, _ = _cli(capsys, "plan", "--model", str(tmp_path), "--devices", "4")
    assert code == 0 and out.startswith(f"**{tmp_path}** on 4 x h100"), out[:200]


# -- help and version ----------------------------------------------------------------------------------
def test_demo_help_explains_the_layout_and_lists_choices(capsys):
    code, out, _ = _cli(capsys, "demo", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert "n head groups" in text and "m segments" in text and "dp replicas" in text
    assert "Example: --dp 2 -n 2 -m 2" in text and "holds query heads 4-7" in text
    assert "{cost_model,score_allreduce,qk_allgather}" in text and "{half,interleaved,none}" in text
    assert "(default: 16)" in text and "(default: cost_model)" in text and "auto" not in text
    assert "least predicted time" in text and "-n N, --n N" in text and "-m N, --m N" in text


def test_plan_help_shows_defaults_and_choices(capsys):
    code, out, _ = _cli(capsys, "plan", "--help")
    text = " ".join(out.split())
    assert code == 0
    for default in ("(default: 4096)", "(default: 8)", "(default: prefill)", "(default: h100)",
                    "(default: cost_model)"):
        assert default in text, default
    assert "{cpu,h100}" in text and "{cost_model,score_allreduce,qk_allgather,seq_rows,kv_shard}" in text
    assert "nearest device counts" in text and "auto" not in text


def test_top_level_help_says_n_x_m_and_version_matches_pyproject(capsys):
    import tomllib

    from ds_twolevel import __version__

    code, out, _ = _cli(capsys, "--help")
    text = " ".join(out.split())
    assert code == 0 and "n head groups x m head-dim segments" in text and "m x n" not in text
    for name in ("demo", "plan", "bench", "prebuild"):
        assert name in text
    code, out, _ = _cli(capsys, "--version")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert code == 0 and out.strip() == f"ds-twolevel {__version__}" == f"ds-twolevel {pyproject['project']['version']}"


def test_import_sets_the_per_environment_extensions_dir_unless_the_user_set_one(tmp_path):
    """DeepSpeed's CPU comm op is built per environment: ``import ds_twolevel`` sets TORCH_EXTENSIONS_DIR."""
    from ds_twolevel.deepspeed.env import extensions_dir

    code = "import os, ds_twolevel; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert unset.stdout.strip() == str(extensions_dir())
    assert "var/ds_twolevel/torch_extensions" in unset.stdout or "env-" in unset.stdout  # not torch's shared ~/.cache root
    mine = subprocess.run([sys.executable, "-c", code], env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                          capture_output=True, text=True, check=True)
    assert mine.stdout.strip() == str(tmp_path)


@pytest.mark.parametrize("recipe, flag", [("train.py", "--steps=0"), ("generate.py", "--n=x"),
                                          ("infer_deepspeed.py", "--max_new_tokens=-1"),
                                          ("train_hf_trainer.py", "--bogus")])
def test_recipe_usage_errors_are_one_line_and_said_by_rank_0_only(recipe, flag):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for rank, lines in (("0", 1), ("1", 0)):  # under a launcher every rank parses the same flags
        proc = subprocess.run([sys.executable, str(root / "recipes" / recipe), flag], env={**env, "RANK": rank},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == lines, (rank, proc.stderr)
        assert not lines or proc.stderr.startswith(f"recipes/{recipe}: error: "), proc.stderr


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_neither_torch_distributed_nor_deepspeed(flag):
    """What the console script runs, in a fresh interpreter: sys.modules afterwards, not a timing."""
    code = ("import sys\nfrom ds_twolevel.tools.cli import main\ntry:\n    main([%r])\nfinally:\n"
            "    print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'transformers', "
            "'accelerate')))" % flag)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:]


def test_a_sub_commands_help_imports_only_its_own_module():
    code = ("import sys\nfrom ds_twolevel.tools.cli import main\ntry:\n    main(['plan', '--help'])\nfinally:\n"
            "    print('ds_twolevel.tools.demo' in sys.modules, 'ds_twolevel.tools.bench' in sys.modules, "
            "'deepspeed' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.stdout.strip().splitlines()[-1] == "False False False", proc.stdout[-500:]
