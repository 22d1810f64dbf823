"""The training configuration: validated dataclasses loaded from YAML with CLI overrides.

A run is described by one YAML file (see ``configs/``) whose top-level sections map onto
the dataclasses below. ``load_config(path, ["train.learning_rate=1e-5", ...])`` applies
dotted ``key=value`` overrides (values parsed as YAML), then validates once; every error
names the offending field and says what to change. The rest of the trainer trusts the
config.

Nothing here assumes images: ``model.num_frames`` > 1 gives video frames ``[N,T,H,W,3]``
and ``data.train_prompts`` may be a JSONL file whose rows carry a conditioning image (I2V).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (``section.key``)."""


MixedPrecision = Literal["no", "bf16", "fp16"]
#: Adapters built on HunyuanVideo's VAE and transformer (same frame/pixel geometry).
HUNYUAN_VIDEO_KINDS = ("hunyuan_video", "skyreels_i2v")
#: Wan adapters: Wan2.1 / Wan2.2-A14B text-to-video, their image-to-video models, and
#: Wan2.2 TI2V-5B (text or image); the pixel multiple of each (VAE factor × patch 2).
WAN_KINDS = {"wan_t2v": 16, "wan_i2v": 16, "wan_ti2v": 32}
#: Image adapters whose pixel sizes are multiples of 16 (VAE 8x, 2x2 patches or packing).
IMAGE_16_KINDS = ("sd3", "flux_kontext")
#: Adapters conditioned on one image per prompt (a ``.jsonl`` row's ``condition_image``);
#: ``wan_ti2v`` takes one when the rows carry it, text alone otherwise.
CONDITION_IMAGE_KINDS = ("skyreels_i2v", "flux_kontext", "wan_i2v")
#: Qwen-Image adapters (one Qwen2.5-VL text encoder, VAE 8x then 2x2 packing, true CFG).
QWEN_IMAGE_KINDS = ("qwen_image", "qwen_image_edit", "qwen_image_edit_plus")
#: Qwen-Image editing adapters: a source image per prompt, which the text encoder sees too.
QWEN_IMAGE_EDIT_KINDS = ("qwen_image_edit", "qwen_image_edit_plus")
AdvantageMode = Literal["group", "per_prompt"]
#: Adapters with classifier-free guidance (a second, unconditional forward per step) and
#: the options holding its weights; ``train.cfg_free`` sets them to 1. Wan2.2 A14B has one
#: weight per expert (``guidance_scale`` high-noise, ``guidance_scale_2`` low-noise; Wan2.1
#: and TI2V-5B use the first). Qwen-Image's and SkyReels' true CFG is ``true_cfg_scale``.
#: FLUX, FLUX.1-Kontext and HunyuanVideo have a distilled guidance *embedding* instead (one
#: forward per step).
CFG_WEIGHT_OPTIONS: dict[str, tuple[str, ...]] = {
    "stable_diffusion": ("guidance_scale",),
    "sd3": ("guidance_scale",),
    "skyreels_i2v": ("true_cfg_scale",),
    **{kind: ("true_cfg_scale",) for kind in QWEN_IMAGE_KINDS},
    **{kind: ("guidance_scale", "guidance_scale_2") for kind in WAN_KINDS},
}
#: Pixel sizes must be multiples of this per adapter (VAE downsampling × patching/packing):
#: SD's VAE 8x; FLUX, Kontext, SD3, Qwen-Image: VAE 8x then 2x2 packing or patches;
#: HunyuanVideo/SkyReels: VAE 8x, patch 2; Wan: see ``WAN_KINDS`` (8x or 16x VAE, patch 2).
PIXEL_MULTIPLES = {
    "stable_diffusion": 8,
    "flux": 16,
    **{kind: 16 for kind in IMAGE_16_KINDS + QWEN_IMAGE_KINDS + HUNYUAN_VIDEO_KINDS},
    **WAN_KINDS,
}
KLType = Literal["mean", "velocity"]


