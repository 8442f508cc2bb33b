"""docs/flags.md, generated from the code: `python -m bert_dist.docs > docs/flags.md`.

The run's flags come from the config dataclasses (bert_dist/config.py: one table per nested dataclass, each
field's `help` metadata and default, as `build_parser` makes them); the commands on a finished run from their
parsers (bert_dist/cli.py `TOOLS`). tests/test_docs.py keeps docs/flags.md equal to what this prints.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, get_type_hints

from bert_dist.config import RunConfig, _leaf_fields

REGENERATE = "python -m bert_dist.docs > docs/flags.md"
VALUES = {int: "integer", float: "number", str: "text", bool: "on/off"}
"""What a flag takes, by the field's type (`X | None` as X)."""


def _cell(text: Any) -> str:
    """Table-cell text: a `|` would end the cell, and `<task>` would read as an HTML tag."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _value(typ: Any) -> str:
    return next((name for t, name in VALUES.items() if typ in (t, t | None)), "text")


def _default(value: Any) -> str:
    """A default as the command line says it: on/off for a switch, nothing when unset."""
    return "" if value is None else ("on" if value else "off") if isinstance(value, bool) else f"`{value}`"


def _intro(cls: type) -> str:
    """A dataclass's docstring (dataclasses without one get a generated signature: no intro then)."""
    doc = (cls.__doc__ or "").strip()
    return "" if doc.startswith(f"{cls.__name__}(") else _cell(" ".join(doc.split()))


def flags_markdown(config: type = RunConfig) -> list[str]:
    """One section per group of the run's flags: the config's own fields first ("run"), then each nested dataclass
    in field order; rows: flag, what it takes, default, help."""
    defaults, hints = config(), get_type_hints(config)
    groups: dict[str | None, list[str]] = {}
    for group, f, typ in _leaf_fields(config):
        default = getattr(getattr(defaults, group) if group else defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = _cell(f.metadata.get("help", ""))
        groups.setdefault(group, []).append(f"| `{flag}` | {_value(typ)} | {_default(default)} | {help_text} |")
    lines = []
    for group, rows in groups.items():
        cls = hints[group] if group else config
        lines += [f"## {group or 'run'} (`{cls.__name__}`)", ""]
        if _intro(cls):
            lines += [_intro(cls), ""]
        lines += ["| flag | takes | default | what |", "|---|---|---|---|", *rows, ""]
    return lines


def parser_markdown(name: str, parser: argparse.ArgumentParser) -> list[str]:
    """A command's section: its description and one row per argument (positionals first, as argparse lists them)."""
    lines = [f"### `bert-dist {name}`", ""]
    if parser.description:
        lines += [" ".join(parser.description.split()), ""]
    lines += ["| argument | takes | default | what |", "|---|---|---|---|"]
    for action in parser._actions:  # argparse has no public list of a parser's arguments
        if isinstance(action, argparse._HelpAction):
            continue
        arg = " / ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest.upper()}`"
        takes = ("on/off" if action.nargs == 0 else "one of " + ", ".join(f"`{c}`" for c in action.choices)
                 if action.choices else _value(action.type or str))
        if isinstance(action, argparse._AppendAction):
            takes += ", repeatable"
        default = ("required" if action.required and action.option_strings else
                   "" if not action.option_strings else _default(action.default))
        lines.append(f"| {arg} | {takes} | {default} | {_cell(action.help or '')} |")
    return [*lines, ""]


def render() -> str:
    """The whole of docs/flags.md."""
    from bert_dist.cli import SUBCOMMANDS, TOOLS

    words = [f"`bert-dist {word}` (`--task {task}`)" for word, task in SUBCOMMANDS.items() if task]
    lines = ["# Flags", "",
             f"Generated from the code (`{REGENERATE}`); edit the config dataclasses or the parsers, not this file.",
             "",
             "A run takes the same flags however it is started: `python bert_dist/run.py`, `accelerate launch "
             "bert_dist/run.py`, `bert-dist [train]`, and " + ", ".join(words) + ". Each flag is a field of a "
             "config dataclass in `bert_dist/config.py`, and `bert-dist --help` prints the same list; an on/off flag "
             "also takes a `--no-` form (`--no-smoke`). A flag without a default is "
             "unset unless given (the text says what the run does then). `bert-dist prepare` takes a pretraining "
             "run's flags and prepares its corpus ahead of the run (it prints where).", "",
             *flags_markdown(),
             "## Commands on a finished run", ""]
    for name, (parser, _) in TOOLS.items():
        lines += parser_markdown(name, parser())
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
