"""The error every config check raises, and ``_check``, the one-line check the
sections' ``validate`` methods use to raise it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (``section.key``)."""


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")