@dataclasses.dataclass
class ModelConfig:
    """Which generator to fine-tune.

    Attributes:
        kind: adapter name: ``tiny_flow`` (the CPU demo policy), ``stable_diffusion``, ``flux``,
            ``hunyuan_video`` (text-to-video), ``skyreels_i2v`` (image-to-video: prompts
            come from a ``.jsonl`` file whose rows carry a ``condition_image``), ``sd3``
            (Stable Diffusion 3 / 3.5), ``flux_kontext`` (FLUX.1-Kontext image editing: each
            ``.jsonl`` row's ``condition_image`` is the source image), ``qwen_image``
            (text-to-image), ``qwen_image_edit`` / ``qwen_image_edit_plus`` (image editing,
            as ``flux_kontext``), ``wan_t2v`` (Wan2.1 T2V, Wan2.2 T2V-A14B), ``wan_i2v``
            (Wan2.1 I2V, Wan2.2 I2V-A14B; ``.jsonl`` prompts with images), ``wan_ti2v``
            (Wan2.2 TI2V-5B: text, or images when the prompt rows carry them).
        path: local diffusers-format folder; ``${ENV}`` references expand when the model
            is built (e.g. ``${DANCEGRPO_WEIGHTS}/flux-dev``). Unused by ``tiny_flow``.
        height, width: output resolution in pixels.
        num_frames: 1 for images; > 1 for video adapters (frames ``[N,T,H,W,3]``);
            ``hunyuan_video``, ``skyreels_i2v`` and the Wan kinds: ``4k + 1`` (e.g. 53, 81).
        guidance_scale: classifier-free (SD, SD3, Wan: the high-noise expert's for Wan2.2
            A14B, ``options.guidance_scale_2`` the other's) or embedded (FLUX,
            FLUX.1-Kontext, HunyuanVideo, SkyReels) guidance; SkyReels' and Qwen-Image's
            true CFG weight is ``options.true_cfg_scale`` (Qwen-Image has no guidance
            embedding: it stays 1).
        dtype: weight dtype of the frozen parts (``float32``, ``bfloat16``, ``float16``).
        options: adapter-specific keyword arguments, passed through verbatim.
        init_checkpoint: optional ``.safetensors`` of trainable-module weights loaded
            before training (the demo writes its pre-trained tiny policy here).
    """

    kind: str = "tiny_flow"
    path: str | None = None
    height: int = 16
    width: int = 16
    num_frames: int = 1
    guidance_scale: float = 1.0
    dtype: str = "float32"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_checkpoint: str | None = None

    def validate(self) -> None:
        known = ("tiny_flow", "stable_diffusion", "flux", *HUNYUAN_VIDEO_KINDS)
        known += (*IMAGE_16_KINDS, *QWEN_IMAGE_KINDS, *WAN_KINDS)
        _check(self.kind in known, "model.kind", f"must be one of {known}, got {self.kind!r}")
        if self.kind in HUNYUAN_VIDEO_KINDS:
            self._validate_hunyuan_video()
        if self.kind in IMAGE_16_KINDS + QWEN_IMAGE_KINDS:
            self._validate_image_16()
        if self.kind in QWEN_IMAGE_KINDS:
            _check(
                self.guidance_scale == 1.0,
                "model.guidance_scale",
                f"must stay 1.0 for {self.kind} (Qwen-Image has no guidance embedding); set the "
                f"true CFG weight with model.options.true_cfg_scale, got {self.guidance_scale}",
            )
        if self.kind in WAN_KINDS:
            self._validate_wan()
        _check(
            self.kind == "tiny_flow" or bool(self.path),
            "model.path",
            f"is required for kind {self.kind!r}: set it to a local diffusers folder",
        )
        for name in ("height", "width", "num_frames"):
            _check(getattr(self, name) >= 1, f"model.{name}", "must be >= 1")
        _check(self.guidance_scale >= 0, "model.guidance_scale", "must be >= 0")
        dtypes = ("float32", "bfloat16", "float16")
        _check(self.dtype in dtypes, "model.dtype", f"must be one of {dtypes}")

    def _validate_hunyuan_video(self) -> None:
        """HunyuanVideo's geometry (SkyReels I2V shares its VAE and patching): the VAE keeps
        frame 0 and compresses time 4x (so ``4k + 1`` frames) and space 8x, and the
        transformer patches 2x2 latents (so pixel sizes are multiples of 16)."""
        _check(
            self.num_frames % 4 == 1,
            "model.num_frames",
            f"must be 4k + 1 for {self.kind} (e.g. 53 as DanceGRPO, 97 as SkyReels', 129 as "
            f"HunyuanVideo's default), got {self.num_frames}",
        )
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(
                value % 16 == 0,
                f"model.{name}",
                f"must be a multiple of 16 for {self.kind} (VAE 8x, patch 2), got {value}; "
                f"try {max(16, round(value / 16) * 16)}",
            )

    def _validate_wan(self) -> None:
        """Wan's geometry: the VAE keeps frame 0 and compresses time 4x (``4k + 1``
        frames), space 8x (Wan2.1 VAE) or 16x (Wan2.2 TI2V-5B VAE), and the transformer
        patches 2x2 latents (pixel sizes multiples of 16, or 32 for ``wan_ti2v``)."""
        _check(
            self.num_frames % 4 == 1,
            "model.num_frames",
            f"must be 4k + 1 for {self.kind} (e.g. 81 as Wan's default, 33, 121 for TI2V-5B), "
            f"got {self.num_frames}",
        )
        multiple = WAN_KINDS[self.kind]
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(
                value % multiple == 0,
                f"model.{name}",
                f"must be a multiple of {multiple} for {self.kind} (VAE {multiple // 2}x, "
                f"patch 2), got {value}; try {max(multiple, round(value / multiple) * multiple)}",
            )

    def _validate_image_16(self) -> None:
        """SD3's and FLUX.1-Kontext's geometry: images (one frame) whose sides are multiples
        of 16 (VAE 8x, then 2x2 patches (SD3) or 2x2 packing (FLUX))."""
        _check(
            self.num_frames == 1,
            "model.num_frames",
            f"must be 1 for {self.kind} (an image model), got {self.num_frames}",
        )
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(
                value % 16 == 0,
                f"model.{name}",
                f"must be a multiple of 16 for {self.kind} (VAE 8x, 2x2 patches), got "
                f"{value}; try {max(16, round(value / 16) * 16)}",
            )


