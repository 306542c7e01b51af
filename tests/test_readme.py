"""The README's and the guide's commands, run as written, in order, from a fresh copy of the repository.

Which commands (the rule the README's "Tests" section states, for whoever adds one):

- in the README, a *section* is a heading whose text begins with one of :data:`SECTIONS`, with all
  its sub-sections (up to the next heading of the same or a higher level); headings inside fenced
  blocks are not headings; every guide page under ``docs/`` is selected whole (:func:`guide_pages`,
  in file-name order, after the README);
- every fenced block opened with ```` ```bash ```` in a selected part is run; each line is one
  command (a trailing backslash continues it; blank lines and ``#`` lines are skipped); a command
  whose text equals an earlier one's is run once;
- a block right after the line ``<!-- readme-test: skip (reason) -->`` is not run (GPU-only,
  multi-node, a benchmark of many minutes). Other fences (``python``, plain) are not commands.

How they run: each command in its own ``bash -c`` from the root of one fresh copy, one after the
other (later commands see what earlier ones wrote: training's ``recipes/out/dense`` before
inference). "Fresh" is the working tree's tracked and unignored files (``git ls-files -co
--exclude-standard``): no ``recipes/out/``, caches or build outputs of earlier runs. Small sizes:
``DS_TWOLEVEL_STEPS=2`` (the default of ``recipes/train.py --steps``). The environment is the
test's, less ``DS_ACCELERATOR`` and ``OMP_NUM_THREADS`` (a command that needs them says so, as a
user's shell would not have them), with ``PYTHONPATH`` pointing at the copy.

``bash install.sh`` runs for real, into a throwaway virtual environment layered on the current
one (``python -m venv --system-site-packages``, first on ``PATH``): pip finds torch and DeepSpeed
installed and skips them, installs the package from the copy into the throwaway environment only
(the shared environment's own install is untouched), and ``ds-twolevel prebuild`` checks the comm
op in this environment's extensions directory (``TORCH_EXTENSIONS_DIR`` is kept, so nothing is
compiled twice). An empty environment is what CI's run of ``.ci/run`` covers.

A command passes when it exits 0 and its output has no traceback and none of the warnings every
DeepSpeed launch used to print.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ds_twolevel.deepspeed.env import extensions_dir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTIONS = ("Set-up", "Quickstart")
DOCS = ROOT / "docs"
SKIP_MARK = re.compile(r"^\s*<!--\s*readme-test:\s*skip\b.*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,})\s*(\S*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
NOISE = ("Traceback (most recent call last)", "FutureWarning", "Attempting to get learning rate from scheduler",
         "built successfully", "/usr/bin/ld: cannot find", "collect2", "attribute already exists",
         "Gradient accumulation steps mismatch")
"""output no README command (and no cell of the notebook, tests/test_hf_recipes.py) may print: a traceback,
a linker error of DeepSpeed's op probes, a duplicate build line, a warning the integration causes."""
TIMEOUT_S = 1800  # one command; an 8-rank launch on 2 loaded cores takes minutes


@dataclass(frozen=True)
class Command:
    """One README or guide command: where it is and what it says."""

    source: str
    """the file, e.g. "README.md" or "docs/deepspeed.md"."""
    section: str
    """the heading path, e.g. "DeepSpeed integration > Inference"."""
    line: int
    """line (1-based) of ``source`` where the command starts."""
    text: str

    @property
    def label(self) -> str:
        return f"{self.source}:{self.line} {self.section}: {self.text[:60]}"


def _selected(stack: list[tuple[int, str]]) -> bool:
    return any(title.startswith(SECTIONS) for _, title in stack)


