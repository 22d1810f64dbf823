"""Images of rendered text for the OCR reward's tests (no downloads).

Fonts come from what is available offline: PIL's bundled default font (Aileron Regular,
a FreeType sans scalable with ``ImageFont.load_default(size=...)``, Pillow >= 10.1) and,
when installed, DejaVu Sans / Serif Bold / Sans Mono from the system font folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_DEJAVU_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/dejavu"),
    Path("/usr/share/fonts/TTF"),
)
_DEJAVU_FILES = ("DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf")


def available_fonts(size: int) -> dict[str, Any]:
    """``{name: FreeType font}`` at ``size`` pixels: PIL's default plus any DejaVu found."""
    from PIL import ImageFont

    fonts: dict[str, Any] = {"pil_default": ImageFont.load_default(size=size)}
    for directory in _DEJAVU_DIRS:
        for file in _DEJAVU_FILES:
            path = directory / file
            if path.is_file() and path.stem not in fonts:
                fonts[path.stem] = ImageFont.truetype(str(path), size)
    return fonts


def render_text(
    text: str,
    font: Any,
    *,
    size: tuple[int, int] = (512, 256),
    background: tuple[int, int, int] = (255, 255, 255),
    color: tuple[int, int, int] = (0, 0, 0),
):
    """``uint8 [H, W, 3]``: ``text`` (may hold newlines) centred on a plain background.

    ``size`` is ``(width, height)`` as in PIL.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    origin = ((size[0] - (right - left)) / 2 - left, (size[1] - (bottom - top)) / 2 - top)
    draw.multiline_text(origin, text, fill=color, font=font, align="center")
    return np.asarray(image)