@dataclasses.dataclass
class RewardEndpoint:
    """One reward term: a named output of a reward hosted by a reward service.

    Attributes:
        target: gRPC target, e.g. ``localhost:50051``, ``dns:///rewards:50051``, or a
            comma-separated list of replicas. ``${ENV}`` references expand at start-up.
        reward: the reward's name on that server (``hps``, ``clip``, ``color_match``...).
        output: which of the reward's outputs trains (``score``, ``vq``, ``binary``...).
        weight: weight of this term in the aggregated advantage.
        threshold: if set, the term is binary: ``1`` where ``output >= threshold`` else ``0``.
        timeout_s: per-call deadline passed to the client.
        name: label used in metrics; defaults to ``reward/output``.
        metadata: send each sample's prompt metadata (its GenEval spec, from a ``.jsonl``
            prompt file of GenEval rows): rewards such as ``geneval`` need it. Every
            train and eval prompt must then carry one (checked at start-up).
        token_env: name of the environment variable holding the bearer token the server
            expects (its ``server.auth.token_env``); ``None`` sends no token.
        tls_ca: PEM CA bundle to verify the server's certificate; setting any ``tls_*``
            connects with TLS (system roots when ``tls_ca`` is unset).
        tls_cert, tls_key: PEM client certificate chain and private key, for mTLS.
    """

    target: str = ""
    reward: str = ""
    output: str = "score"
    weight: float = 1.0
    threshold: float | None = None
    timeout_s: float = 120.0
    name: str = ""
    metadata: bool = False
    token_env: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.reward}/{self.output}"

    def validate(self, where: str) -> None:
        _check(bool(self.target), f"{where}.target", "is required (e.g. 'localhost:50051')")
        _check(bool(self.reward), f"{where}.reward", "is required (the reward's server name)")
        _check(bool(self.output), f"{where}.output", "is required (e.g. 'score')")
        _check(self.weight > 0, f"{where}.weight", "must be > 0 (drop the entry to disable it)")
        _check(self.timeout_s > 0, f"{where}.timeout_s", "must be > 0")
        if self.token_env is not None:
            _check(
                bool(re.fullmatch(r"[A-Za-z_]\w*", self.token_env)),
                f"{where}.token_env",
                f"must name an environment variable, got {self.token_env!r}",
            )
            _check(
                bool(os.environ.get(self.token_env)),
                f"{where}.token_env",
                f"environment variable {self.token_env} (the bearer token) is not set or empty",
            )
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, key)
            if path is not None:
                _check(Path(path).is_file(), f"{where}.{key}", f"file not found: {path}")
        _check(
            (self.tls_cert is None) == (self.tls_key is None),
            f"{where}.tls_cert",
            "tls_cert and tls_key go together (mTLS needs both)",
        )

    @property
    def security(self) -> tuple[str | None, str | None, str | None, str | None]:
        """``(token_env, tls_ca, tls_cert, tls_key)``: how a client connects to ``target``."""
        return self.token_env, self.tls_ca, self.tls_cert, self.tls_key


