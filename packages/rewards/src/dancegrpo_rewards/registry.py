"""The reward kinds a service config can name, resolved lazily.

One table, edited in one place: ``kind`` → ``"module:Class"``. Classes are imported only
when a config uses them, so a server hosting weight-free rewards never imports torch.
"""

from __future__ import annotations

import importlib

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
    # composite rewards
    "video_frames": "dancegrpo_rewards.kinds.composite:VideoFramesReward",
    "threshold": "dancegrpo_rewards.kinds.composite:ThresholdReward",
}


def reward_class(kind: str) -> type[Reward]:
    """The class for ``kind``; ``KeyError`` lists the known kinds.

    ``kind`` is a name from ``REWARD_KINDS`` or, for out-of-tree rewards, an import path
    ``"package.module:ClassName"`` of a ``Reward`` subclass (plugins are named only in a
    service config, never added to this table at run time).
    """
    if kind in REWARD_KINDS:
        target = REWARD_KINDS[kind]
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
