"""``pickscore``: PickScore_v1 (Kirstain et al. 2023, "Pick-a-Pic"), a human-preference reward.

PickScore is a CLIP-H/14 fine-tuned on Pick-a-Pic preferences, released as a Hugging Face
``CLIPModel`` (hub repo ``yuvalkirstain/PickScore_v1``) that is used with the processor of
its base model (hub repo ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). The score is the
official one (github.com/yuvalkirstain/PickScore, README "Inference with PickScore"):

    score = logit_scale.exp() * cos(image_features, text_features)

with both feature vectors L2-normalised. Preprocessing is the official processor's, as
PickScore ran it (transformers 4.27): PIL images through ``CLIPImageProcessor`` — shortest
side resized (bicubic, PIL) to 224, centre crop 224×224, ``/255``, OpenAI CLIP mean/std —
and the CLIP tokenizer with ``padding=True, truncation=True, max_length=77``. transformers 5
defaults to a torchvision image processor whose bicubic resize differs (up to ~0.015 in
normalised pixels); the PIL one is loaded explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancegrpo_rewards.base import Reward, RewardBatch
from dancegrpo_rewards.kinds import hf_clip_common as hf
from dancegrpo_rewards.kinds.checkpoints import (
    checkpoint_error,
    folder_digest,
    load_errors_as_checkpoint_error,
    require_dir,
    version_string,
)
from dancegrpo_rewards.kinds.options import (
    OptionError,
    check_device,
    check_dtype,
    check_non_negative,
    option_path,
    parse_options,
)
from dancegrpo_rewards.kinds.runtime import TextFeatureCache, torch_device, torch_dtype

DOCS_SECTION = "pickscore"
#: The text context of every CLIP tokenizer; PickScore truncates to it.
MAX_TEXT_TOKENS = 77
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
MODEL_EXPECTED = (
    "the PickScore_v1 folder (hub repo yuvalkirstain/PickScore_v1): config.json of a "
    "CLIPModel and its weights (model.safetensors or pytorch_model.bin)"
)
PROCESSOR_EXPECTED = (
    "the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K: preprocessor_config.json and the "
    "CLIP tokenizer files (tokenizer.json, or vocab.json + merges.txt, and tokenizer_config.json)"
)


@dataclasses.dataclass(frozen=True)
class PickScoreOptions:
    """Options of the ``pickscore`` kind.

    Attributes:
        path: the PickScore_v1 ``CLIPModel`` folder (required).
        processor_path: the folder holding the processor files (laion's CLIP-ViT-H-14);
            default ``path``, which must then hold them.
        device, dtype, text_cache_size: as for every model-backed kind.
    """

    path: str | None = None
    processor_path: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    text_cache_size: int = 4096

    def __post_init__(self) -> None:
        if not self.path:
            raise OptionError("path", "required: the PickScore_v1 CLIPModel folder")
        check_device("device", self.device)
        check_dtype("dtype", self.dtype)
        check_non_negative("text_cache_size", self.text_cache_size)


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected feature.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def load_pil_image_processor(path: Path) -> Any:
    """The PIL-based ``CLIPImageProcessor`` of a folder (transformers 4's default, 5's ``Pil``)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class  # transformers >= 5
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL/numpy one
        from transformers import CLIPImageProcessor as processor_class
    return processor_class.from_pretrained(str(path), local_files_only=True)


@dataclasses.dataclass
class PickScoreModel:
    """A loaded PickScore: ``CLIPModel``, tokenizer and PIL image processor."""

    model: Any
    tokenizer: Any
    image_processor: Any
    device: torch.device
    dtype: torch.dtype

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the checkpoint (about 100 for PickScore_v1)."""
        return float(self.model.logit_scale.detach().float().exp())

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``[N, D]`` float32 L2-normalised text features (padded to the longest, ≤ 77 tokens)."""
        tokens = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=MAX_TEXT_TOKENS,
            return_tensors="pt",
        )
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return torch.nn.functional.normalize(_features(out).float(), dim=-1)

    def encode_images(self, media: Sequence[np.ndarray]) -> torch.Tensor:
        """``[N, D]`` float32 L2-normalised features of ``uint8 [H, W, 3]`` images."""
        from PIL import Image

        images = [Image.fromarray(np.ascontiguousarray(m), mode="RGB") for m in media]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return torch.nn.functional.normalize(_features(out).float(), dim=-1)


