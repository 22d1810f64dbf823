"""The reward kinds a service config can name, resolved lazily, and their dependency sets.

``REWARD_KINDS``: ``kind`` → ``"module:Class"``. Classes are imported only when a config
uses them, so a server hosting weight-free rewards never imports torch.

``KIND_EXTRAS``: ``kind`` → the optional extra of ``dancegrpo-rewards`` that installs its
heavy dependencies (``pip install 'dancegrpo-rewards[videoalign]'``), and
``EXTRA_MODULES``: extra → the top-level modules it provides. Before a kind's module is
imported, those modules are looked up (not imported); a missing one fails start-up with
an error naming the extra to install. ``packages/rewards/tests/test_extras.py`` checks these
tables against ``packages/rewards/pyproject.toml``.
"""

from __future__ import annotations

import importlib
import importlib.util

from dancegrpo_rewards.base import Reward

REWARD_KINDS: dict[str, str] = {
    # weight-free (demos, tests, DDPO's compressibility)
    "jpeg_compressibility": "dancegrpo_rewards.kinds.weight_free:JpegCompressibility",
    "brightness": "dancegrpo_rewards.kinds.weight_free:Brightness",
    "color_match": "dancegrpo_rewards.kinds.weight_free:ColorMatch",
    # model-backed image rewards
    "hps": "dancegrpo_rewards.kinds.hps:HPSReward",
    "clip": "dancegrpo_rewards.kinds.clip_score:CLIPScoreReward",
    "aesthetic": "dancegrpo_rewards.kinds.aesthetic:AestheticReward",
    "geneval": "dancegrpo_rewards.kinds.geneval:GenEvalReward",
    "videoalign": "dancegrpo_rewards.kinds.videoalign:VideoAlignReward",
    "ocr": "dancegrpo_rewards.kinds.ocr:OcrReward",
    "pickscore": "dancegrpo_rewards.kinds.pickscore:PickScoreReward",
    "imagereward": "dancegrpo_rewards.kinds.imagereward:ImageRewardReward",
    "hpsv3": "dancegrpo_rewards.kinds.hpsv3:HPSv3Reward",
    "vlm_judge": "dancegrpo_rewards.kinds.vlm_judge:VLMJudgeReward",
    "image_similarity": "dancegrpo_rewards.kinds.image_similarity:ImageSimilarityReward",
    # composite rewards
    "video_frames": "dancegrpo_rewards.kinds.composite:VideoFramesReward",
    "threshold": "dancegrpo_rewards.kinds.composite:ThresholdReward",
    # group-wise rewards (a sample's output depends on its whole prompt group)
    "pairwise_preference": "dancegrpo_rewards.kinds.pairwise:PairwisePreferenceReward",
}

# Kinds absent here (weight-free, composite) need nothing beyond the core install; a
# composite's inner reward is checked when the composite resolves it.
KIND_EXTRAS: dict[str, str] = {
    "hps": "hps",
    "clip": "clip",
    "aesthetic": "aesthetic",
    "geneval": "geneval",
    "videoalign": "videoalign",
    "pickscore": "pickscore",
    "imagereward": "imagereward",
    "hpsv3": "hpsv3",
    "image_similarity": "image-similarity",
    "ocr": "ocr",
    "vlm_judge": "vlm-judge",
}

_TORCH = ("torch", "torchvision", "safetensors")
_CLIP_BACKBONE = (*_TORCH, "open_clip", "transformers")  # open_clip or Hugging Face CLIP
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "hps": (*_TORCH, "open_clip"),
    "clip": _CLIP_BACKBONE,
    "aesthetic": _CLIP_BACKBONE,
    "geneval": (*_CLIP_BACKBONE, "scipy"),
    "videoalign": (*_TORCH, "transformers"),
    "pickscore": (*_TORCH, "transformers"),
    "imagereward": (*_TORCH, "transformers"),
    "hpsv3": (*_TORCH, "transformers"),
    "image-similarity": _CLIP_BACKBONE,
    "ocr": ("rapidocr_onnxruntime",),  # brings onnxruntime and OpenCV as its dependencies
    "vlm-judge": (),  # the standard library's urllib
}


def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (blocked)
        return True


def missing_dependencies(kind: str) -> tuple[str | None, list[str]]:
    """``(extra, missing top-level modules)`` of a registry kind (``(None, [])`` for a
    kind without an extra). Looks modules up without importing them."""
    extra = KIND_EXTRAS.get(kind)
    if extra is None:
        return None, []
    return extra, [m for m in EXTRA_MODULES[extra] if _module_missing(m)]


def kinds_in_options(options: object) -> set[str]:
    """Kinds named inside a reward's options (e.g. a composite's inner ``reward.kind``)."""
    if isinstance(options, dict):
        found = {options["kind"]} if isinstance(options.get("kind"), str) else set()
        return found.union(*(kinds_in_options(v) for v in options.values()))
    if isinstance(options, list):
        return set().union(*(kinds_in_options(v) for v in options))
    return set()


def reward_class(kind: str) -> type[Reward]:
    """The class for ``kind``; ``KeyError`` lists the known kinds.

    ``kind`` is a name from ``REWARD_KINDS`` or, for out-of-tree rewards, an import path
    ``"package.module:ClassName"`` of a ``Reward`` subclass (plugins are named only in a
    service config, never added to this table at run time).
    """
    if kind in REWARD_KINDS:
        target = REWARD_KINDS[kind]
        extra, missing = missing_dependencies(kind)
        if missing:
            raise KeyError(
                f"reward kind {kind!r} needs {', '.join(missing)}, which this environment "
                f"lacks: install the extra with pip install 'dancegrpo-rewards[{extra}]'"
            )
    elif ":" in kind:
        target = kind
    else:
        known = ", ".join(sorted(REWARD_KINDS))
        raise KeyError(
            f"unknown reward kind {kind!r}; known kinds: {known} (or 'package.module:Class')"
        )
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise KeyError(f"reward kind {kind!r}: cannot import {target!r} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise KeyError(f"reward kind {kind!r}: {target!r} is not a Reward subclass")
    return cls
