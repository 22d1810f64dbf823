"""A randomly initialised CLIP ViT-B/32 (224 px) as a ``clip`` reward: files, config, batch.

open_clip builds the architecture from its bundled ``ViT-B-32`` config with random
weights (nothing is downloaded); the state dict is saved as a bare checkpoint that the
``clip`` kind loads strictly, exactly as it would load real weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ARCH = "ViT-B-32"
IMAGE_SIZE = 224
PROMPTS = (
    "a photo of a cat",
    "a red car on a street",
    "an astronaut riding a horse",
    "a bowl of fruit on a table",
    "a watercolor painting of a lighthouse",
    "two dogs playing in the snow",
    "a city skyline at night",
    "a close-up of a sunflower",
)


def write_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Writes random ViT-B/32 weights to ``directory/clip_vit_b32_random.pt`` (cached)."""
    import open_clip
    import torch

    path = directory / "clip_vit_b32_random.pt"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, pretrained=None)
    torch.save(model.state_dict(), path)
    return path


def reward_options(checkpoint: Path) -> dict[str, Any]:
    """Options of the ``clip`` kind for the checkpoint."""
    return {"arch": ARCH, "checkpoint": str(checkpoint), "device": "cpu", "dtype": "fp32"}


def server_config(checkpoint: Path, max_batch_size: int = 8) -> dict[str, Any]:
    """A ``dancegrpo-rewards serve`` config hosting the model as reward ``clip``."""
    return {
        "server": {"host": "127.0.0.1", "grace_period_s": 5},
        "rewards": {
            "clip": {
                "kind": "clip",
                "max_batch_size": max_batch_size,
                "max_queue_delay_ms": 5,
                "max_queue_size": 256,
                "options": reward_options(checkpoint),
            }
        },
    }


def batch(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` random ``uint8 [224, 224, 3]`` images and their prompts."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return images, [PROMPTS[i % len(PROMPTS)] for i in range(n)]
