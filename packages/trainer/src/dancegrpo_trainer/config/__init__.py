"""The training configuration: validated dataclasses loaded from YAML with CLI overrides.

A run is described by one YAML file (see ``configs/``) whose top-level sections map onto
the dataclasses below. ``load_config(path, ["train.learning_rate=1e-5", ...])`` applies
dotted ``key=value`` overrides (values parsed as YAML), then validates once; every error
names the offending field and says what to change. The rest of the trainer trusts the
config.

Nothing here assumes images: ``model.num_frames`` > 1 gives video frames ``[N,T,H,W,3]``
and ``data.train_prompts`` may be a JSONL file whose rows carry a conditioning image (I2V).

Where each part lives (every public name is re-exported here):

- ``errors``: :class:`ConfigError` and the ``_check`` helper every section uses;
- ``model``: ``model:`` (:class:`ModelConfig`) and the per-adapter tables
  (``HUNYUAN_VIDEO_KINDS``, ``WAN_KINDS``, ``CFG_WEIGHT_OPTIONS``, ``PIXEL_MULTIPLES``, ...);
- ``rewards``: ``rewards:`` (:class:`RewardEndpoint`, :class:`BestOfNConfig`,
  :class:`RewardsConfig`);
- ``sampling``: ``sampling:`` (:class:`WindowConfig`, :class:`SamplingConfig`);
- ``train``: ``train:`` (:class:`LoraConfig`, :class:`TrainConfig`);
- ``data``: ``data:`` (:class:`PromptSource`, :class:`DataConfig`);
- ``run``: ``eval:`` and ``run:`` (:class:`EvalConfig`, :class:`RunConfig`);
- ``grpo``: the whole run (:class:`GRPOConfig`) and its cross-section checks;
- ``loading``: dicts and YAML to dataclasses (``from_dict``, ``apply_overrides``,
  ``expand_env``, ``config_from_dict``, ``load_config``).

Sections import only ``errors`` (and ``data`` the ``RewardEndpoint`` it checks labels
against); ``grpo`` imports the sections; ``loading`` imports ``grpo``.
"""

from dancegrpo_trainer.config.data import DataConfig, PromptSource
from dancegrpo_trainer.config.errors import ConfigError
from dancegrpo_trainer.config.grpo import GRPOConfig
from dancegrpo_trainer.config.loading import (
    apply_overrides,
    config_from_dict,
    expand_env,
    from_dict,
    load_config,
)
from dancegrpo_trainer.config.model import (
    CFG_WEIGHT_OPTIONS,
    CONDITION_IMAGE_KINDS,
    HUNYUAN_VIDEO_KINDS,
    IMAGE_16_KINDS,
    PIXEL_MULTIPLES,
    QWEN_IMAGE_EDIT_KINDS,
    QWEN_IMAGE_KINDS,
    WAN_KINDS,
    ModelConfig,
)
from dancegrpo_trainer.config.rewards import (
    AdvantageMode,
    BestOfNConfig,
    RewardEndpoint,
    RewardsConfig,
)
from dancegrpo_trainer.config.run import EvalConfig, RunConfig
from dancegrpo_trainer.config.sampling import (
    FLOW_SAMPLER_NAMES,
    SamplingConfig,
    WindowConfig,
    WindowKind,
    WindowSchedule,
)
from dancegrpo_trainer.config.train import KLType, LoraConfig, MixedPrecision, TrainConfig

__all__ = [
    "CFG_WEIGHT_OPTIONS",
    "CONDITION_IMAGE_KINDS",
    "FLOW_SAMPLER_NAMES",
    "HUNYUAN_VIDEO_KINDS",
    "IMAGE_16_KINDS",
    "PIXEL_MULTIPLES",
    "QWEN_IMAGE_EDIT_KINDS",
    "QWEN_IMAGE_KINDS",
    "WAN_KINDS",
    "AdvantageMode",
    "BestOfNConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GRPOConfig",
    "KLType",
    "LoraConfig",
    "MixedPrecision",
    "ModelConfig",
    "PromptSource",
    "RewardEndpoint",
    "RewardsConfig",
    "RunConfig",
    "SamplingConfig",
    "TrainConfig",
    "WindowConfig",
    "WindowKind",
    "WindowSchedule",
    "apply_overrides",
    "config_from_dict",
    "expand_env",
    "from_dict",
    "load_config",
]