@dataclasses.dataclass
class BestOfNConfig:
    """Best-of-N training: roll out ``group_size`` (= N) samples, train on the ``top_k``
    best and ``bottom_k`` worst of each group. Disabled when both are 0."""

    top_k: int = 0
    bottom_k: int = 0

    @property
    def enabled(self) -> bool:
        return self.top_k > 0 or self.bottom_k > 0


@dataclasses.dataclass
class RewardsConfig:
    """The reward terms and how they become advantages.

    Attributes:
        endpoints: the reward terms (at least one).
        advantage: ``group`` (normalise within each prompt group, DanceGRPO) or
            ``per_prompt`` (running per-prompt statistics across steps).
        best_of_n: optional top-k/bottom-k selection within each group.
        tracker_buffer_size, tracker_min_count: ``per_prompt`` tracker settings.
        outage_budget_s: how long a reward call may keep failing with ``UNAVAILABLE``,
            ``RESOURCE_EXHAUSTED`` or ``DEADLINE_EXCEEDED`` (a replica restarting or
            rescheduled) while it is resent with backoff, before the run stops with an
            error; ``0`` stops at the first such failure.
    """

    endpoints: list[RewardEndpoint] = dataclasses.field(default_factory=list)
    advantage: AdvantageMode = "group"
    best_of_n: BestOfNConfig = dataclasses.field(default_factory=BestOfNConfig)
    tracker_buffer_size: int = 32
    tracker_min_count: int = 16
    outage_budget_s: float = 300.0

    def validate(self) -> None:
        _check(len(self.endpoints) >= 1, "rewards.endpoints", "needs at least one endpoint")
        for i, ep in enumerate(self.endpoints):
            ep.validate(f"rewards.endpoints[{i}]")
        labels = [ep.label for ep in self.endpoints]
        _check(
            len(set(labels)) == len(labels),
            "rewards.endpoints",
            f"labels must be unique, got {labels}: set a distinct `name` on duplicates",
        )
        _check(
            self.advantage in ("group", "per_prompt"),
            "rewards.advantage",
            "must be 'group' or 'per_prompt'",
        )
        _check(self.best_of_n.top_k >= 0, "rewards.best_of_n.top_k", "must be >= 0")
        _check(self.best_of_n.bottom_k >= 0, "rewards.best_of_n.bottom_k", "must be >= 0")
        _check(self.tracker_buffer_size >= 1, "rewards.tracker_buffer_size", "must be >= 1")
        _check(self.tracker_min_count >= 1, "rewards.tracker_min_count", "must be >= 1")
        _check(
            0 <= self.outage_budget_s < float("inf"),  # NaN fails too
            "rewards.outage_budget_s",
            f"must be a finite number of seconds >= 0 (0 = stop at the first outage), "
            f"got {self.outage_budget_s}",
        )


WindowKind = Literal["full", "fast", "mixgrpo"]
WindowSchedule = Literal["progressive", "random", "decay"]
#: The rectified-flow samplers (``sampling.sampler``); Stable Diffusion uses ``ddim``.
FLOW_SAMPLER_NAMES = ("dancegrpo", "flow_grpo", "cps")


