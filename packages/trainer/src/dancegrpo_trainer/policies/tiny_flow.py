"""A tiny rectified-flow policy in RGB pixel space, for the CPU demo and the trainer's tests.

No VAE: the network predicts the flow velocity of a ``[B, 3, H, W]`` image in ``[-1, 1]``
(16×16 by default), conditioned on the noise level and on the prompt. The text encoder is
frozen and parameter-free, like the frozen CLIP/T5 encoders of real models: a hashed bag
of words (word counts, so any phrasing encodes without a vocabulary file). The network
learns a projection on top of it, initialised at zero, so a word never seen in training
contributes nothing and a new phrasing of a trained colour word encodes like the colour
word itself. It implements the same :class:`Policy` interface as the SD/FLUX adapters and
samples with the same ``flow_sde_step``, so the demo exercises the real trainer code path
on two CPU cores in minutes.

``pretrain_flow_matching`` gives the base policy something to start from: a short
unconditional flow-matching phase on random-colour images, so the base model draws
diverse colours and (its prompt projection still zero) ignores the prompt exactly. GRPO
then has to learn the prompt → colour mapping from reward alone.
"""

from __future__ import annotations

import copy
import math
import re
import zlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from dancegrpo_trainer.core.schedules import flow_sigmas
from dancegrpo_trainer.policies.base import Conditioning, Schedule
from dancegrpo_trainer.policies.flow import FlowPolicy

_WORD = re.compile(r"[a-z]+")


def bag_of_words(prompts: Sequence[str], vocab_size: int) -> torch.Tensor:
    """Hashes each prompt's lower-cased words into ``vocab_size`` buckets (CRC32).

    Counts, not a mean: each word adds its own bucket, so words that carry no learned
    meaning do not dilute the ones that do ("red everywhere" encodes as "red" plus
    "everywhere", not as half of each).

    Returns:
        float32 ``[N, vocab_size]`` word counts; all zeros for a prompt without words.
    """
    bag = torch.zeros(len(prompts), vocab_size)
    for row, prompt in enumerate(prompts):
        words = _WORD.findall(prompt.lower())
        for word in words:
            bag[row, zlib.crc32(word.encode()) % vocab_size] += 1.0
    return bag


def _sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None] * 1000.0
    return torch.cat([args.sin(), args.cos()], dim=1)


