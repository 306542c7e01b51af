"""The README and the guide as documents: size, no words about how the project was made, snippets that
are the shipped files, and a navigation that lists every page (the strict build itself runs in CI's
``mkdocs build --strict``; the commands run in ``tests/test_readme.py``)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PRODUCT = ("ds_twolevel", "hf_integration", "recipes", "tests", "docs")
"""where the words below must not appear (with the README and mkdocs.yml)."""
TEXT_SUFFIXES = (".py", ".md", ".yml", ".yaml", ".ipynb", ".toml")
"""prose and code; data (recipes/data/*.txt: Shakespeare has "sessions of sweet silent thought") is not."""
PROCESS_WORDS = re.compile("|".join([
    r"\bissue\s*#?\s*\d+",        # issue numbers: "issue 14", "Issue #3"
    r"\(issue\b",                 # "(issue 11)", "(issue: ...)"
    r"\bsessions?\b",             # the working periods that made the project
    r"\bthe\s+runs?\s+before\b",  # history of earlier measurements
    r"\bnot\s+re-measured\b",
    r"\bturn\s+2\b",
]), re.IGNORECASE)


def product_files() -> list[Path]:
    """The README, mkdocs.yml and every text file of the product's folders (this test file excepted)."""
    files = [README, ROOT / "mkdocs.yml"]
    for folder in PRODUCT:
        files += [p for p in sorted((ROOT / folder).rglob("*")) if p.is_file() and p.suffix in TEXT_SUFFIXES
                  and "out" not in p.relative_to(ROOT).parts and p != Path(__file__).resolve()]
    return [p for p in files if p.exists()]


def process_words(text: str) -> list[tuple[int, str]]:
    """(line, words) of every match of :data:`PROCESS_WORDS` in ``text``."""
    return [(i, m.group(0)) for i, line in enumerate(text.splitlines(), 1) for m in PROCESS_WORDS.finditer(line)]


def test_the_pattern_finds_what_it_must_and_spares_code():
    bad = ("heading (issue 14)", "as in issue 11", "this session added", "the runs before gave", "not re-measured",
           "the run before it", "(turn 2)", "Issue #7")
    assert all(process_words(s) for s in bad), [s for s in bad if not process_words(s)]
    fine = ("return 2", "an issue with the cache", "tissue 3", "the step before", "re-measure it with bench")
    assert not any(process_words(s) for s in fine), [s for s in fine if process_words(s)]


def test_no_words_about_the_making_in_the_product():
    found = [f"{p.relative_to(ROOT)}:{line}: {word!r}" for p in product_files()
             for line, word in process_words(p.read_text(encoding="utf-8", errors="replace"))]
    assert not found, "words about how the project was made, not what it does:\n" + "\n".join(found)


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 320, f"README.md has {len(lines)} lines (at most 320: the rest belongs in docs/)"
    long = [f"line {i}: {len(line)} characters" for i, line in enumerate(lines, 1) if len(line) > 200]
    assert not long, "README.md lines over 200 characters: " + "; ".join(long)


def test_readme_quickstart_script_is_the_shipped_file():
    """The README shows recipes/quickstart_hf.py whole; the two cannot drift apart."""
    text = README.read_text(encoding="utf-8")
    shown = re.search(r"```python\n(\"\"\"Load a save_pretrained directory.*?)```", text, re.S)
    assert shown, "README: the Hugging Face quickstart's python block is missing"
    assert shown.group(1) == (ROOT / "recipes" / "quickstart_hf.py").read_text(encoding="utf-8")


def _nav_pages() -> list[str]:
    """Every page file named in mkdocs.yml's nav."""
    return re.findall(r"^\s*- [^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M)


def test_nav_lists_every_page_and_every_page_exists():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^strict: true$", config, re.M), "mkdocs.yml: the build must be strict"
    nav = _nav_pages()
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == pages, f"only in nav: {set(nav) - set(pages)}; not in nav: {set(pages) - set(nav)}"


@pytest.mark.parametrize("target", sorted(set(re.findall(r"\]\((docs/[^)#]+)", README.read_text(encoding="utf-8")))))
def test_readme_links_into_the_guide_exist(target):
    assert (ROOT / target).is_file(), target
