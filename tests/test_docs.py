"""docs/flags.md is generated from the code (bert_dist/docs.py) and kept equal to it."""

from __future__ import annotations

import dataclasses
import re

from conftest import REPO

from bert_dist.cli import TOOLS
from bert_dist.config import RunConfig, _f, build_parser
from bert_dist.docs import REGENERATE, flags_markdown, render


def test_flags_doc_is_what_the_code_generates():
    committed = (REPO / "docs" / "flags.md").read_text()
    assert committed == render(), f"docs/flags.md is out of date with the flags: regenerate it with `{REGENERATE}`"


def flags(text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", text))


def test_flags_doc_lists_every_flag_of_every_parser():
    page = render()
    for name, parser in {"": build_parser, **{name: parser for name, (parser, _) in TOOLS.items()}}.items():
        assert not name or f"### `bert-dist {name}`" in page
        options = {f for a in parser()._actions for f in a.option_strings if f.startswith("--") and f != "--help"}
        assert {f for f in options if not f.startswith("--no-")} <= flags(page), name or "run"
        assert name or len(options) > 40
    assert "| `--lr` | number | `2e-05` | peak learning rate |" in page
    assert "| `--group-by-length` | on/off | off |" in page and "| `RUN_DIR` | text |" in page


@dataclasses.dataclass
class KernelConfig:
    """Device-specific fast paths."""

    cpu_kernels: str = _f("auto", "CPU fast paths: auto | off")


@dataclasses.dataclass
class Undocumented:
    threads: int | None = None


@dataclasses.dataclass
class BiggerConfig(RunConfig):
    """A run config with a group and a field more, as a new flag would bring."""

    kernels: KernelConfig = dataclasses.field(default_factory=KernelConfig)
    other: Undocumented = dataclasses.field(default_factory=Undocumented)
    name: str = _f("x", "a run's name")


def test_a_new_group_or_field_gets_its_rows():
    page = "\n".join(flags_markdown(BiggerConfig))
    assert "## kernels (`KernelConfig`)\n\nDevice-specific fast paths.\n" in page
    assert "| `--cpu-kernels` | text | `auto` | CPU fast paths: auto \\| off |" in page
    assert "## other (`Undocumented`)\n\n| flag |" in page and "| `--threads` | integer |  |  |" in page
    assert page.index("`--name`") < page.index("## data")  # a run-level field: in the first section