class _Block(nn.Module):
    """Per-pixel conv (1×1: cheap on CPU) → FiLM(conditioning) → SiLU, plus a
    global-average-pooled path: the mean colour of an image is a global quantity, so every
    pixel needs the image-wide context, which pooling gives at no spatial cost."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.film = nn.Linear(cond_dim, 2 * channels)
        self.pool_proj = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond).chunk(2, dim=1)
        y = self.conv(h) + self.pool_proj(h.mean(dim=(2, 3)))[:, :, None, None]
        y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return h + F.silu(y)


class TinyFlowNet(nn.Module):
    """Velocity network ``v(x_σ, σ, prompt)`` for ``[B, 3, H, W]`` images.

    Args:
        vocab_size: hashed word buckets of the frozen bag-of-words text encoding.
        channels: feature channels of the conv blocks.
        embed_dim: width of the conditioning vector (time + prompt).
        num_blocks: residual conv blocks.
    """

    def __init__(
        self, vocab_size: int = 512, channels: int = 32, embed_dim: int = 64, num_blocks: int = 3
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.word_embedding = nn.Linear(vocab_size, embed_dim, bias=False)
        # Zero init: a bucket's column only moves when a training prompt contains that word
        # (AdamW leaves a zero column whose gradient is always zero at zero, decay or not),
        # so a word never seen in training adds nothing. A random init would give every
        # unseen filler word ("entirely", "everywhere") a random embedding as large as a
        # trained colour word's, i.e. noise on exactly the held-out phrasings.
        nn.init.zeros_(self.word_embedding.weight)
        self.time_proj = nn.Linear(embed_dim, embed_dim)
        self.cond_proj = nn.Linear(embed_dim, embed_dim)
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(_Block(channels, embed_dim) for _ in range(num_blocks))
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)
        # A direct prompt → RGB velocity offset: a constant offset b on v moves the sampled
        # image by −b, so the prompt can steer the colour without first reshaping every
        # FiLM layer (which unconditional pre-training never showed a prompt).
        self.prompt_rgb = nn.Linear(embed_dim, 3)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, bag: torch.Tensor) -> torch.Tensor:
        """Args: ``x`` ``[B,3,H,W]``, ``sigma`` ``[B]`` in [0, 1], ``bag`` ``[B, vocab]``.
        Returns the velocity ``[B,3,H,W]``."""
        t_emb = self.time_proj(_sinusoidal(sigma, self.embed_dim))
        text = self.word_embedding(bag)
        cond = F.silu(self.cond_proj(F.silu(t_emb + text)))
        h = self.conv_in(x)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, cond, use_reentrant=False)
            else:
                h = block(h, cond)
        return self.conv_out(h) + self.prompt_rgb(text)[:, :, None, None]


class TinyFlowPolicy(FlowPolicy):
    """The demo policy: :class:`TinyFlowNet` sampled with ``flow_sde_step``.

    Args:
        height, width: decoded image size in pixels.
        latent_size: side of the square RGB grid the flow runs on (``None``: the full
            ``height × width``). A coarse grid (e.g. 4×4) is decoded by nearest-neighbour
            upsampling: no learned decoder, but per-pixel SDE noise then moves the image's
            mean colour enough for GRPO to see it within a CPU-sized budget.
        shift: timestep shift of the sampling schedule.
        vocab_size, channels, embed_dim, num_blocks: network size (see :class:`TinyFlowNet`).
        device: where the network and latents live.
    """

    sampler = "flow_sde"
    modality = "image"

    def __init__(
        self,
        height: int = 16,
        width: int = 16,
        *,
        latent_size: int | None = None,
        shift: float = 1.0,
        vocab_size: int = 512,
        channels: int = 32,
        embed_dim: int = 64,
        num_blocks: int = 3,
        device: torch.device | str = "cpu",
    ) -> None:
        self.height, self.width = height, width
        self.latent_height = latent_size or height
        self.latent_width = latent_size or width
        if height % self.latent_height or width % self.latent_width:
            raise ValueError(
                f"latent_size {latent_size} must divide the image size {height}x{width}"
            )
        self.latent_size = latent_size
        self.shift = shift
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.net = TinyFlowNet(vocab_size, channels, embed_dim, num_blocks).to(self.device)

    def at_resolution(self, height: int, width: int) -> TinyFlowPolicy:
        """A shallow copy (same network) decoding ``height × width`` images: the latent
        grid stays ``latent_size`` (which must divide the size) or follows the pixels."""
        if (height, width) == (self.height, self.width):
            return self
        latent_h, latent_w = (self.latent_size or height), (self.latent_size or width)
        if height % latent_h or width % latent_w:
            raise ValueError(
                f"latent_size {self.latent_size} must divide the image size {height}x{width}"
            )
        other = copy.copy(self)
        other.height, other.width = height, width
        other.latent_height, other.latent_width = latent_h, latent_w
        return other

    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        if condition_images is not None:
            raise ValueError("TinyFlowPolicy is text-to-image; it takes no conditioning images")
        return Conditioning({"bag": bag_of_words(prompts, self.vocab_size).to(self.device)})

    def schedule(self, num_steps: int) -> Schedule:
        """Shifted sigmas ``[n + 1]``; the network is conditioned on σ, so its timesteps
        are the sigmas themselves (``sigmas[:-1]``), not the 0..1000 scale."""
        return self.schedule_from_sigmas(flow_sigmas(num_steps, self.shift).to(self.device))

    @property
    def schedule_shift(self) -> float:
        return self.shift

    def schedule_from_sigmas(self, sigmas: torch.Tensor) -> Schedule:
        return Schedule(timesteps=sigmas[:-1].clone(), sigmas=sigmas)

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        shape = (batch_size, 3, self.latent_height, self.latent_width)
        gen_device = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=gen_device).to(self.device)

    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The network's velocity; this model's timestep is the noise level σ itself."""
        sigma = torch.as_tensor(timestep, device=latents.device)
        return self.net(latents, sigma.expand(latents.shape[0]), cond.tensors["bag"])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.detach().float()
        if x.shape[-2:] != (self.height, self.width):
            x = F.interpolate(x, size=(self.height, self.width), mode="nearest")
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round()
        return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def trainable_module(self) -> nn.Module:
        return self.net

    def fsdp_block_types(self) -> tuple[type[nn.Module], ...]:
        return (_Block,)

    @property
    def lora_target_modules(self) -> list[str]:
        return ["conv_in", "conv", "film", "pool_proj", "conv_out", "prompt_rgb"]


def random_colour_images(
    batch_size: int, height: int, width: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pre-training data: each image a uniformly random RGB colour plus a faint random
    linear gradient, ``[B, 3, H, W]`` in ``[-1, 1]``."""
    colour = torch.rand(batch_size, 3, 1, 1, generator=generator) * 2 - 1
    ys = torch.linspace(-1, 1, height)[:, None].expand(height, width)
    xs = torch.linspace(-1, 1, width)[None, :].expand(height, width)
    tilt = torch.randn(batch_size, 2, 1, 1, generator=generator) * 0.05
    gradient = (tilt[:, :1] * ys + tilt[:, 1:] * xs).expand(-1, 3, -1, -1)
    return (colour + gradient).clamp(-1, 1)


def pretrain_flow_matching(
    policy: TinyFlowPolicy,
    *,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Unconditional flow-matching pre-training on random-colour images.

    Loss: ``‖v(x_σ, σ, ∅) − (ε − x0)‖²`` with ``x_σ = (1−σ)x0 + σε``, σ ~ U(0, 1) and the
    empty prompt (an all-zero bag of words). The prompt projection gets no gradient and
    stays zero, so the result draws diverse colours and ignores the prompt exactly: a
    base policy whose held-out ``color_match`` is what random colours score (≈ 0.5).

    Returns:
        the loss of every step.
    """
    gen = torch.Generator().manual_seed(seed)
    net = policy.net
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=0.0)
    empty = torch.zeros(batch_size, policy.vocab_size, device=policy.device)
    losses = []
    for _ in range(steps):
        x0 = random_colour_images(batch_size, policy.latent_height, policy.latent_width, gen)
        eps = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(batch_size, generator=gen)
        s = sigma[:, None, None, None]
        x = (1 - s) * x0 + s * eps
        x, eps, x0 = x.to(policy.device), eps.to(policy.device), x0.to(policy.device)
        pred = net(x, sigma.to(policy.device), empty)
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
