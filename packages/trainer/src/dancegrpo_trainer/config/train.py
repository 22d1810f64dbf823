"""``train:``: optimisation settings (:class:`TrainConfig`) and LoRA (:class:`LoraConfig`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from dancegrpo_trainer.config.errors import _check

MixedPrecision = Literal["no", "bf16", "fp16"]
KLType = Literal["mean", "velocity"]


@dataclasses.dataclass
class LoraConfig:
    """LoRA via peft. ``rank = 0`` means full fine-tuning."""

    rank: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | None = None

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings (names follow the paper where it has one).

    Attributes:
        learning_rate, adam_beta1, adam_beta2, adam_eps, weight_decay: AdamW settings.
        warmup_steps: linear learning-rate warm-up, then constant.
        timestep_fraction: fraction of the denoising steps trained each update (random subset).
        skip_last_timestep: never train the final denoising step (DanceGRPO's
            ``ignore_last``; useful when the last step is deterministic or nearly so).
        clip_range: PPO ratio clip ε.
        adv_clip_max: advantages are clipped to ``[-adv_clip_max, adv_clip_max]``.
        kl_coef: weight of the KL penalty to the initial policy (0 disables; needs a
            frozen reference copy of the trainable module).
        micro_batch_size: samples per forward/backward; gradients accumulate over all
            samples and selected timesteps, then one optimiser step.
        max_grad_norm: gradient clipping norm.
        skip_grad_norm_factor: skip an update whose gradient norm exceeds this multiple of
            the running median of recent norms (0 disables).
        grad_norm_window: how many recent norms the running median uses.
        gradient_checkpointing: activation checkpointing in the trainable module.
        mixed_precision: ``no`` or ``bf16``/``fp16`` autocast (GPU).
        ema_decay: keep an exponential moving average of the weights (0 disables); eval
            and checkpoints include it.
        lora: LoRA settings (``lora.rank > 0`` enables).
        pipeline_update: start the update as soon as a rollout chunk's prompt groups are
            scored, overlapping the remaining reward calls with their backward passes
            (still one optimiser step per train step, on-policy; the gradient equals the
            wait-for-all update's up to float summation order). ``rewards.advantage:
            per_prompt`` always waits for every reward (the tracker normalises over the
            global batch). ``false``: wait for every reward, then update.
        algorithm: the training algorithm, a module under ``dancegrpo_trainer.algorithms``
            (``grpo``: DanceGRPO's GRPO, the default; ``grpo_guard``: GRPO-Guard's
            regulated ratio).
        algorithm_options: the algorithm's own options (checked by the algorithm).
        kl_type: what ``kl_coef`` penalises: ``mean`` (Flow-GRPO eq. 7: ``‖μθ − μref‖² /
            (2σ²)`` of the step means) or ``velocity`` (``mean_d (vθ − v_ref)²`` of the model
            outputs, Flow-Factory's ``v-based``; rectified-flow policies).
        cfg_free: train without classifier-free guidance: guidance weight 1 in the rollout,
            the update and eval (Flow-GRPO's ``*_nocfg`` configs), one forward per step.
            Adapters with CFG only (``CFG_WEIGHT_OPTIONS``).
        drop_constant_groups: leave out of the update every prompt group whose rewards are
            all equal (every reward term constant in the group: zero advantage). The kept
            samples train exactly the terms they would in GRPO; the loss is their mean
            (``groups_dropped_frac`` is logged). Needs ``rewards.advantage: group``. Works
            with ``fsdp``: a rank whose micro-batch keeps no row still runs it with a zero
            weight, as the sharded passes are collectives.
        fsdp: shard the trainable module's parameters, gradients and optimiser state
            across ranks (FSDP2 ``fully_shard``, per block of ``Policy.fsdp_block_types``);
            needs a distributed launch with more than one process. Trains exactly like
            the unsharded run (same gradient, same checkpoints), with LoRA (frozen base
            sharded too), EMA and the KL penalty.
    """

    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    timestep_fraction: float = 0.6
    skip_last_timestep: bool = False
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    kl_coef: float = 0.0
    micro_batch_size: int = 4
    max_grad_norm: float = 1.0
    skip_grad_norm_factor: float = 0.0
    grad_norm_window: int = 20
    gradient_checkpointing: bool = False
    mixed_precision: MixedPrecision = "no"
    ema_decay: float = 0.0
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    pipeline_update: bool = True
    fsdp: bool = False
    algorithm: str = "grpo"
    algorithm_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    kl_type: KLType = "mean"
    cfg_free: bool = False
    drop_constant_groups: bool = False

    def validate(self) -> None:
        from dancegrpo_trainer.algorithms import ALGORITHMS

        _check(
            self.algorithm in ALGORITHMS,
            "train.algorithm",
            f"must be one of {sorted(ALGORITHMS)}, got {self.algorithm!r}",
        )
        _check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _check(0 <= self.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1)")
        _check(0 <= self.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1)")
        _check(self.adam_eps > 0, "train.adam_eps", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(
            0 < self.timestep_fraction <= 1,
            "train.timestep_fraction",
            f"must be in (0, 1], got {self.timestep_fraction}",
        )
        _check(self.clip_range > 0, "train.clip_range", "must be > 0")
        _check(self.adv_clip_max > 0, "train.adv_clip_max", "must be > 0")
        _check(self.kl_coef >= 0, "train.kl_coef", "must be >= 0")
        _check(
            self.kl_type in ("mean", "velocity"),
            "train.kl_type",
            f"must be 'mean' or 'velocity', got {self.kl_type!r}",
        )
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _check(self.max_grad_norm > 0, "train.max_grad_norm", "must be > 0")
        _check(
            self.skip_grad_norm_factor == 0 or self.skip_grad_norm_factor > 1,
            "train.skip_grad_norm_factor",
            "must be 0 (off) or > 1 (e.g. 5)",
        )
        _check(self.grad_norm_window >= 3, "train.grad_norm_window", "must be >= 3")
        _check(
            self.mixed_precision in ("no", "bf16", "fp16"),
            "train.mixed_precision",
            "must be 'no', 'bf16' or 'fp16'",
        )
        _check(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0 disables)")
        _check(self.lora.rank >= 0, "train.lora.rank", "must be >= 0 (0 = full fine-tune)")
        _check(0 <= self.lora.dropout < 1, "train.lora.dropout", "must be in [0, 1)")
