"""The command line that redoes a run, built from the argparse parser's own flag definitions.

Walking the parser (instead of a hand-written list of flags) means a flag added later is recorded without
further code, in a form the parser accepts: ``--no-x`` for ``BooleanOptionalAction``, nothing for a
``store_true`` flag left off, one token per list item.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Collection, Mapping, Sequence
from typing import Any


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)  # repr: the shortest text that parses back exact


def _tokens(action: argparse.Action, value: Any) -> list[str]:
    """The tokens that make ``parser.parse_args`` set ``action.dest`` to ``value``."""
    option = list(action.option_strings[:1])
    if isinstance(action, argparse.BooleanOptionalAction) and isinstance(value, bool):
        return [action.option_strings[0] if value else action.option_strings[1]]
    if isinstance(action, argparse._StoreConstAction) and value == action.const:  # store_true / store_false too
        return option
    if isinstance(action, argparse._CountAction) and isinstance(value, int):
        return option * value
    if isinstance(action, argparse._AppendAction) and isinstance(value, list):
        return [token for item in value for token in (*option, _text(item))]
    if type(action) is argparse._StoreAction:
        if action.nargs == "?" and value == action.const:
            return option
        if action.nargs in (None, "?"):
            return [*option, _text(value)]
        return [*option, *map(_text, value)]
    raise RuntimeError(f"cannot write {action.dest}={value!r} as a command-line flag ({type(action).__name__})")


def command_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, *, program: Sequence[str],
                      skip: Collection[str] = (), replace: Mapping[str, Any] | None = None) -> str:
    """The shell command that parses to ``args``: every flag whose value differs from its default.

    Args:
        parser: the script's parser.
        args: the namespace it returned.
        program: the leading words, e.g. ``("python", "merge_checkpoints.py")``.
        skip: destinations left out (flags about the output folder's handling or logging, not the result).
        replace: destinations whose value is written differently, e.g. ``{"output_dir": "OUT"}``.
    Returns:
        The command, quoted with ``shlex.join``.
    Raises:
        RuntimeError: the command would not parse back to the same values (a flag type this walker cannot write).
    """
    values = {**vars(args), **(replace or {})}
    argv: list[str] = []
    for action in parser._actions:
        if action.dest in skip or action.default == argparse.SUPPRESS or action.dest not in values:
            continue  # --help and friends
        value = values[action.dest]
        if value == action.default and not action.required:
            continue
        argv += _tokens(action, value)
    _check_round_trip(parser, argv, values, skip)
    return shlex.join([*program, *argv])


def _check_round_trip(parser: argparse.ArgumentParser, argv: list[str], values: Mapping[str, Any],
                      skip: Collection[str]) -> None:
    try:
        parsed = vars(parser.parse_args(argv))
    except SystemExit as error:
        raise RuntimeError(f"the recorded command does not parse: {shlex.join(argv)}") from error
    differing = sorted(k for k, v in parsed.items() if k not in skip and k in values and v != values[k])
    if differing:
        raise RuntimeError(f"the recorded command parses to other values for {differing}: {shlex.join(argv)}")
