"""The options of a solver or a cache, declared once: the command-line flags and the mode grammar are made from
them (`ldm.models.diffusion.modes`, `ldm.cli`). A value is read from text by the option's `parse`, which raises
`argparse.ArgumentTypeError` with a one-line message, as argparse expects of a flag's type."""
import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Option:
    """One option.

    Args:
        name: the constructor's keyword, and the option's name in a mode string (`...,name=value`).
        parse: text -> value.
        default: the flag's default (None: not given, the constructor's own default applies).
        help: the flag's help.
        flag: the command line's name for it where that is not `--name` (a published spelling).
        choices: the values it takes, if a few.
        format: value -> text, the inverse of parse (for mode strings).
        owner_reason: why only its own caches or solvers take it, said when another is given it.
    """
    name: str
    parse: Callable[[str], Any]
    default: Any = None
    help: str = ""
    flag: str = None
    choices: tuple = None
    format: Callable[[Any], str] = None
    owner_reason: str = ""

    @property
    def dest(self):
        """The attribute of parsed command-line arguments that holds it."""
        return self.flag or self.name

    def text(self, value):
        """The value as a mode string writes it."""
        if self.format is not None:
            return self.format(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value))
        if isinstance(value, float):
            return repr(value)
        return str(value)

    def read(self, text):
        """A value from text, checked against choices; a one-line ValueError otherwise."""
        if self.choices is not None and text not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, not {text!r}")
        try:
            return self.parse(text)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ValueError(f"{self.name}: {e}") from None


def boolean(value):
    """Booleans as the published flags spell them: yes/true/t/y/1 or no/false/f/n/0."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, not {value!r}")


def whole_number(value):
    """An integer."""
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {value!r}") from None


def number(value):
    """A float."""
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {value!r}") from None


def fits_float32(value):
    """Whether a number is finite in float32, the precision the samplers compute in (at most about 3.4e38)."""
    return math.isfinite(value) and abs(value) <= torch.finfo(torch.float32).max


def non_negative_float(value):
    """A number of at least 0 that float32 can hold."""
    try:
        parsed = float(value)
    except ValueError:
        parsed = math.nan
    if not fits_float32(parsed) or parsed < 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0 that float32 can hold, not {value!r}")
    return parsed


def step_list(value):
    """'0,3,8' -> [0, 3, 8]; '@file.json' and 'auto:K' stay strings (calibrated steps, see ldm.calibration)."""
    if value.startswith("@") or value.startswith("auto:"):
        return value
    try:
        return [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected loop indices such as 0,3,8 (or @FILE.json, auto:K), "
                                         f"not {value!r}") from None


class OptionError(ValueError):
    """A value of one option that cannot work; `option` names it, so that a front end can name its flag."""

    def __init__(self, option, message):
        super().__init__(message)
        self.option = option