class PickScoreReward(Reward):
    """PickScore_v1: ``score = exp(logit_scale) * cos(image, prompt)`` (about 15–25 on real images)."""

    kind = "pickscore"
    modality = "image"
    description = "PickScore_v1 (Pick-a-Pic): exp(logit_scale) * cosine(image, prompt)"
    requires_prompt = True

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(PickScoreOptions, options, reward_name=name)
        assert self.config.path is not None
        self.path = option_path(name, "path", self.config.path)
        processor = self.config.processor_path
        self.processor_path = (
            option_path(name, "processor_path", processor) if processor else self.path
        )
        model_what = f"reward {name!r}: PickScore model folder (option 'path')"
        require_dir(
            self.path,
            [hf.CONFIG_FILE],
            what=model_what,
            expected=MODEL_EXPECTED,
            docs_section=DOCS_SECTION,
        )
        if not hf.has_weights(self.path):
            raise checkpoint_error(
                self.path, model_what, MODEL_EXPECTED, DOCS_SECTION, "folder holds no weights"
            )
        key = "processor_path" if processor else "path"
        processor_what = f"reward {name!r}: processor folder (option {key!r})"
        require_dir(
            self.processor_path,
            [],
            what=processor_what,
            expected=PROCESSOR_EXPECTED,
            docs_section=DOCS_SECTION,
        )
        missing = []
        if not hf.has_processor_config(self.processor_path):
            missing.append(" or ".join(hf.PROCESSOR_FILES))
        if not _has_tokenizer(self.processor_path):
            missing.append(" or ".join(_TOKENIZER_FILES))
        if missing:
            hint = "" if processor else " (set 'processor_path' to laion's CLIP-ViT-H-14 folder)"
            raise checkpoint_error(
                self.processor_path,
                processor_what,
                PROCESSOR_EXPECTED,
                DOCS_SECTION,
                f"folder lacks {', '.join(missing)}{hint}",
            )
        digests = {"path": folder_digest(self.path)}
        if self.processor_path != self.path:
            digests["processor_path"] = folder_digest(self.processor_path)
        self._version = version_string(self.kind, digests, {"dtype": self.config.dtype})
        self._model: PickScoreModel | None = None
        self._text_cache = TextFeatureCache(self.config.text_cache_size)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("score",)

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Loads model, tokenizer and image processor (local files only, eval mode)."""
        from transformers import AutoTokenizer, CLIPModel

        device = torch_device(self.config.device, reward_name=self.name)
        dtype = torch_dtype(self.config.dtype)
        with load_errors_as_checkpoint_error(
            self.path,
            what=f"reward {self.name!r}: PickScore model folder (option 'path')",
            expected=MODEL_EXPECTED,
            docs_section=DOCS_SECTION,
        ):
            model = CLIPModel.from_pretrained(str(self.path), local_files_only=True)
        with load_errors_as_checkpoint_error(
            self.processor_path,
            what=f"reward {self.name!r}: processor folder",
            expected=PROCESSOR_EXPECTED,
            docs_section=DOCS_SECTION,
        ):
            tokenizer = AutoTokenizer.from_pretrained(
                str(self.processor_path), local_files_only=True
            )
            image_processor = load_pil_image_processor(self.processor_path)
        self._model = PickScoreModel(
            model=model.to(device=device, dtype=dtype).eval(),
            tokenizer=tokenizer,
            image_processor=image_processor,
            device=device,
            dtype=dtype,
        )
        self._text_cache = TextFeatureCache(self.config.text_cache_size)

    @property
    def model(self) -> PickScoreModel:
        """The loaded model (``load()`` is called on first use if the server did not)."""
        if self._model is None:
            self.load()
        assert self._model is not None
        return self._model

    @torch.inference_mode()
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``score = exp(logit_scale) * cos(image, prompt)``, float32 ``(N,)``."""
        model = self.model
        image_features = model.encode_images(list(batch.media))
        text_features = self._text_cache.features(batch.prompts, model.encode_text)
        cosine = (image_features * text_features).sum(dim=-1)
        return {"score": (model.logit_scale * cosine).cpu().numpy().astype(np.float32)}