@dataclasses.dataclass
class WindowConfig:
    """Which rollout steps are stochastic (SDE, recorded, trained); the others are
    deterministic ODE steps. A window's position is a pure function of ``(run.seed,
    train step, this config)``, so resumes and multi-rank runs stay exact.

    Attributes:
        kind: ``full`` (every step, DanceGRPO), ``fast`` (Flow-GRPO-Fast: ``size`` SDE
            steps ``[k, k + size)``, ``k`` drawn uniformly each train step so the window
            lies within ``span``), ``mixgrpo`` (MixGRPO: a window sliding over training).
        size: SDE steps in the window (``fast``/``mixgrpo``; W = 1–3 for Fast, 4 for MixGRPO).
        span: ``fast``: ``[lo, hi]``, the steps the window may cover (``lo <= k``,
            ``k + size <= hi``; Flow-GRPO's ``sde_window_range``); default: every step
            (the last excluded with ``train.skip_last_timestep``).
        branch: ``fast``/``mixgrpo``: a group computes its deterministic prefix (steps
            before the window) once and branches at the window; needs shared noise.
        schedule: ``mixgrpo``: ``progressive`` (start moves by ``stride`` every
            ``iters_per_move`` train steps), ``random`` (uniform start each step) or
            ``decay`` (like progressive, the dwell shrinking linearly from
            ``iters_per_move`` to ``min_iters_per_move`` towards ``max_start``).
        iters_per_move, min_iters_per_move, stride: see ``schedule`` (MixGRPO's
            ``iters_per_group``, ``min_iters_per_group``, ``prog_overlap_step``).
        max_start: ``mixgrpo``: the last window start (default: the last that fits).
        roll_back: ``mixgrpo``: after ``max_start`` start again at 0 (else stay there).
        flash: ``mixgrpo`` progressive: after the window, DPM-Solver++ (2M) on a
            compressed schedule (MixGRPO-Flash).
        flash_compress_ratio: post-window schedule points = ``max(2, ⌊(S − stop + 1) ·
            ratio⌋)`` (MixGRPO's ``dpm_post_compress_ratio``).
    """

    kind: WindowKind = "full"
    size: int = 2
    span: list[int] | None = None
    branch: bool = False
    schedule: WindowSchedule = "progressive"
    iters_per_move: int = 25
    min_iters_per_move: int = 1
    stride: int = 1
    max_start: int | None = None
    roll_back: bool = True
    flash: bool = False
    flash_compress_ratio: float = 0.4

    def validate(self, num_steps: int, skip_last: bool, shared_noise: bool) -> None:
        w = "sampling.window"
        _check(
            self.kind in ("full", "fast", "mixgrpo"),
            f"{w}.kind",
            f"must be full, fast or mixgrpo, got {self.kind!r}",
        )
        if self.kind == "full":
            for key in ("branch", "flash"):
                _check(not getattr(self, key), f"{w}.{key}", "needs kind fast or mixgrpo")
            return
        usable = num_steps - int(skip_last)
        _check(
            1 <= self.size <= usable,
            f"{w}.size",
            f"must be in [1, {usable}] (sampling.num_steps={num_steps}"
            + (", minus the last step: train.skip_last_timestep)" if skip_last else ")"),
        )
        _check(
            not self.branch or shared_noise,
            f"{w}.branch",
            "shares a group's deterministic prefix, so the group must share its initial "
            "noise: set sampling.shared_noise: true",
        )
        if self.kind == "fast":
            _check(not self.flash, f"{w}.flash", "is MixGRPO-Flash: needs kind mixgrpo")
            lo, hi = self.fast_span(num_steps, skip_last)
            _check(
                lo >= 0 and hi <= usable and hi - lo >= self.size,
                f"{w}.span",
                f"must be [lo, hi] with 0 <= lo, hi <= {usable} and hi - lo >= size "
                f"({self.size}), got {self.span}",
            )
            return
        _check(
            self.schedule in ("progressive", "random", "decay"),
            f"{w}.schedule",
            f"must be progressive, random or decay, got {self.schedule!r}",
        )
        _check(self.iters_per_move >= 1, f"{w}.iters_per_move", "must be >= 1")
        _check(
            1 <= self.min_iters_per_move <= self.iters_per_move,
            f"{w}.min_iters_per_move",
            "must be in [1, iters_per_move]",
        )
        _check(self.stride >= 1, f"{w}.stride", "must be >= 1")
        last = self.last_start(num_steps, skip_last)
        _check(
            0 <= last <= usable - self.size,
            f"{w}.max_start",
            f"must be in [0, {usable - self.size}] (the window must fit), got {self.max_start}",
        )
        _check(
            not self.flash or self.schedule == "progressive",
            f"{w}.flash",
            "needs schedule progressive (MixGRPO-Flash's post-window solver; MixGRPO "
            "asserts it too)",
        )
        _check(
            0 < self.flash_compress_ratio <= 1,
            f"{w}.flash_compress_ratio",
            "must be in (0, 1]",
        )

    def fast_span(self, num_steps: int, skip_last: bool) -> tuple[int, int]:
        if self.span is None:
            return 0, num_steps - int(skip_last)
        _check(len(self.span) == 2, "sampling.window.span", f"must be [lo, hi], got {self.span}")
        return int(self.span[0]), int(self.span[1])

    def last_start(self, num_steps: int, skip_last: bool) -> int:
        if self.max_start is not None:
            return self.max_start
        return num_steps - int(skip_last) - self.size


