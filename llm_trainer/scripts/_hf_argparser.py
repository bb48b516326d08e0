"""Dataclass-backed argument parsing at TRL's path (`trl.scripts._hf_argparser`).

TRL 1.16 ships its own copy of `transformers.HfArgumentParser` whose one behavioural change is that an optional
(`X | None`) field that is not a string also takes `none` / `null` on the command line. Here that change is a small
subclass of transformers' parser, and the helpers are transformers' own.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, Union

import transformers
from transformers.hf_argparser import DataClass, DataClassType, HfArg, make_choice_type_function, string_to_bool

__all__ = [
    "DataClass",
    "DataClassType",
    "HfArg",
    "HfArgumentParser",
    "make_choice_type_function",
    "string_to_bool",
]


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """`convert`, except that 'none' / 'null' (any case) parse to None."""

    def parse(value: str) -> Any:
        return None if value.lower() in ("none", "null") else convert(value)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error messages
    return parse


class HfArgumentParser(transformers.HfArgumentParser):
    """`transformers.HfArgumentParser` where a non-string `X | None` field also accepts `none` / `null`.

    So `--max_length none` sets `max_length=None`, as TRL's parser allows; `--report_to none` stays the string.
    """

    @staticmethod
    def _parse_dataclass_field(parser: Any, field: dataclasses.Field) -> None:
        union = getattr(field.type, "__origin__", None) is Union or isinstance(field.type, types.UnionType)
        optional = union and type(None) in field.type.__args__ and bool not in field.type.__args__
        first = len(parser._actions)
        transformers.HfArgumentParser._parse_dataclass_field(parser, field)  # narrows `field.type` to the type parsed
        action = parser._actions[first]
        # Plain `X | None` fields only: strings keep "none" as a value (`report_to none`), and choices, booleans and
        # lists have converters of their own
        if optional and field.type is not str and action.type is field.type:
            action.type = _none_or(action.type)
