"""Encoded test images and a probe for what PIL actually decodes (decompression-bomb tests)."""

from __future__ import annotations

import io


def black_png(height: int, width: int) -> bytes:
    """A black RGB PNG: a few KB on the wire whatever its pixel size."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def record_decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """Patches PIL so the returned list collects the (height, width) of every image whose
    pixels are decoded (``ImageFile.load``); headers read with ``.size`` do not count."""
    from PIL import ImageFile

    sizes: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def recording_load(self):
        sizes.append((self.height, self.width))
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return sizes