@dataclasses.dataclass
class SamplingConfig:
    """Rollout settings.

    Attributes:
        num_steps: denoising steps per sample.
        eta: SDE noise level of rollouts (> 0: GRPO needs a stochastic policy).
        group_size: samples per prompt (G, or N for Best-of-N).
        prompts_per_step: prompts per optimisation step on each process; the global batch
            is ``prompts_per_step * group_size * world_size`` samples.
        shared_noise: one initial noise per group (DanceGRPO's default) instead of one per sample.
        rollout_batch_size: samples denoised together; finished chunks are decoded and sent
            to the reward services while the next chunk is sampled.
        sampler: the SDE of flow policies: ``dancegrpo`` (DanceGRPO, ``g = η``),
            ``flow_grpo`` (Flow-GRPO, ``g = η·√(σ/(1−σ))``) or ``cps`` (coefficients-
            preserving sampling, ``η ∈ (0, 1]``); ``null``: the policy's default
            (``dancegrpo``; Stable Diffusion: DDIM-η, the only sampler it takes).
        window: which steps are stochastic (:class:`WindowConfig`).
    """

    num_steps: int = 16
    eta: float = 0.7
    group_size: int = 8
    prompts_per_step: int = 4
    shared_noise: bool = True
    rollout_batch_size: int = 16
    sampler: str | None = None
    window: WindowConfig = dataclasses.field(default_factory=WindowConfig)

    def validate(self) -> None:
        _check(self.num_steps >= 1, "sampling.num_steps", "must be >= 1")
        _check(self.eta > 0, "sampling.eta", "must be > 0 for training rollouts (try 0.3-1.0)")
        _check(
            self.group_size >= 2, "sampling.group_size", "must be >= 2 (advantages need a group)"
        )
        _check(self.prompts_per_step >= 1, "sampling.prompts_per_step", "must be >= 1")
        _check(self.rollout_batch_size >= 1, "sampling.rollout_batch_size", "must be >= 1")
        samplers = (*FLOW_SAMPLER_NAMES, "ddim")
        _check(
            self.sampler is None or self.sampler in samplers,
            "sampling.sampler",
            f"must be one of {list(samplers)} (or null: the policy's default), got {self.sampler!r}",
        )
        _check(
            self.sampler != "cps" or self.eta <= 1,
            "sampling.eta",
            f"must be in (0, 1] with sampling.sampler cps (σ̃ = σ_next·sin(η·π/2)), got {self.eta}",
        )


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


