"""The text side of the ``ocr`` reward: target extraction, normalisation, edit distance.

Pure functions, no I/O and no OCR dependency. The semantics are Flow-GRPO's
(``flow_grpo/ocr.py``, ``OcrScorer.__call__``, github.com/yifan123/flow_grpo at ac4c86e):

- the target is ``prompt.split('"')[1]``: the text after the first ASCII double quote, up
  to the next one (or the end of the prompt when there is no closing quote);
- recognised text and target both lose every ASCII space (``" "``; other whitespace is
  kept) and are lower-cased;
- distance 0 when the normalised target occurs anywhere in the normalised recognised
  text, else their Levenshtein distance, capped at the target's length;
- reward ``1 - distance / len(target)``, in ``[0, 1]``.

Flow-GRPO crashes on a prompt without a double quote (``IndexError``) and divides by
zero on an empty target; here ``ocr_target`` returns ``None`` for both and the kind
rejects such samples with ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import dataclasses


def ocr_target(prompt: str) -> str | None:
    """The text the image must show: between the first two ``"`` of ``prompt``.

    Returns ``None`` when the prompt has no ``"`` or when the target is empty after
    normalisation (``normalize_ocr_text``), as for ``'a sign that says "  "'``.
    """
    parts = prompt.split('"')
    if len(parts) < 2:
        return None
    target = parts[1]
    return target if normalize_ocr_text(target) else None


def normalize_ocr_text(text: str) -> str:
    """Flow-GRPO's normalisation: drop ASCII spaces, lower-case."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete char_a
                    current[j - 1] + 1,  # insert char_b
                    previous[j - 1] + (char_a != char_b),  # substitute
                )
            )
        previous = current
    return previous[-1]


@dataclasses.dataclass(frozen=True)
class OcrMatch:
    """How well recognised text matches a target.

    Attributes:
        reward: ``1 - distance / len(target)`` in ``[0, 1]`` (lengths after normalisation).
        distance: the capped edit distance, in ``[0, len(target)]``.
    """

    reward: float
    distance: int


def ocr_match(recognized: str, target: str) -> OcrMatch:
    """Scores ``recognized`` text against ``target`` (Flow-GRPO's rule, see module doc).

    Raises:
        ValueError: ``target`` is empty after normalisation.
    """
    seen = normalize_ocr_text(recognized)
    wanted = normalize_ocr_text(target)
    if not wanted:
        raise ValueError(f"OCR target {target!r} is empty after removing spaces")
    distance = 0 if wanted in seen else min(levenshtein(seen, wanted), len(wanted))
    return OcrMatch(reward=1.0 - distance / len(wanted), distance=distance)
