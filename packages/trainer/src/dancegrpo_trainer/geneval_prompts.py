"""GenEval's prompt rows → the sample metadata the ``geneval`` reward reads.

GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval) ships its prompts as
``prompts/evaluation_metadata.jsonl``: one JSON object per line with ``prompt``, ``tag``
and the objects an image must show (``include``) and must not show (``exclude``), each
``{"class", "count", "color", "position": [relation, include index]}``. Flow-GRPO's
GenEval training prompts (``dataset/geneval``) use the same rows. Training prompt files
(``data.load_prompts``) and ``dancegrpo-eval`` prompt sets (``evaluate.load_prompt_set``)
both convert rows here, into ``{"geneval": {"tag", "include", "exclude"}}``: the dict
form of ``SampleMetadata.geneval`` that ``dancegrpo_proto.RewardClient.score(metadata=)``
sends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def geneval_object(obj: Mapping[str, Any], include: Sequence[Mapping[str, Any]]) -> dict:
    """GenEval's ``{"class", "count", "color", "position": [relation, index]}`` → our spec.

    ``include`` is the row's include list: a position names one of its objects by index
    (the wire field ``position_reference`` is that index). Raises ``KeyError``,
    ``IndexError``, ``TypeError`` or ``ValueError`` on a malformed object.
    """
    out: dict[str, Any] = {"class_name": str(obj["class"]), "count": int(obj.get("count", 1))}
    if obj.get("color"):
        out["color"] = str(obj["color"])
    if obj.get("position"):
        relation, index = obj["position"]
        index = int(index)
        if not 0 <= index < len(include):
            raise IndexError(f"position index {index} outside include (length {len(include)})")
        out["position_relation"] = str(relation)
        out["position_reference"] = index  # the wire field is an index into include
    return out


def geneval_metadata(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"geneval": {"tag", "include", "exclude"}}`` of one GenEval row, or ``None`` when
    the row has no ``include`` (a plain ``{"prompt": ...}`` row carries no spec).

    Raises ``ValueError`` (``malformed GenEval spec (...)``) when the spec cannot be read.
    Only the format is checked here; the reward service validates classes, colours and
    relations against GenEval's vocabulary and names the bad field.
    """
    if "include" not in row:
        return None
    try:
        include = row["include"]
        return {
            "geneval": {
                "tag": str(row.get("tag", "")),
                "include": [geneval_object(o, include) for o in include],
                "exclude": [geneval_object(o, include) for o in row.get("exclude", [])],
            }
        }
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"malformed GenEval spec ({e!r})") from e
