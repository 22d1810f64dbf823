"""Wan2.1 / Wan2.2 text-to-video (rectified flow, ``WanTransformer3DModel``) sampled with the
flow SDE, as a Policy.

The sampling loop is diffusers' ``WanPipeline`` (diffusers 0.42) cut down to what GRPO needs:
UMT5 hidden states of the cleaned prompt (padding positions zeroed), 5-D video latents
``[B, C, (F−1)/4 + 1, H/s, W/s]`` normalised with the VAE's per-channel
``latents_mean``/``latents_std``, classifier-free guidance against a negative prompt, and
each step taken by :func:`flow_sde_step` on a statically shifted flow schedule.

The checkpoints ship a UniPC multistep scheduler; GRPO needs a one-step Gaussian transition
with a log-probability, so sampling uses the flow SDE on the same flow schedule
(``σ = shift(linspace(1, 0, n + 1))``, the checkpoint's ``flow_shift`` unless
``config.shift`` is set). At ``η = 0`` it is the Euler ODE, i.e. the pipeline run with
diffusers' ``FlowMatchEulerDiscreteScheduler`` on those sigmas (tested).

Wan2.2 A14B has two experts (:class:`WanExperts`): ``transformer`` denoises while the
timestep ``t ≥ boundary_ratio · 1000`` (high noise) and ``transformer_2`` below it (low
noise), each with its own guidance scale (Wan2.2 ``text2video.py``,
``_prepare_model_for_timestep``; diffusers' ``WanPipeline``). :meth:`WanPolicy.predict`
picks the expert of every row from its timestep, so the log-probability of a step always
comes from the expert that produced it. ``train_experts`` trains both or one of them.
Wan2.2 TI2V-5B (``expand_timesteps``) runs here as text-to-video; images are
:mod:`.wan_i2v`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dancegrpo_trainer.core.schedules import flow_sigmas
from dancegrpo_trainer.policies.base import Conditioning, Schedule
from dancegrpo_trainer.policies.flow_transformer import (
    FlowTransformerConfig,
    FlowTransformerPolicy,
    P,
)
from dancegrpo_trainer.policies.guidance import guided_velocity, negative, repeated_negatives
from dancegrpo_trainer.policies.runtime import freeze, load_text_encoders, module_dtype, place

#: LoRA targets: self- and cross-attention projections and the MLP of every
#: ``WanTransformerBlock`` (the layers diffusers' and DiffSynth's Wan LoRAs adapt).
WAN_LORA_TARGET_MODULES = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
]
#: Which experts of a two-expert (Wan2.2 A14B) model train: both, or one of them.
TRAIN_EXPERTS = ("all", "high_noise", "low_noise")
#: The experts (0: ``transformer``, 1: ``transformer_2``) each ``train_experts`` trains.
TRAINED_EXPERTS = {"all": (0, 1), "high_noise": (0,), "low_noise": (1,)}
#: Conditioning keys: UMT5 embeddings of the prompt and (CFG) of the negative prompt.
PROMPT_KEY, NEGATIVE_KEY = "prompt_embeds", "negative_prompt_embeds"
NUM_TRAIN_TIMESTEPS = 1000


@dataclasses.dataclass
class WanConfig(FlowTransformerConfig):
    """Options of :class:`WanPolicy` (defaults: DanceGRPO's Wan2.1 script,
    ``scripts/finetune/finetune_wan_2_1_grpo.sh``: 20 steps, η 0.3, CFG 5; 480×832 and 81
    frames are Wan's own 480p defaults).

    Attributes:
        resolution: frame size in pixels, an int or ``[height, width]``; a multiple of the
            VAE's spatial factor × the transformer's patch (16 for Wan2.1 and A14B, 32 for
            TI2V-5B's 16× VAE), checked against the loaded model.
        num_frames: frames per video, ``4k + 1`` (the VAE keeps the first frame and
            compresses the rest 4× in time).
        num_steps, eta, noise_schedule: see :class:`FlowTransformerConfig`.
        shift: static timestep shift ``s``; ``None`` reads the checkpoint's scheduler
            (``flow_shift`` of its UniPC config, or ``shift`` of a FlowMatchEuler one).
            Wan's own defaults: 5.0 (Wan2.1; 3.0 suggested at 480p), 12.0 (T2V-A14B),
            5.0 (I2V-A14B, TI2V-5B). DanceGRPO trains Wan2.1-1.3B with 3.
        guidance_scale: CFG weight of ``transformer`` (Wan2.2 A14B: the high-noise expert);
            ``<= 1`` runs the conditional pass only.
        guidance_scale_2: CFG weight of ``transformer_2`` (the low-noise expert); ``None``
            uses ``guidance_scale`` (diffusers). Wan2.2's defaults: 4.0 / 3.0 (T2V-A14B),
            3.5 / 3.5 (I2V-A14B).
        negative_prompt: the unconditional prompt (diffusers and DanceGRPO: ``""``; Wan's
            own scripts use a list of defects).
        max_sequence_length: UMT5 tokens (Wan: 512; DanceGRPO's cached embeddings: 226).
        boundary_ratio: two-expert switch point, ``transformer`` while ``t >= ratio ·
            1000``; ``None`` uses the checkpoint's (0.875 T2V-A14B, 0.9 I2V-A14B).
        train_experts: ``all``, or for a two-expert model ``high_noise`` (``transformer``)
            or ``low_noise`` (``transformer_2``) alone; the other expert stays frozen and
            only the steps the trained expert denoises are trained.
        vae_tiling: decode in overlapping spatial tiles (diffusers ``enable_tiling``).
        vae_decode_chunk_size: videos decoded per VAE call.
    """

    resolution: int | list[int] = dataclasses.field(default_factory=lambda: [480, 832])
    num_frames: int = 81
    num_steps: int = 20
    eta: float = 0.3
    shift: float | None = None
    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None
    negative_prompt: str = ""
    max_sequence_length: int = 512
    boundary_ratio: float | None = None
    train_experts: str = "all"
    vae_tiling: bool = False
    vae_decode_chunk_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(
                f"num_frames must be 4k + 1 (e.g. 33, 81): Wan's VAE keeps the first frame "
                f"and compresses the rest 4x in time, got {self.num_frames}"
            )
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.guidance_scale_2 is not None and self.guidance_scale_2 < 0:
            raise ValueError(f"guidance_scale_2 must be >= 0 or null, got {self.guidance_scale_2}")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")
        if self.boundary_ratio is not None and not 0 < self.boundary_ratio < 1:
            raise ValueError(f"boundary_ratio must be in (0, 1) or null, got {self.boundary_ratio}")
        if self.train_experts not in TRAIN_EXPERTS:
            raise ValueError(
                f"train_experts must be one of {TRAIN_EXPERTS}, got {self.train_experts!r}"
            )

    @property
    def guidance_scales(self) -> tuple[float, float]:
        """``(transformer's, transformer_2's)`` CFG weights."""
        second = self.guidance_scale_2
        return self.guidance_scale, self.guidance_scale if second is None else second

    @property
    def do_cfg(self) -> bool:
        """Whether any expert runs the negative prompt (so the conditioning carries it)."""
        return max(self.guidance_scales) > 1.0


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning before UMT5 (Wan ``modules/t5.py`` ``clean='whitespace'``,
    diffusers ``prompt_clean``): ``ftfy.fix_text`` when ftfy is installed (as diffusers),
    HTML entities unescaped twice, whitespace runs collapsed to one space, ends stripped."""
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def scheduler_shift(scheduler_config: Any) -> float | None:
    """The static shift of a diffusers scheduler config: UniPC's ``flow_shift`` (with flow
    sigmas, what the Wan checkpoints ship) or FlowMatchEuler's ``shift``."""
    get = (
        scheduler_config.get if isinstance(scheduler_config, dict) else scheduler_config.__getitem__
    )
    for key in ("flow_shift", "shift"):
        try:
            value = get(key)
        except KeyError:
            continue
        if value is not None:
            return float(value)
    return None


class WanExperts(nn.Module):
    """Wan2.2 A14B's two denoisers under one module: ``transformer`` (high noise) and
    ``transformer_2`` (low noise). ``forward(expert, **kwargs)`` runs expert 0 or 1.

    It is what the trainer trains when both experts train: LoRA targets match in both,
    checkpoints name the weights ``transformer.*`` / ``transformer_2.*``, and FSDP shards the
    blocks of both and keeps the rest (embeddings, heads) in this module's root unit,
    gathered when ``forward`` runs.
    """

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2

    def forward(self, expert: int, **kwargs: Any) -> Any:
        return (self.transformer, self.transformer_2)[expert](**kwargs)


class WanPolicy(FlowTransformerPolicy):
    """Wan transformer(s) + flow SDE behind the :class:`Policy` interface (text to video).

    Latents are float32 ``[B, C, T, h, w]`` (``C`` = the VAE's ``z_dim``: 16 for Wan2.1 /
    A14B, 48 for TI2V-5B; ``T = (F−1)/4 + 1``; ``h, w`` = pixels / VAE factor) on
    ``config.device``, in the VAE's normalised space. Conditioning: ``prompt_embeds``
    ``[B, S, 4096]`` (UMT5, padding zeroed) and, with CFG, ``negative_prompt_embeds`` (the
    negative prompt repeated per row). ``decode`` gives ``uint8 [N, F, H, W, 3]``.
    """

    modality: ClassVar = "video"
    config_class: ClassVar = WanConfig
    config: WanConfig
    default_lora_targets: ClassVar = WAN_LORA_TARGET_MODULES
    #: ``WanTransformerBlock`` (every expert's).
    fsdp_blocks: ClassVar = ("diffusers.models.transformers.transformer_wan:WanTransformerBlock",)

    def __init__(
        self,
        *,
        transformer: nn.Module,
        vae: nn.Module,
        config: WanConfig,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        transformer_2: nn.Module | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
        flow_shift: float | None = None,
    ) -> None:
        """Places the components per ``config``, freezes the text encoder, the VAE and an
        expert that does not train.

        Args:
            transformer: a diffusers ``WanTransformer3DModel`` (Wan2.2 A14B: the
                high-noise expert).
            vae: a diffusers ``AutoencoderKLWan``.
            config: the policy options.
            text_encoder, tokenizer: the UMT5 encoder and its tokenizer (both ``None`` when
                prompts come from an embedding cache).
            transformer_2: Wan2.2 A14B's low-noise expert, or ``None``.
            boundary_ratio: the checkpoint's expert switch (``model_index.json``);
                ``config.boundary_ratio`` overrides it.
            expand_timesteps: the checkpoint's per-token timesteps flag (Wan2.2 TI2V-5B).
            flow_shift: the checkpoint scheduler's shift, used when ``config.shift`` is
                ``None``.
        """
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("text_encoder and tokenizer must both be given (or neither)")
        super().__init__(transformer=transformer, vae=vae, config=config)
        if text_encoder is not None:
            self.text_encoder = place(text_encoder, config.text_device, config.torch_dtype)
            freeze(self.text_encoder)
            self.tokenizer = tokenizer
        self.transformer_2 = (
            place(transformer_2, self.device, config.torch_dtype)
            if transformer_2 is not None
            else None
        )
        self.expand_timesteps = bool(expand_timesteps)
        self.shift = self._resolve_shift(flow_shift)
        self._init_experts(boundary_ratio)
        if config.vae_tiling:
            self.vae.enable_tiling()
        self._init_geometry()

    def _resolve_shift(self, flow_shift: float | None) -> float:
        shift = self.config.shift if self.config.shift is not None else flow_shift
        if shift is None:
            raise ValueError(
                "shift: null reads the checkpoint scheduler's flow_shift, but none was given "
                "(build the policy with from_pretrained/from_pipeline, or set shift)"
            )
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        return float(shift)

    def _init_experts(self, checkpoint_boundary: float | None) -> None:
        """The experts, the switch timestep and which experts train (the others frozen)."""
        c = self.config
        two = self.transformer_2 is not None
        boundary = c.boundary_ratio if c.boundary_ratio is not None else checkpoint_boundary
        if two and boundary is None:
            raise ValueError(
                "boundary_ratio: a two-expert model (transformer_2) needs one; the checkpoint "
                "gives none, so set boundary_ratio (Wan2.2: 0.875 T2V-A14B, 0.9 I2V-A14B)"
            )
        if not two and c.boundary_ratio is not None:
            raise ValueError("boundary_ratio: this checkpoint has one transformer; set null")
        if not two and c.train_experts != "all":
            raise ValueError(
                f"train_experts={c.train_experts!r} needs a two-expert model (Wan2.2 A14B); "
                "this checkpoint has one transformer: use 'all'"
            )
        self.boundary_ratio = float(boundary) if two else None
        self.experts = WanExperts(self.transformer, self.transformer_2) if two else None
        if c.train_experts == "high_noise":
            freeze(self.transformer_2)
        elif c.train_experts == "low_noise":
            freeze(self.transformer)

    def _init_geometry(self) -> None:
        """Pixel and latent sizes from the config and the VAE/transformer configs (read now:
        the trainer may later shard the transformer)."""
        vae_cfg, tr_cfg = self.vae.config, self.transformer.config
        self.spatial_ratio = int(vae_cfg.scale_factor_spatial)
        self.temporal_ratio = int(vae_cfg.scale_factor_temporal)
        self.patch_size = tuple(int(p) for p in tr_cfg.patch_size)
        patch_t, patch_h, patch_w = self.patch_size
        if patch_h != patch_w:
            raise ValueError(f"non-square transformer patches are not supported: {self.patch_size}")
        self._set_image_size(self.spatial_ratio, self.spatial_ratio * patch_h)
        self._set_frame_count(self.temporal_ratio, patch_t)
        self.latent_channels = int(vae_cfg.z_dim)
        for expert in self._expert_modules():
            out = int(expert.config.out_channels or expert.config.in_channels)
            if out != self.latent_channels:
                raise ValueError(
                    f"the transformer predicts {out} channels but the VAE's latents have "
                    f"{self.latent_channels} (z_dim): not a matching Wan checkpoint"
                )
        self._check_input_channels(int(tr_cfg.in_channels))

    def _check_input_channels(self, in_channels: int) -> None:
        """Text-to-video transformers take the latents alone."""
        if in_channels != self.latent_channels:
            raise ValueError(
                f"the transformer takes {in_channels} input channels, the latents have "
                f"{self.latent_channels}: an image-to-video checkpoint (use WanI2VPolicy, "
                "model.kind wan_i2v)"
            )

    def _expert_modules(self) -> list[nn.Module]:
        return [self.transformer] + ([self.transformer_2] if self.transformer_2 else [])

    # ----------------------------------------------------------------- loading
    #: ``from_pipeline``'s modules (see :class:`FlowTransformerPolicy`): one UMT5 text
    #: encoder, and Wan2.2 A14B's low-noise expert (``None`` in one-transformer pipelines).
    pipeline_modules: ClassVar[dict[str, str]] = {
        "transformer": "model",
        "transformer_2": "model",
        "vae": "decode",
        "text_encoder": "text",
    }
    pipeline_extras: ClassVar[tuple[str, ...]] = ("tokenizer",)

    @classmethod
    def pipeline_options(cls, pipe: Any) -> dict[str, Any]:
        """A ``WanPipeline``'s (or ``WanImageToVideoPipeline``'s) ``boundary_ratio`` and
        ``expand_timesteps`` (its registered config) and its scheduler's shift."""
        return {
            "boundary_ratio": pipe.config.get("boundary_ratio"),
            "expand_timesteps": bool(pipe.config.get("expand_timesteps", False)),
            "flow_shift": scheduler_shift(pipe.scheduler.config),
        }

    @classmethod
    def from_pretrained(cls: type[P], path: str | Path, config: WanConfig | None = None) -> P:
        """Loads a local diffusers Wan folder: ``transformer/`` (and ``transformer_2/`` when
        ``model_index.json`` lists one), ``vae/``, ``scheduler/`` (its shift),
        ``text_encoder/`` + ``tokenizer/`` (UMT5) unless ``load_text_encoders`` is off, and
        (I2V) what :meth:`_load_extras` adds; ``boundary_ratio`` and ``expand_timesteps``
        come from ``model_index.json``."""
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        config = config or cls.config_class()
        path = Path(path)
        index_file = path / "model_index.json"
        if not (path / "transformer").is_dir() or not index_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a diffusers Wan folder (needs model_index.json and transformer/)"
            )
        index = json.loads(index_file.read_text())
        dtype = config.torch_dtype

        def transformer(name: str) -> nn.Module | None:
            if not _listed(index, name):
                return None
            return WanTransformer3DModel.from_pretrained(path, subfolder=name, torch_dtype=dtype)

        text = _load_text_encoder(path, dtype) if config.load_text_encoders else {}
        return cls(
            transformer=transformer("transformer"),
            transformer_2=transformer("transformer_2"),
            vae=AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=dtype),
            config=config,
            boundary_ratio=index.get("boundary_ratio"),
            expand_timesteps=bool(index.get("expand_timesteps", False)),
            flow_shift=_read_scheduler_shift(path),
            **text,
            **cls._load_extras(path, index, config),
        )

    @classmethod
    def _load_extras(cls, path: Path, index: dict[str, Any], config: WanConfig) -> dict[str, Any]:
        """Further components a subclass reads from the folder (I2V: the image encoder)."""
        return {}

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        """Encodes ``N`` prompts as ``WanPipeline.encode_prompt``: ``prompt_embeds``
        ``[N, S, D]`` (UMT5 last hidden state, ``S = max_sequence_length``, positions past
        each prompt's tokens zeroed) and, with CFG, ``negative_prompt_embeds`` (the negative
        prompt's, repeated ``N`` times). Runs on ``text_encoder_device``; the result is on
        ``device``."""
        if condition_images is not None:
            raise ValueError(
                "this Wan policy is text-to-video; condition_images must be None "
                "(image-to-video: model.kind wan_i2v or wan_ti2v)"
            )
        return self._encode_text(list(prompts))

    def _encode_text(self, prompts: list[str]) -> Conditioning:
        self._require_text_encoders()
        tensors = {PROMPT_KEY: self._umt5_embeds(prompts).to(self.device)}
        if self.config.do_cfg:
            negative_prompt = self._umt5_embeds([self.config.negative_prompt]).to(self.device)
            tensors.update(repeated_negatives({PROMPT_KEY: negative_prompt}, len(prompts)))
        return Conditioning(tensors)

    def _umt5_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Cleaned prompts → UMT5 last hidden state ``[N, S, D]``, zero past each prompt's
        tokens (diffusers ``_get_t5_prompt_embeds``: the first ``mask.sum()`` positions
        kept, the rest zero-padded)."""
        device = self.config.text_device
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.config.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1)
        keep = torch.arange(hidden.shape[1], device=device)[None, :] < lengths[:, None]
        return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype))

    # ----------------------------------------------------------------- sampling
    @property
    def schedule_shift(self) -> float:
        """The shift :meth:`schedule` uses (``config.shift``, or the checkpoint's)."""
        return self.shift

    def schedule(self, num_steps: int | None = None) -> Schedule:
        """Shifted ``sigmas`` ``[n + 1]`` from 1 to 0 (the shift resolved at construction)
        and ``timesteps = 1000·sigmas[:-1]``: the flow schedule of the checkpoint's UniPC
        scheduler (whose flow sigmas start at ``shift(0.999)`` instead of 1), as diffusers'
        ``FlowMatchEulerDiscreteScheduler`` sets it from ``sigmas=linspace(1, 1/n, n)``."""
        sigmas = flow_sigmas(num_steps or self.config.num_steps, shift=self.shift)
        return self.schedule_from_sigmas(sigmas)

    @property
    def boundary_timestep(self) -> float | None:
        """``boundary_ratio · 1000``: ``transformer`` at or above it, ``transformer_2``
        below (``None`` with one transformer)."""
        if self.boundary_ratio is None:
            return None
        return self.boundary_ratio * NUM_TRAIN_TIMESTEPS

    def expert_indices(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The expert (0: ``transformer``, 1: ``transformer_2``) of each timestep, int64
        (all 0 with one transformer)."""
        t = torch.as_tensor(timesteps)
        if self.boundary_timestep is None:
            return torch.zeros(t.shape, dtype=torch.long, device=t.device)
        return (t < self.boundary_timestep).long()

    def step_groups(self, schedule: Schedule) -> list[list[int]] | None:
        """With two experts, the steps of each trained expert (high-noise first): every
        micro-batch then trains the same number of steps of each expert in the same order
        (what FSDP's collectives need when ranks draw different timesteps), and a frozen
        expert's steps, which carry no gradient, are never drawn. ``None`` with one
        transformer."""
        if self.experts is None:
            return None
        experts = self.expert_indices(schedule.timesteps)
        trained = TRAINED_EXPERTS[self.config.train_experts]
        groups = [(experts == e).nonzero().flatten().tolist() for e in trained]
        if not any(groups):
            raise ValueError(
                f"train_experts={self.config.train_experts!r}: none of the "
                f"{schedule.num_steps} steps is on that side of the boundary t = "
                f"{self.boundary_timestep:g}; change sampling.num_steps, shift or train_experts"
            )
        return [g for g in groups if g]

    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: Conditioning
    ) -> torch.Tensor:
        """Guided velocity (float32) for ``latents`` ``[B, C, T, h, w]`` at ``timestep``
        (0..1000, a scalar or one per row): each row goes to the expert its timestep
        selects, with that expert's guidance scale; differentiable."""
        batch = latents.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=self.device)
        t = t.expand(batch) if t.ndim == 0 else t.reshape(batch)
        experts = self.expert_indices(t)
        first = int(experts[0])
        if bool((experts == first).all()):
            return self._guided_velocity(first, latents, t, cond.tensors)
        velocity = torch.empty(latents.shape, dtype=torch.float32, device=latents.device)
        for expert in (0, 1):
            rows = (experts == expert).nonzero().flatten()
            tensors = {k: v[rows.to(v.device)] for k, v in cond.tensors.items()}
            part = self._guided_velocity(expert, latents[rows], t[rows], tensors)
            velocity = velocity.index_copy(0, rows.to(latents.device), part)
        return velocity

    def _guided_velocity(
        self,
        expert: int,
        latents: torch.Tensor,
        t: torch.Tensor,
        tensors: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """One expert's velocity for rows that all use it: ``v_u + s·(v_c − v_u)`` in
        float32 with the negative and positive rows in one forward when its scale ``s > 1``
        (diffusers runs two forwards; the same arithmetic otherwise), the conditional pass
        alone otherwise."""
        scale = self.config.guidance_scales[expert]
        hidden = self._model_input(latents, tensors)
        timestep = self._model_timestep(t, latents, tensors)
        extra = self._model_kwargs(tensors)
        text = tensors[PROMPT_KEY]
        if scale > 1.0:
            scale_field = ("guidance_scale", "guidance_scale_2")[expert]
            both = self._forward(
                expert,
                torch.cat([hidden, hidden]),
                torch.cat([timestep, timestep]),
                torch.cat([negative(tensors, PROMPT_KEY, scale_field), text]),
                {k: torch.cat([v, v]) for k, v in extra.items()},
            )
            uncond, conditional = both.float().chunk(2)
            velocity = guided_velocity(conditional, uncond, scale)
        else:
            velocity = self._forward(expert, hidden, timestep, text, extra).float()
        return self._finish_velocity(velocity, latents, t, tensors)

    def _model_input(self, latents: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's ``hidden_states`` for ``latents`` (I2V adds image channels)."""
        return latents

    def _model_timestep(
        self, t: torch.Tensor, latents: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's ``timestep``: ``[B]`` (TI2V's image mode: one per token).

        TI2V-5B's pipeline gives every token the row's ``t`` even without an image; one
        ``t`` per row is the same arithmetic (the transformer broadcasts it) without a
        ``[B, tokens, 6·dim]`` modulation tensor (tested equal)."""
        return t

    def _model_kwargs(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Further transformer inputs (Wan2.1 I2V: ``encoder_hidden_states_image``)."""
        return {}

    def _finish_velocity(
        self,
        velocity: torch.Tensor,
        latents: torch.Tensor,
        t: torch.Tensor,
        tensors: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Hook for parts of the latents the model does not generate (TI2V's image frame)."""
        return velocity

    def _forward(
        self,
        expert: int,
        hidden: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        extra: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """One forward of ``expert`` (through :class:`WanExperts` when there are two, so a
        sharded two-expert module runs as one unit); output in the transformer's dtype.

        An expert that does not train runs without gradients whatever its ``requires_grad``
        flags (``from_pipeline`` shares a pipeline's modules without freezing them)."""
        module = self._expert_modules()[expert]
        frozen = expert not in TRAINED_EXPERTS[self.config.train_experts]
        dtype = module_dtype(module)
        kwargs = dict(
            hidden_states=hidden.to(self.device, dtype),
            timestep=timestep.to(self.device),
            encoder_hidden_states=text.to(self.device, dtype),
            return_dict=False,
            **{k: v.to(self.device, dtype) for k, v in extra.items()},
        )
        grad = torch.no_grad() if frozen else contextlib.nullcontext()
        with self.config.autocast(), grad:
            if self.experts is not None:
                return self.experts(expert, **kwargs)[0]
            return self.transformer(**kwargs)[0]

    # ----------------------------------------------------------------- decoding
    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """``[n, C, T, h, w]`` → frames in ``[-1, 1]`` as ``[n·F, 3, H, W]`` (sample-major),
        un-normalised as ``WanPipeline`` does (``x / (1 / std) + mean``, in the VAE dtype)."""
        vae = self.vae
        x = latents.to(self.config.decode_device, module_dtype(vae))
        mean, inv_std = _latent_stats(vae, x.device, x.dtype)
        video = vae.decode(x / inv_std + mean, return_dict=False)[0]  # [n, 3, F, H, W]
        return video.permute(0, 2, 1, 3, 4).flatten(0, 1)

    # ----------------------------------------------------------------- training
    def trainable_module(self) -> nn.Module:
        """The trained weights: the transformer; with two experts, :class:`WanExperts`
        (``train_experts: all``) or the one selected expert."""
        which = self.config.train_experts
        if self.experts is None or which == "all":
            return self.experts if self.experts is not None else self.transformer
        return self.transformer if which == "high_noise" else self.transformer_2

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' per-block activation checkpointing in every trained expert."""
        for expert in self._trained_experts():
            expert.enable_gradient_checkpointing()

    def _trained_experts(self) -> list[nn.Module]:
        which = self.config.train_experts
        experts = self._expert_modules()
        if which == "all":
            return experts
        return [experts[0] if which == "high_noise" else experts[1]]


def _latent_stats(vae: nn.Module, device: torch.device, dtype: torch.dtype):
    """``(latents_mean, 1 / latents_std)`` as ``[1, C, 1, 1, 1]`` in ``dtype`` (the
    pipeline's order: cast, then invert)."""
    c = vae.config
    shape = (1, int(c.z_dim), 1, 1, 1)
    mean = torch.tensor(c.latents_mean).view(shape).to(device, dtype)
    inv_std = 1.0 / torch.tensor(c.latents_std).view(shape).to(device, dtype)
    return mean, inv_std


def normalize_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """VAE posterior latents → the normalised space the transformer works in
    (``(x − mean) · (1 / std)``, as the Wan pipelines' ``prepare_latents``)."""
    mean, inv_std = _latent_stats(vae, latents.device, latents.dtype)
    return (latents - mean) * inv_std


def _listed(index: dict[str, Any], name: str) -> bool:
    """Whether ``model_index.json`` names a component (``[null, null]`` means absent)."""
    entry = index.get(name)
    return isinstance(entry, list) and entry[0] is not None


def _read_scheduler_shift(path: Path) -> float | None:
    file = path / "scheduler" / "scheduler_config.json"
    return scheduler_shift(json.loads(file.read_text())) if file.is_file() else None


def _load_text_encoder(path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """``text_encoder`` (``UMT5EncoderModel``) and ``tokenizer`` (umt5-xxl's, loaded with
    ``AutoTokenizer``) from a diffusers Wan folder."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    return load_text_encoders(path, dtype, {"": (AutoTokenizer, UMT5EncoderModel)})
