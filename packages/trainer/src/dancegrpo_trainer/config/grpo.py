"""A complete run (:class:`GRPOConfig`): the sections of one YAML file and the rules
that tie them together (sampler x model, windows, prompts x adapters and rewards,
Best-of-N, FSDP micro-batches)."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from dancegrpo_trainer.config.data import DataConfig
from dancegrpo_trainer.config.errors import _check, _check_multiple
from dancegrpo_trainer.config.model import (
    CFG_WEIGHT_OPTIONS,
    CONDITION_IMAGE_KINDS,
    PIXEL_MULTIPLES,
    QWEN_IMAGE_EDIT_KINDS,
    ModelConfig,
)
from dancegrpo_trainer.config.rewards import RewardsConfig
from dancegrpo_trainer.config.run import EvalConfig, RunConfig
from dancegrpo_trainer.config.sampling import FLOW_SAMPLER_NAMES, SamplingConfig
from dancegrpo_trainer.config.train import TrainConfig


@dataclasses.dataclass
class GRPOConfig:
    """A complete training run (one YAML file)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    rewards: RewardsConfig = dataclasses.field(default_factory=RewardsConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def validate(self) -> GRPOConfig:
        """Checks every section and the cross-section rules; returns ``self``."""
        self.model.validate()
        self.rewards.validate()
        self.sampling.validate()
        self.train.validate()
        self.data.validate(self.rewards.endpoints)
        self.eval.validate()
        self.run.validate()
        if self.model.kind in CONDITION_IMAGE_KINDS + QWEN_IMAGE_EDIT_KINDS:
            self._validate_i2v_prompts()
        if self.model.kind in QWEN_IMAGE_EDIT_KINDS:
            _check(
                self.data.embedding_cache is None,
                "data.embedding_cache",
                f"must be unset for {self.model.kind}: its text encoder sees the source image, "
                "so prompt embeddings cannot be cached by prompt text (keep the text encoder "
                "loaded; model.options.text_encoder_device may place it elsewhere)",
            )
        self._validate_sampling()
        self._validate_metadata_prompts()
        self._validate_train_options()
        self._validate_eval_size()
        bon = self.rewards.best_of_n
        if bon.enabled:
            _check(
                bon.top_k + bon.bottom_k <= self.sampling.group_size,
                "rewards.best_of_n",
                f"top_k + bottom_k ({bon.top_k} + {bon.bottom_k}) must be <= "
                f"sampling.group_size ({self.sampling.group_size})",
            )
        _check(
            not (self.train.skip_last_timestep and self.sampling.num_steps < 2),
            "train.skip_last_timestep",
            f"needs sampling.num_steps >= 2 (got {self.sampling.num_steps}): nothing would train",
        )
        _check(
            not (self.train.lora.enabled and self.train.ema_decay > 0),
            "train.ema_decay",
            "EMA is for full fine-tuning; set it to 0 when train.lora.rank > 0",
        )
        if self.train.fsdp:
            # Every forward of a sharded module is a collective, so every rank must run the
            # same number of micro-batches; they are cut at global multiples of
            # micro_batch_size, which splits each rank's share evenly only if it divides
            # the samples trained per prompt group.
            per_group = bon.top_k + bon.bottom_k if bon.enabled else self.sampling.group_size
            _check(
                per_group % self.train.micro_batch_size == 0,
                "train.micro_batch_size",
                f"must divide the samples trained per prompt group ({per_group}) with "
                "train.fsdp, so that every rank runs the same number of forward passes",
            )
        return self

    def _validate_sampling(self) -> None:
        """Sampler, window and algorithm combinations that make sense together."""
        s, t = self.sampling, self.train
        _check(
            "noise_schedule" not in self.model.options,
            "model.options.noise_schedule",
            "moved to sampling.sampler (noise_schedule dance -> sampler dancegrpo, "
            "flow_grpo -> flow_grpo)",
        )
        is_flow = self.model.kind != "stable_diffusion"
        if not is_flow:
            _check(
                s.sampler in (None, "ddim"),
                "sampling.sampler",
                f"{s.sampler} is a rectified-flow sampler; model.kind stable_diffusion samples "
                "with DDIM-eta (leave it unset or 'ddim')",
            )
            _check(
                s.window.kind == "full",
                "sampling.window.kind",
                "SDE windows are implemented for rectified-flow policies; stable_diffusion "
                "trains every DDIM step (kind: full)",
            )
            _check(
                s.eta <= 1,
                "sampling.eta",
                f"must be in (0, 1] for model.kind stable_diffusion (DDIM-eta; 1 is DDPM-like), "
                f"got {s.eta}",
            )
        else:
            _check(
                s.sampler != "ddim",
                "sampling.sampler",
                f"ddim is Stable Diffusion's sampler; model.kind {self.model.kind} is a "
                f"rectified flow: use one of {list(FLOW_SAMPLER_NAMES)}",
            )
        if not is_flow or s.sampler == "cps":
            what = "DDIM-eta" if not is_flow else "sampling.sampler cps"
            _check(
                self.eval.eta <= 1,
                "eval.eta",
                f"must be in [0, 1] with {what} (eval samples with it), got {self.eval.eta}",
            )
        s.window.validate(s.num_steps, t.skip_last_timestep, s.shared_noise)
        if s.sampler == "cps" and s.window.kind != "full" and s.window.size == 1:
            # CPS's last step is deterministic (σ̃ = σ_next·sin(ηπ/2) = 0 at σ_next = 0): a
            # one-step window there records a step without a density and trains nothing.
            w, skip = s.window, t.skip_last_timestep
            hi = w.fast_span(s.num_steps, skip)[1] if w.kind == "fast" else None
            reach = hi if hi is not None else w.last_start(s.num_steps, skip) + w.size
            _check(
                reach < s.num_steps,
                "train.skip_last_timestep",
                "must be true with sampling.sampler cps and a one-step SDE window that can "
                "land on the last step: CPS's last step is deterministic (σ̃ = 0 at σ_next = 0), "
                "so that window trains nothing (or keep it off the last step: "
                "sampling.window.span / max_start, or a larger window.size)",
            )
        from dancegrpo_trainer.algorithms import algorithm_class

        algorithm_class(t.algorithm).validate_config(self)

    def _validate_train_options(self) -> None:
        """``kl_type``, ``cfg_free`` and ``drop_constant_groups`` against the model and the
        advantage mode."""
        t, kind = self.train, self.model.kind
        _check(
            t.kl_type != "velocity" or kind != "stable_diffusion",
            "train.kl_type",
            "velocity compares rectified-flow velocities; model.kind stable_diffusion "
            "predicts noise: use kl_type mean",
        )
        _check(
            not t.cfg_free or kind in CFG_WEIGHT_OPTIONS,
            "train.cfg_free",
            f"model.kind {kind} has no classifier-free guidance to turn off (FLUX, "
            "FLUX.1-Kontext and HunyuanVideo run one forward per step with a distilled "
            "guidance embedding, model.guidance_scale, which is a conditioning input, not "
            f"CFG); adapters with CFG: {sorted(CFG_WEIGHT_OPTIONS)}",
        )
        _check(
            not t.drop_constant_groups or self.rewards.advantage == "group",
            "train.drop_constant_groups",
            "needs rewards.advantage: group (a per-prompt tracker gives a group of equal "
            "rewards a non-zero advantage)",
        )

    def eval_size(self) -> tuple[int, int]:
        """The eval resolution ``(height, width)``: ``eval.height/width`` or the model's."""
        e, m = self.eval, self.model
        return (e.height or m.height, e.width or m.width)

    def _validate_eval_size(self) -> None:
        """``eval.height`` / ``eval.width`` fit the adapter's geometry (pixel multiples)."""
        kind = self.model.kind
        multiple = PIXEL_MULTIPLES.get(kind)
        if kind == "tiny_flow":
            multiple = self.model.options.get("latent_size")
        if not multiple:
            return
        for name, value in zip(("height", "width"), self.eval_size(), strict=True):
            if getattr(self.eval, name) is None:
                continue
            _check_multiple(value, multiple, f"eval.{name}", f"model.kind {kind}")

    def _prompt_sources(self, label: str | None = None) -> list[tuple[str, Any, bool]]:
        """``(field, source, is a .jsonl path)`` of the train prompts and, when set, the
        eval prompts (of every ``data.sources`` entry, or of those scored by ``label``)."""
        if self.data.sources:
            holders = [
                (f"data.sources[{i}].", s)
                for i, s in enumerate(self.data.sources)
                if label is None or label in s.rewards
            ]
        else:
            holders = [("data.", self.data)]
        out = []
        for prefix, holder in holders:
            for name in ("train_prompts", "eval_prompts"):
                src = getattr(holder, name)
                if name == "eval_prompts" and not src:
                    continue
                out.append(
                    (f"{prefix}{name}", src, isinstance(src, str) and src.endswith(".jsonl"))
                )
        return out

    def _validate_i2v_prompts(self) -> None:
        """Image-to-video and editing prompts need a conditioning (source) image each, which
        only a ``.jsonl`` prompt file carries (``{"prompt": ..., "condition_image": ...}``)."""
        what = (
            "image editing"
            if self.model.kind in ("flux_kontext", *QWEN_IMAGE_EDIT_KINDS)
            else "image-to-video"
        )
        for name, source, is_jsonl in self._prompt_sources():
            _check(
                is_jsonl,
                name,
                f"model.kind {self.model.kind} ({what}) needs a .jsonl prompt file whose "
                f'rows carry a condition_image ({{"prompt": ..., "condition_image": "a.png"}}), '
                f"got {source!r}",
            )

    def _validate_metadata_prompts(self) -> None:
        """Endpoints with ``metadata: true`` need prompts that carry metadata, which only a
        ``.jsonl`` file of GenEval rows does (each row's spec is checked when the trainer
        loads the file, ``data.require_metadata``)."""
        for i, ep in enumerate(self.rewards.endpoints):
            if ep.metadata:
                self._check_metadata_sources(i, ep.label)

    def _check_metadata_sources(self, index: int, label: str) -> None:
        for name, source, is_jsonl in self._prompt_sources(label):
            _check(
                is_jsonl,
                f"rewards.endpoints[{index}].metadata",
                f"is true, so {name} must be a .jsonl file of GenEval rows "
                '({"tag", "include", "exclude", "prompt"}) that carry each prompt\'s metadata, '
                f"got {source!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
