"""Typed option parsing for reward kinds: YAML mapping → validated dataclass.

Each kind declares a frozen dataclass of its options. ``parse_options`` rejects unknown
keys, checks each value against the field's annotation and raises ``RewardConfigError``
naming the reward, the key and what was expected; the dataclass' ``__post_init__`` then
checks values (ranges, required keys) the same way via ``OptionError``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from dancegrpo_rewards.base import RewardConfigError

T = TypeVar("T")

#: ``dtype`` option values and what they mean.
DTYPE_NAMES = ("fp32", "bf16", "fp16")


class OptionError(RewardConfigError):
    """One option is wrong: carries the key so the caller can prefix the reward name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"option {key!r}: {message}")
        self.key = key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Returns ``value`` (ints widened to float where a float is expected) or raises."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_type(key, value, arg)
            except OptionError as err:
                errors.append(str(err))
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise OptionError(key, f"expected {names}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is Any:
        return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (dict, Mapping) or tp in (dict, Mapping):
        if isinstance(value, Mapping):
            return dict(value)
    else:  # pragma: no cover - programming error in an options dataclass
        raise TypeError(f"unsupported option type {tp!r} for {key!r}")
    raise OptionError(key, f"expected {_type_name(tp)}, got {value!r}")


def parse_options(cls: type[T], options: Mapping[str, Any], *, reward_name: str) -> T:
    """Builds the options dataclass ``cls`` from a YAML mapping.

    Raises:
        RewardConfigError: an unknown key, a value of the wrong type or a value that the
            dataclass' ``__post_init__`` rejects; the message starts with the reward name
            and names the key.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise RewardConfigError(
            f"reward {reward_name!r}: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"known options: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    try:
        for key, value in options.items():
            kwargs[key] = _check_type(key, value, hints[key])
        return cls(**kwargs)
    except OptionError as err:
        raise RewardConfigError(f"reward {reward_name!r}: {err}") from None


def resolve_path(key: str, value: str) -> Path:
    """Expands ``~`` and ``$VARS`` (e.g. ``${DANCEGRPO_WEIGHTS}``) in a path option."""
    expanded = os.path.expanduser(os.path.expandvars(value))
    if "$" in expanded:
        raise OptionError(key, f"unset environment variable in path {value!r}")
    return Path(expanded)


def option_path(reward_name: str, key: str, value: str) -> Path:
    """``resolve_path`` of a reward's path option, its error naming the reward
    (``RewardConfigError``)."""
    try:
        return resolve_path(key, value)
    except OptionError as err:
        raise RewardConfigError(f"reward {reward_name!r}: {err}") from None


def check_dtype(key: str, value: str) -> None:
    """Validates a ``dtype`` option (one of ``DTYPE_NAMES``)."""
    if value not in DTYPE_NAMES:
        raise OptionError(key, f"must be one of {', '.join(DTYPE_NAMES)}, got {value!r}")


def check_device(key: str, value: str) -> None:
    """Validates the syntax of a ``device`` option (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    head, _, index = value.partition(":")
    if head not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise OptionError(key, f"expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")


def check_positive(key: str, value: int) -> None:
    """Validates a strictly positive integer option."""
    if value <= 0:
        raise OptionError(key, f"must be > 0, got {value}")


def check_non_negative(key: str, value: int) -> None:
    """Validates a non-negative integer option."""
    if value < 0:
        raise OptionError(key, f"must be >= 0, got {value}")
