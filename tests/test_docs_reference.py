"""docs/reference_config.md and docs/reference_cli.md hold what the code generates (pure: no ranks)."""
from __future__ import annotations

import pytest

from ds_twolevel.tools import reference


@pytest.mark.parametrize("page", reference.PAGES)
def test_generated_blocks_match_the_code(page):
    text = (reference.DOCS / page).read_text()
    names = [m.group("name") for m in reference.BLOCK.finditer(text)]
    assert names and set(names) <= set(reference.GENERATORS), names
    assert reference.render(text) == text, f"docs/{page} is stale: run python -m ds_twolevel.tools.reference"


def test_every_two_level_key_is_in_the_config_reference():
    from ds_twolevel.deepspeed.config import keys

    text = (reference.DOCS / "reference_config.md").read_text()
    for key in keys():
        assert f"| `{key.path.split('.', 1)[1]}` |" in text, key.path


def test_every_sub_command_and_flag_is_in_the_cli_reference():
    from ds_twolevel.tools.cli import SUBCOMMANDS, build_parser

    text = (reference.DOCS / "reference_cli.md").read_text()
    for name in SUBCOMMANDS:
        assert f"### `ds-twolevel {name} --help`" in text, name
        sub = next(a for a in build_parser([name])._actions if a.dest == "command").choices[name]
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)


def test_a_stale_block_is_found():
    stale = "<!-- generated: two-level-keys -->\n| old |\n<!-- end generated -->"
    assert reference.render(stale) != stale