_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass
class PromptSource:
    """One prompt source of a routed run (``data.sources``): its prompts and the reward
    terms that score them.

    Attributes:
        name: the source's name in metrics (``source/<name>/...``); letters, digits, ``_.-``.
        train_prompts, eval_prompts: as ``data.train_prompts`` / ``data.eval_prompts``.
        rewards: the ``rewards.endpoints`` labels that score this source's prompts, as a
            list (each at its endpoint's ``weight``) or a mapping ``label: weight``. Only
            these endpoints are called for its samples; a group's advantage is the weighted
            sum of its own rewards' group-normalised advantages.
        share: sampling share of the source (then every source sets one): each prompt
            comes from a source drawn with probability ``share / Σ share``. Unset: the
            sources' prompts are pooled, each prompt equally likely.
    """

    name: str = ""
    train_prompts: str | list[str] = dataclasses.field(default_factory=list)
    eval_prompts: str | list[str] = dataclasses.field(default_factory=list)
    rewards: list[str] | dict[str, float] = dataclasses.field(default_factory=list)
    share: float | None = None

    def reward_weights(self, endpoints: Sequence[RewardEndpoint]) -> dict[str, float]:
        """``label → weight`` of the terms that score this source."""
        if isinstance(self.rewards, dict):
            return {str(k): float(v) for k, v in self.rewards.items()}
        weight = {ep.label: ep.weight for ep in endpoints}
        return {label: weight[label] for label in self.rewards}

    def validate(self, where: str, endpoints: Sequence[RewardEndpoint]) -> None:
        _check(
            bool(_SOURCE_NAME.fullmatch(self.name)),
            f"{where}.name",
            f"is required: letters, digits, '_', '.', '-' (used in metric names), got {self.name!r}",
        )
        _check(
            bool(self.train_prompts),
            f"{where}.train_prompts",
            "is required: a prompt file (.txt/.jsonl) or a list of prompts",
        )
        _check(
            bool(self.rewards),
            f"{where}.rewards",
            "is required: the rewards.endpoints labels that score this source's prompts",
        )
        labels = [ep.label for ep in endpoints]
        names = list(self.rewards)
        _check(
            len(set(names)) == len(names),
            f"{where}.rewards",
            f"lists a label twice: {names}",
        )
        for label in names:
            _check(
                label in labels,
                f"{where}.rewards",
                f"{label!r} is not a rewards.endpoints label (labels: {labels}; an endpoint's "
                "label is its name, or reward/output)",
            )
        if isinstance(self.rewards, dict):
            for label, weight in self.rewards.items():
                _check(
                    isinstance(weight, (int, float))
                    and not isinstance(weight, bool)
                    and weight > 0,
                    f"{where}.rewards.{label}",
                    f"weight must be a number > 0 (drop the label to disable it), got {weight!r}",
                )
        if self.share is not None:
            _check(self.share > 0, f"{where}.share", f"must be > 0, got {self.share}")


@dataclasses.dataclass
class DataConfig:
    """Prompts.

    Attributes:
        train_prompts: a ``.txt`` file (one prompt per line), a ``.jsonl`` file (rows with
            ``prompt`` and optional ``condition_image`` path for I2V, or GenEval's rows
            ``{"tag", "include", "exclude", "prompt"}``, whose spec becomes the prompt's
            metadata, sent to endpoints with ``metadata: true``), or an inline list.
        eval_prompts: the same, for held-out evaluation (may be empty to skip eval).
        sources: instead of ``train_prompts``/``eval_prompts``, several prompt sources,
            each scored by the reward terms it names (:class:`PromptSource`), e.g. GenEval
            prompts by ``geneval`` and OCR prompts by ``ocr`` in one run.
        embedding_cache: folder written by ``dancegrpo-train preprocess``; when set,
            prompt conditioning is read from it instead of running text encoders.
        shuffle: reshuffle training prompts every epoch (seeded).
    """

    train_prompts: str | list[str] = dataclasses.field(default_factory=list)
    eval_prompts: str | list[str] = dataclasses.field(default_factory=list)
    sources: list[PromptSource] = dataclasses.field(default_factory=list)
    embedding_cache: str | None = None
    shuffle: bool = True

    def validate(self, endpoints: Sequence[RewardEndpoint] = ()) -> None:
        if not self.sources:
            _check(
                bool(self.train_prompts),
                "data.train_prompts",
                "is required: a prompt file (.txt/.jsonl) or a list of prompts (or data.sources)",
            )
            return
        for key in ("train_prompts", "eval_prompts"):
            _check(
                not getattr(self, key),
                f"data.{key}",
                f"must be empty when data.sources is set (each source names its own {key})",
            )
        for i, source in enumerate(self.sources):
            source.validate(f"data.sources[{i}]", endpoints)
        names = [s.name for s in self.sources]
        _check(len(set(names)) == len(names), "data.sources", f"names must be unique, got {names}")
        shares = [s.share is not None for s in self.sources]
        _check(
            all(shares) or not any(shares),
            f"data.sources[{shares.index(False) if not all(shares) else 0}].share",
            "set share on every source or on none (none: the sources' prompts are pooled)",
        )
        used = {label for s in self.sources for label in s.rewards}
        for i, ep in enumerate(endpoints):
            _check(
                ep.label in used,
                f"rewards.endpoints[{i}]",
                f"{ep.label!r} scores no prompt source: add it to a data.sources[*].rewards "
                "or drop the endpoint",
            )


