"""The error every config check raises, and ``_check``, the one-line check the
sections' ``validate`` methods use to raise it (``_check_multiple`` for pixel sizes)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (``section.key``)."""


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _check_multiple(value: int, multiple: int, field: str, subject: str) -> None:
    """``value`` (a pixel size) is a multiple of ``multiple``; the error suggests the
    nearest one (``subject``: what asks for it, e.g. ``"sd3 (VAE 8x, 2x2 patches)"``)."""
    _check(
        value % multiple == 0,
        field,
        f"must be a multiple of {multiple} for {subject}, got {value}; "
        f"try {max(multiple, round(value / multiple) * multiple)}",
    )