def _split_commands(body: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line, command) of a bash block: continuation lines joined, blank and comment lines dropped."""
    commands, pending, first = [], "", 0
    for number, raw in body:
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        first = first if pending else number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        commands.append((first, pending + line))
        pending = ""
    assert not pending, f"README line {first}: a command ends with a line continuation"
    return commands


def readme_commands(text: str, source: str = "README.md", whole: bool = False) -> list[Command]:
    """Every command the rule above selects, in file order (``whole``: every section, as for a guide page)."""
    lines, found, stack, i = text.splitlines(), [], [], 0
    while i < len(lines):
        fence, heading = FENCE.match(lines[i]), HEADING.match(lines[i])
        if heading and not fence:
            level = len(heading.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, heading.group(2).strip("` ")))
            i += 1
            continue
        if not fence:
            i += 1
            continue
        marker, start = fence.group(2), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(marker)), len(lines))
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        if fence.group(3) == "bash" and (whole or _selected(stack)) and not SKIP_MARK.match(before):
            section = " > ".join(title for level, title in stack if level > 1)
            body = [(j + 1, lines[j]) for j in range(start + 1, end)]
            found += [Command(source, section, number, cmd) for number, cmd in _split_commands(body)]
        i = end + 1
    return found


def guide_pages() -> list[Path]:
    """Every markdown page of the guide, in file-name order."""
    return sorted(DOCS.rglob("*.md"))


def all_commands() -> list[Command]:
    """The README's selected commands, then every guide page's, each distinct text once."""
    found = readme_commands(README.read_text(encoding="utf-8"))
    for page in guide_pages():
        found += readme_commands(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)), whole=True)
    seen: set[str] = set()
    return [c for c in found if not (c.text in seen or seen.add(c.text))]


COMMANDS = all_commands()


# -- the extraction itself ---------------------------------------------------------------------------
def test_extraction_rule_on_a_sample():
    sample = "\n".join([
        "## Set-up and main job", "```bash", "bash install.sh && ds-twolevel demo", "```",
        "<!-- readme-test: skip (needs GPUs) -->", "```bash", "gpu-only", "```",
        "### Sub-section", "```bash", "# a comment", "", "A=1 first \\", "    --flag   # trailing", "second", "```",
        "```python", "not_a_command()", "```",
        "## Other section", "```bash", "not selected", "```",
        "## Quickstart", "```", "# not a heading inside a fence", "```", "```bash", "infer", "```",
    ])
    got = [(c.section, c.text) for c in readme_commands(sample)]
    assert got == [("Set-up and main job", "bash install.sh && ds-twolevel demo"),
                   ("Set-up and main job > Sub-section", "A=1 first --flag   # trailing"),
                   ("Set-up and main job > Sub-section", "second"),
                   ("Quickstart", "infer")]


def test_every_section_has_commands_and_the_known_ones_are_found():
    """A renamed heading or a lost fence must not silently drop commands."""
    for name in SECTIONS:
        assert any(c.section.startswith(name) or f"> {name}" in c.section for c in COMMANDS), name
    texts = [c.text for c in COMMANDS]
    assert texts[0] == "bash install.sh && ds-twolevel demo"
    assert any("recipes/quickstart_hf.py" in t and t.startswith("OMP_NUM_THREADS=1 torchrun") for t in texts)
    assert any("recipes/train_hf_trainer.py" in t for t in texts)
    assert any("recipes/train.py" in t and "--export" in t and t.startswith("DS_ACCELERATOR=cpu") for t in texts)
    assert any("recipes/infer_deepspeed.py" in t and "--model recipes/out/dense" in t for t in texts)
    assert not any("hostfile" in t or "--index-url" in t for t in texts), "GPU/multi-node commands are marked skip"


def test_guide_pages_are_read_whole():
    sample = "\n".join(["# Page", "```bash", "a", "```", "## Any heading", "```bash", "b", "a", "```"])
    got = [(c.source, c.section, c.text) for c in readme_commands(sample, "docs/x.md", whole=True)]
    assert got == [("docs/x.md", "", "a"), ("docs/x.md", "Any heading", "b"), ("docs/x.md", "Any heading", "a")]
    assert [p.name for p in guide_pages()] == sorted(p.name for p in guide_pages()) and guide_pages()
    assert len({c.text for c in COMMANDS}) == len(COMMANDS), "a repeated command runs once"


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith(("#", "set ", "cd ", "export "))]


def _tests_command() -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^## Tests[^\n]*\n+```bash\n(.*?)\n```", text, re.M | re.S)
    assert block, 'README: the "## Tests" section opens with a ```bash block holding the test command'
    return block.group(1).strip()


def test_ci_runs_exactly_the_two_readme_commands():
    assert _ci_commands() == [COMMANDS[0].text, _tests_command()]
    assert "install.sh --test" in _tests_command() and "pytest" in _tests_command()


def test_install_sh_keeps_the_test_extras_out_of_the_user_install():
    script = (ROOT / "install.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "install.sh")]).returncode == 0
    assert 'extras=""' in script and 'extras="[test,docs]"' in script and '-e ".${extras}"' in script
    proc = subprocess.run(["bash", str(ROOT / "install.sh"), "--tests"], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--test" in proc.stderr


# -- running them ------------------------------------------------------------------------------------
class Runner:
    """Runs the README's commands in order in one fresh copy; each result is kept."""

    def __init__(self, base: Path) -> None:
        self.copy, self.venv = base / "repo", base / "venv"
        self.results: dict[int, tuple[int, str, float]] = {}
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
        for name in filter(None, files):
            src, dst = ROOT / name, self.copy / name
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
                dst.chmod(src.stat().st_mode)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(self.venv)], check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "VIRTUAL_ENV")}
        env.update(PYTHONPATH=str(self.copy), PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                   DS_TWOLEVEL_STEPS="2", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or str(extensions_dir()))
        self.env = env

    def run_through(self, index: int) -> tuple[int, str, float]:
        for k in range(index + 1):
            if k not in self.results:
                t0 = time.time()
                proc = subprocess.run(["bash", "-o", "pipefail", "-c", COMMANDS[k].text], cwd=self.copy, env=self.env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
                self.results[k] = (proc.returncode, proc.stdout, time.time() - t0)
                print(f"\n{COMMANDS[k].source}:{COMMANDS[k].line} ({time.time() - t0:.0f} s, exit {proc.returncode}): "
                      f"{shlex.join(['bash', '-c', COMMANDS[k].text])[:150]}")
        return self.results[index]


def _export_matches_the_trained_model(out: Path) -> None:
    """The export loads with plain from_pretrained and gives the partitioned model's logits."""
    import json

    import torch
    from transformers import LlamaForCausalLM

    probe = torch.load(out / "probe.pt")
    with torch.no_grad():
        logits = LlamaForCausalLM.from_pretrained(out / "dense").eval()(input_ids=probe["input_ids"]).logits
    assert float((logits - probe["logits"]).abs().max() / probe["logits"].abs().max()) <= 1e-5
    assert json.loads((out / "metrics.json").read_text())["lrs"][0] > 0


def _generated_like_dense(output: str, dense_dir: Path, command: str) -> None:
    """What the README's inference command printed is the dense model's greedy continuation."""
    import ast

    import torch
    from transformers import LlamaForCausalLM

    printed = re.search(r"^generated \(.*?\): (.*)$", output, re.M)
    assert printed, output[-3000:]
    words = shlex.split(command)
    prompt = words[words.index("--prompt") + 1]
    new_tokens = int(words[words.index("--max_new_tokens") + 1]) if "--max_new_tokens" in words else 32
    ids = torch.tensor([list(prompt.encode("utf-8"))])
    with torch.no_grad():
        dense = LlamaForCausalLM.from_pretrained(dense_dir).eval().generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    assert ast.literal_eval(printed.group(1)) == bytes(dense[0].tolist()).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("readme"))


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[c.label for c in COMMANDS])
def test_readme_command(runner: Runner, index: int):
    code, output, _ = runner.run_through(index)
    cmd = COMMANDS[index]
    assert code == 0, f"{cmd.source} line {cmd.line} exited {code}:\n{cmd.text}\n...{output[-6000:]}"
    noise = [n for n in NOISE if n in output]
    assert not noise, f"{cmd.source} line {cmd.line} printed {noise}:\n{output[-6000:]}"
    if "recipes/train.py" in cmd.text:  # --steps counts from step 1, resumed runs included; default 2 (above)
        steps = re.search(r"--steps (\d+)", cmd.text)
        assert f"done: {steps.group(1) if steps else 2} steps" in output, output[-3000:]
        assert ("--resume" not in cmd.text) or "resumed from step " in output, output[-3000:]
    if ("recipes/generate.py" in cmd.text and "--model" not in cmd.text) or "recipes/quickstart_hf.py" in cmd.text:
        assert "identical to the unpatched model: True" in output, output[-3000:]
    if "recipes/train.py" in cmd.text and "--export" in cmd.text:
        _export_matches_the_trained_model(runner.copy / "recipes" / "out")
    if "recipes/infer_deepspeed.py" in cmd.text:
        _generated_like_dense(output, runner.copy / "recipes" / "out" / "dense", cmd.text)
    if cmd.text.endswith("ds-twolevel demo"):
        assert output.rstrip().endswith("(OK)") and "ds-twolevel prebuild:" in output, output[-3000:]