@dataclasses.dataclass
class EvalConfig:
    """Held-out evaluation: fixed prompts and seeds, deterministic sampling (η = 0).

    Attributes:
        every_steps: evaluate every K steps (and before the first and after the last).
        samples_per_prompt: samples per eval prompt.
        seed: seed of the eval noise (fixed, so evals are comparable across steps).
        eta: sampling noise for eval (0 = deterministic ODE sampling).
        height, width: the eval resolution in pixels (``None``: ``model.height`` /
            ``model.width``, the training resolution); checked against the adapter's
            geometry like the model's.
    """

    every_steps: int = 10
    samples_per_prompt: int = 4
    seed: int = 1234
    eta: float = 0.0
    height: int | None = None
    width: int | None = None

    def validate(self) -> None:
        _check(self.every_steps >= 1, "eval.every_steps", "must be >= 1")
        _check(self.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1")
        _check(self.eta >= 0, "eval.eta", "must be >= 0")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"eval.{name}", "must be >= 1 (or null)")


@dataclasses.dataclass
class RunConfig:
    """Run bookkeeping.

    Attributes:
        output_dir: the run folder (config.yaml, metrics.jsonl, tb/, samples/, checkpoints/).
        max_steps: optimisation steps to run.
        seed: the base seed; every random draw of step ``s`` derives from ``(seed, s, rank)``.
        checkpoint_every: save a checkpoint every K steps (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        resume: ``auto`` (latest checkpoint in output_dir, if any), ``never``, or a path.
        sample_grid_every: write a sample grid every K steps (0 disables).
        progress: show the run's progress bar on a terminal (rank 0); per-step rollout/eval
            bars appear only while steps are slow enough for them to matter.
        log_every: a train log line every K steps (0: only at evals and checkpoints);
            every step's figures are in metrics.jsonl and TensorBoard regardless.
    """

    output_dir: str = "runs/default"
    max_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: str = "auto"
    sample_grid_every: int = 10
    progress: bool = True
    log_every: int = 10

    def validate(self) -> None:
        _check(bool(self.output_dir), "run.output_dir", "is required")
        _check(self.log_every >= 0, "run.log_every", "must be >= 0 (0: only at evals/checkpoints)")
        _check(self.max_steps >= 1, "run.max_steps", "must be >= 1")
        _check(self.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
        _check(self.sample_grid_every >= 0, "run.sample_grid_every", "must be >= 0")
        _check(bool(self.resume), "run.resume", "must be 'auto', 'never' or a checkpoint path")


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
            _check(
                value % multiple == 0,
                f"eval.{name}",
                f"must be a multiple of {multiple} for model.kind {kind}, got {value}; "
                f"try {max(multiple, round(value / multiple) * multiple)}",
            )

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


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


# ---------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that name the field.


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data``; unknown keys and wrong types name the field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{path}: unknown key; valid keys are {sorted(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads "5e-3" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict in place.

    A list element is addressed by its index: ``rewards.endpoints.0.target=host:50051``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r}: expected key=value (e.g. train.learning_rate=1e-5)"
            )
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key component")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                node = _list_item(node, part, here)
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{here}: is a value, not a section; cannot set {key}")
        last = parts[-1]
        if isinstance(node, list):
            _list_item(node, last, key)
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _list_item(node: list, part: str, where: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: list index must be 0..{len(node) - 1}, got {part!r}")
    return node[int(part)]


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, field: str) -> str:
    """Expands ``${VAR}`` and ``${VAR:-default}``; a missing variable without a default
    raises naming the field."""

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{field}: environment variable {name} is not set (used in {value!r})")

    return _ENV.sub(repl, value)


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> GRPOConfig:
    """Builds and validates a ``GRPOConfig`` from a nested dict plus overrides."""
    data = apply_overrides(_deep_copy(data), overrides)
    return from_dict(GRPOConfig, data).validate()


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> GRPOConfig:
    """Loads a YAML recipe, applies ``key=value`` overrides and validates.

    Relative paths inside the recipe (prompt files, output_dir) are relative to the
    directory the trainer runs in (the repository root for the shipped recipes).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(data, overrides)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
