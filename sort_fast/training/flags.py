"""Command-line flags generated from dataclasses (docs/training.md, "Configuration").

A field declared with :func:`option` carries what its flag needs: the parser of its value
(``type``), ``choices``, help text, and marks saying whether it changes the training trajectory,
whether it controls only this invocation, and whether the evaluator has it too.
:func:`add_flags` turns a dataclass of such fields into ``argparse`` flags (``--field-name``,
the field's name with dashes); :func:`checked_value` applies the same checks to a value read
from a configuration file.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

__all__ = ["option", "Mark", "mark", "flag_fields", "flag_name", "add_flags", "checked_value"]


@dataclasses.dataclass(frozen=True)
class Mark:
    """What a flag is, beside its value.

    ``trajectory``: changing it changes the trained weights (``--resume`` must keep it);
    ``control``: about this invocation only, never taken from a checkpoint; ``evaluate``: the
    evaluator has the flag too, with ``evaluate_help`` as its help when that is set, and when
    ``from_checkpoint`` a default of ``None`` (the checkpoint's value). ``flag``: the spelling
    when it is not ``--field-name`` (an on-by-default switch: ``--no-plots``); ``aliases``:
    other spellings; ``deprecated``: old spellings of an on/off flag, which still work with a
    warning; ``group``: the mutually exclusive group the flag belongs to."""

    help: str
    parse: Optional[Callable[[str], Any]] = None
    choices: Optional[Sequence[str]] = None
    trajectory: bool = False
    control: bool = False
    evaluate: bool = False
    evaluate_help: Optional[str] = None
    from_checkpoint: bool = False
    flag: Optional[str] = None
    aliases: Sequence[str] = ()
    deprecated: Sequence[str] = ()
    group: Optional[str] = None
    metavar: Optional[str] = None
    positional: bool = False


def option(default: Any, help: str, **marks: Any) -> Any:
    """A dataclass field with ``default`` whose flag is described by ``help`` and ``marks``
    (the keywords of :class:`Mark`)."""
    return dataclasses.field(default=default, metadata={"flag": Mark(help=help, **marks)})


def mark(field: dataclasses.Field) -> Mark:
    """The :class:`Mark` of a field made by :func:`option`."""
    return field.metadata["flag"]


def flag_fields(cls_or_instance: Any) -> Iterator[dataclasses.Field]:
    """The fields of a dataclass that :func:`option` made."""
    return (f for f in dataclasses.fields(cls_or_instance) if "flag" in f.metadata)


def flag_name(field: dataclasses.Field) -> str:
    """The flag's main spelling (``--batch-groups``)."""
    return mark(field).flag or "--" + field.name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type, *, evaluator: bool = False,
              groups: Optional[Dict[str, Any]] = None) -> None:
    """Adds a flag for each field of the dataclass ``cls`` to ``parser`` (an argument group
    or a parser); with ``evaluator`` only the fields marked ``evaluate``, with the
    evaluator's help and defaults. ``groups`` collects the mutually exclusive groups by name
    (shared between calls on one parser)."""
    groups = {} if groups is None else groups
    for field in flag_fields(cls):
        m = mark(field)
        if evaluator and not m.evaluate:
            continue
        target = parser
        if m.group is not None:
            if m.group not in groups:
                groups[m.group] = parser.add_mutually_exclusive_group()
            target = groups[m.group]
        help_text = (m.evaluate_help or m.help) if evaluator else m.help
        default = None if evaluator and m.from_checkpoint else field.default
        if m.positional:
            target.add_argument(field.name, type=m.parse, help=help_text)
        elif isinstance(field.default, bool):
            target.add_argument(flag_name(field), *m.aliases, dest=field.name,
                                action="store_false" if field.default else "store_true",
                                help=help_text)
        else:
            target.add_argument(flag_name(field), *m.aliases, dest=field.name, type=m.parse,
                                choices=m.choices, default=default, metavar=m.metavar,
                                help=help_text)


def checked_value(field: dataclasses.Field, value: Any) -> Any:
    """``value`` for ``field`` from a configuration file, after the checks its flag makes
    (``ValueError`` with the flag's message when it fails them)."""
    m = mark(field)
    if isinstance(field.default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if value is None:
        if field.default is not None:
            raise ValueError("expected a value, got null")
        return None
    if isinstance(value, (bool, dict, list)):
        raise ValueError(f"expected a single value, got {value!r}")
    text = str(value)
    try:
        parsed = m.parse(text) if m.parse is not None else text
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise ValueError(str(e) or f"invalid value {value!r}") from None
    if m.choices is not None and parsed not in m.choices:
        raise ValueError(f"invalid choice {value!r} (choose from "
                         f"{', '.join(map(str, m.choices))})")
    return parsed
