"""``hpsv3``: HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"), a
Qwen2-VL-7B preference model with an uncertainty-aware head.

What the official inference computes (the ``hpsv3`` 1.0.0 package of github.com/MizzenAI/HPSv3:
``inference.py`` ``HPSv3RewardInferencer``, ``model/qwen2vl_trainer.py``
``Qwen2VLRewardModelBT``, ``dataset/utils.py``, ``dataset/data_collator_qwen.py``):

1. **Image**: RGB, resized with PIL bicubic to ``smart_resize(h, w, 28, min_pixels,
   max_pixels)`` with ``min_pixels = max_pixels = 256·28² = 200704`` (``prepare_batch``
   hard-codes both), i.e. about 448×448 whatever the input size; then the Qwen2-VL
   processor's ``/255``, CLIP mean/std and 14-pixel patches (the resize is a no-op there).
2. **Text**: one Qwen2-VL-Instruct chat turn (default system message, the image, then
   ``INSTRUCTION.format(text_prompt=prompt) + prompt_with_special_token``, generation prompt),
   the added token ``<|Reward|>`` once; right padding.
3. **Backbone**: the custom ``forward`` embeds the tokens, scatters the vision tower's
   output into the ``<|image_pad|>`` positions and calls the language model *without
   position ids*: every token, image tokens included, gets its sequence index in all three
   M-RoPE sections (plain 1-D RoPE; Qwen2-VL's own ``get_rope_index`` 3-D positions are not
   used, in training either). Last hidden state after the final norm.
4. **Head** (``rm_head_type: ranknet``, ``output_dim: 2``): ``Linear(3584, 1024) → ReLU →
   Dropout(0.05) → Linear(1024, 16) → ReLU → Linear(16, 2)`` in float32, read at the
   ``<|Reward|>`` token: ``(μ, log σ)`` — the ``uncertainty`` loss uses ``σ = exp(output[1])``
   and the README takes ``μ`` as the score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dancegrpo_rewards.base import Reward, RewardBatch, SampleError
from dancegrpo_rewards.kinds.checkpoints import (
    checkpoint_error,
    file_digest,
    folder_digest,
    load_errors_as_checkpoint_error,
    require_dir,
    require_file,
    version_string,
)
from dancegrpo_rewards.kinds.options import (
    OptionError,
    check_device,
    check_dtype,
    check_positive,
    option_path,
    parse_options,
)
from dancegrpo_rewards.kinds.qwen2vl_backbone import (
    MAX_ASPECT_RATIO,
    build_backbone,
    embedding_rows,
    resized_frame_size,
)
from dancegrpo_rewards.kinds.runtime import torch_device, torch_dtype

DOCS_SECTION = "hpsv3"
OUTPUTS = ("score", "sigma")
#: The token HPSv3 adds to Qwen2-VL's tokenizer; the head reads its hidden state.
REWARD_TOKEN = "<|Reward|>"
#: ``prepare_batch``'s ``min_pixels`` and ``max_pixels`` (both 256·28²).
DEFAULT_PIXELS = 256 * 28 * 28
#: Qwen2-VL's image patches are 14 pixels merged 2×2: resized sides are multiples of 28.
PATCH_FACTOR = 28
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
PROMPT_PLACEHOLDER = "{prompt}"

#: HPSv3's text after the image: ``INSTRUCTION`` (``{text_prompt}`` there is ``{prompt}``
#: here) + ``prompt_with_special_token`` of ``dataset/data_collator_qwen.py``. Whitespace
#: matters (trailing spaces are part of the trained token sequence).
DEFAULT_PROMPT_TEMPLATE = "\n".join(
    (
        "",
        "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. ",
        "",
        "**Visual Quality:**  ",
        "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
        "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.",
        "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.",
        "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).",
        "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.",
        "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
        "",
        "**Text Alignment:**  ",
        "Assess how well the image matches the textual prompt across the following sub-dimensions:",
        "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.",
        "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.",
        "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.",
        "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.",
        "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.",
        "Textual prompt - {prompt}",
        "",
        "",
        "",
        "Please provide the overall ratings of this image: <|Reward|>",
        "",
        "END",
        "",
    )
)

#: The Qwen2-VL-Instruct chat template rendered for one user turn ``[image, text]`` with its
#: default system message and the generation prompt (``apply_chat_template(...,
#: add_generation_prompt=True)`` in ``prepare_batch``).
CHAT_FORMAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: Tokens a prompt may not contain: they would add reward positions or vision placeholders.
RESERVED_TOKENS = (
    REWARD_TOKEN,
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

CHECKPOINT_EXPECTED = (
    "HPSv3.safetensors of hub repo MizzenAI/HPSv3 (or a torch .pth state dict): the full "
    "Qwen2VLRewardModelBT state dict — model.*, visual.*, lm_head.*, rm_head.*"
)
BASE_EXPECTED = (
    "the Qwen2-VL-7B-Instruct folder (hub repo Qwen/Qwen2-VL-7B-Instruct): config.json, "
    "tokenizer files and preprocessor_config.json (weights are not read)"
)


def render_text(prompt: str) -> str:
    """The full text of one sample: the chat turn around HPSv3's instruction for ``prompt``."""
    return CHAT_FORMAT.replace(
        "{text}", DEFAULT_PROMPT_TEMPLATE.replace(PROMPT_PLACEHOLDER, prompt)
    )


def smart_resize(height: int, width: int, *, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize`` (HPSv3 ``dataset/utils.py``) with factor 28:
    sides rounded to multiples of 28, then scaled down (floor) or up (ceil) by
    ``√(area ratio)`` into ``[min_pixels, max_pixels]``; sides are at least 28."""
    return resized_frame_size(
        height, width, factor=PATCH_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels
    )


@dataclasses.dataclass(frozen=True)
class HPSv3Options:
    """Options of the ``hpsv3`` kind.

    Attributes:
        checkpoint: ``HPSv3.safetensors`` (or a ``.pth`` state dict; required).
        base_model_path: the Qwen2-VL-7B-Instruct folder (config, tokenizer, processor);
            default ``Qwen2-VL-7B-Instruct/`` beside ``checkpoint``.
        min_pixels, max_pixels: bounds of the resized image's area (HPSv3: both 200704).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (HPSv3 uses flash
            attention where installed).
        device, dtype: as for every model-backed kind (HPSv3 runs bf16; the head runs fp32).
    """

    checkpoint: str | None = None
    base_model_path: str | None = None
    min_pixels: int = DEFAULT_PIXELS
    max_pixels: int = DEFAULT_PIXELS
    attn_implementation: str = "sdpa"
    device: str = "cpu"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise OptionError("checkpoint", "required: the path of HPSv3.safetensors")
        check_positive("min_pixels", self.min_pixels)
        check_positive("max_pixels", self.max_pixels)
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise OptionError(
                "attn_implementation",
                f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {self.attn_implementation!r}",
            )
        check_device("device", self.device)
        check_dtype("dtype", self.dtype)


def build_head(head: Mapping[str, torch.Tensor]) -> nn.Module:
    """The ``rm_head`` of a state dict (keys without the ``rm_head.`` prefix), float32.

    ``ranknet`` without ``rm_head_kwargs`` (the release): ``0: Linear → 1: ReLU →
    2: Dropout → 3: Linear → 4: ReLU → 5: Linear``; ``default``: one ``Linear`` without bias.
    """
    if set(head) == {"weight"}:
        out_features, in_features = head["weight"].shape
        module: nn.Module = nn.Linear(in_features, out_features, bias=False)
    else:
        indices = sorted({int(k.split(".")[0]) for k in head if k.split(".")[0].isdigit()})
        if indices != [0, 3, 5] or len(head) != 6:
            raise KeyError(
                f"rm_head keys {sorted(head)}: expected rm_head.{{0,3,5}}.{{weight,bias}} "
                "(ranknet head) or rm_head.weight"
            )
        linear = {i: head[f"{i}.weight"].shape for i in indices}
        module = nn.Sequential(
            nn.Linear(linear[0][1], linear[0][0]),
            nn.ReLU(),
            nn.Dropout(0.05),
            nn.Linear(linear[3][1], linear[3][0]),
            nn.ReLU(),
            nn.Linear(linear[5][1], linear[5][0]),
        )
    module.load_state_dict(dict(head), strict=True)
    return module.float().eval()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, or a ``torch.save`` state dict (``{"model": sd}`` allowed)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError("holds no tensor state dict")
    return dict(state)


@dataclasses.dataclass
class LoadedHPSv3:
    """A loaded HPSv3: ``Qwen2VLModel``, float32 head, processor, the reward token's id."""

    backbone: Any
    head: nn.Module
    processor: Any
    reward_token_id: int
    device: torch.device
    dtype: torch.dtype


def sequential_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """``[3, N, L]`` M-RoPE position ids equal to the token index in all three sections — what
    Qwen2-VL's language model uses when called without position ids, as HPSv3 calls it."""
    n, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, n, -1)


def reward_positions(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """``[N]`` index of the reward token in each row (exactly one per row, else ValueError)."""
    mask = input_ids == token_id
    counts = mask.sum(dim=1)
    if bool((counts != 1).any()):
        raise ValueError(f"each row must hold the reward token once, counts {counts.tolist()}")
    return mask.int().argmax(dim=1)


def _check_sample(index: int, prompt: str, media: np.ndarray) -> None:
    for token in RESERVED_TOKENS:
        if token in prompt:
            raise SampleError(index, "prompt", f"must not contain the special token {token}")
    height, width = media.shape[0], media.shape[1]
    if min(height, width) == 0 or max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise SampleError(
            index, "media", f"aspect ratio of {height}x{width} exceeds {MAX_ASPECT_RATIO}"
        )


class HPSv3Reward(Reward):
    """HPSv3: ``score`` = μ, ``sigma`` = σ of the uncertainty-aware preference head."""

    kind = "hpsv3"
    modality = "image"
    description = "HPSv3 (Qwen2-VL-7B preference model): mean mu and uncertainty sigma"
    requires_prompt = True

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(HPSv3Options, options, reward_name=name)
        assert self.config.checkpoint is not None
        self.checkpoint = option_path(name, "checkpoint", self.config.checkpoint)
        base = self.config.base_model_path
        self.base_model_path = (
            option_path(name, "base_model_path", base)
            if base
            else self.checkpoint.parent / "Qwen2-VL-7B-Instruct"
        )
        require_file(
            self.checkpoint,
            what=f"reward {name!r}: HPSv3 checkpoint (option 'checkpoint')",
            expected=CHECKPOINT_EXPECTED,
            docs_section=DOCS_SECTION,
        )
        base_what = f"reward {name!r}: Qwen2-VL base folder (option 'base_model_path')"
        require_dir(
            self.base_model_path,
            ["config.json"],
            what=base_what,
            expected=BASE_EXPECTED,
            docs_section=DOCS_SECTION,
        )
        missing = [
            " or ".join(names)
            for names in (
                ("tokenizer.json", "vocab.json"),
                ("preprocessor_config.json", "processor_config.json"),
            )
            if not any((self.base_model_path / n).is_file() for n in names)
        ]
        if missing:
            raise checkpoint_error(
                self.base_model_path,
                base_what,
                BASE_EXPECTED,
                DOCS_SECTION,
                f"folder lacks {', '.join(missing)}",
            )
        output_options = dataclasses.asdict(self.config)
        for key in ("checkpoint", "base_model_path", "device"):
            output_options.pop(key)
        self._version = version_string(
            self.kind,
            {
                "checkpoint": file_digest(self.checkpoint),
                "base_model_path": folder_digest(self.base_model_path),
            },
            output_options,
        )
        self._model: LoadedHPSv3 | None = None

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUTS

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Reads the checkpoint and the base folder's config and processor (eval mode)."""
        from transformers import AutoProcessor, Qwen2VLConfig

        device = torch_device(self.config.device, reward_name=self.name)
        dtype = torch_dtype(self.config.dtype)
        what = f"reward {self.name!r}: HPSv3 checkpoint (option 'checkpoint')"
        with load_errors_as_checkpoint_error(
            self.checkpoint,
            what=what,
            expected=CHECKPOINT_EXPECTED,
            docs_section=DOCS_SECTION,
            problem="could not be read",
        ):
            state_dict = read_checkpoint(self.checkpoint)
        with load_errors_as_checkpoint_error(
            self.checkpoint,
            what=what,
            expected=f"{CHECKPOINT_EXPECTED}, trained from {self.base_model_path}",
            docs_section=DOCS_SECTION,
        ):
            base = str(self.base_model_path)
            config = Qwen2VLConfig.from_pretrained(base, local_files_only=True)
            # As create_model_and_processor: right padding, <|Reward|> appended.
            processor = AutoProcessor.from_pretrained(
                base, local_files_only=True, padding_side="right"
            )
            processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
            head = build_head(
                {
                    k[len("rm_head.") :]: state_dict.pop(k)
                    for k in list(state_dict)
                    if k.startswith("rm_head.")
                }
            )
            rows = embedding_rows(state_dict)
            if len(processor.tokenizer) != rows:
                # HPSv3 resized the embeddings to the extended tokenizer's length.
                raise ValueError(
                    f"the base tokenizer has {len(processor.tokenizer)} tokens with {REWARD_TOKEN} "
                    f"but the checkpoint's embeddings have {rows} rows: base_model_path is not "
                    "the model HPSv3 was trained from"
                )
            token_id = int(processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
            backbone = build_backbone(config, state_dict, dtype, self.config.attn_implementation)
            hidden = int(config.text_config.hidden_size)
            first = head.in_features if isinstance(head, nn.Linear) else head[0].in_features
            if first != hidden or _head_outputs(head) != len(OUTPUTS):
                raise ValueError(
                    f"rm_head maps {first} -> {_head_outputs(head)}, expected {hidden} -> 2 (mu, log sigma)"
                )
        self._model = LoadedHPSv3(
            backbone=backbone.to(device),
            head=head.to(device),
            processor=processor,
            reward_token_id=token_id,
            device=device,
            dtype=dtype,
        )

    @property
    def model(self) -> LoadedHPSv3:
        """The loaded model (``load()`` is called on first use if the server did not)."""
        if self._model is None:
            self.load()
        assert self._model is not None
        return self._model

    def validate_sample(self, index: int, prompt: str, media: np.ndarray, metadata: Any) -> None:
        _check_sample(index, prompt, media)

    def prepare_image(self, image: np.ndarray) -> Any:
        """``uint8 [H, W, 3]`` → the PIL image HPSv3 feeds the processor (bicubic resize)."""
        from PIL import Image

        height, width = image.shape[:2]
        h, w = smart_resize(
            height, width, min_pixels=self.config.min_pixels, max_pixels=self.config.max_pixels
        )
        pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
        return pil.resize((w, h), Image.BICUBIC)

    def encode(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        """The processor's tensors (``input_ids`` ``[N, L]`` right-padded, ``pixel_values``,
        ``image_grid_thw``, ``attention_mask``)."""
        for index, (prompt, image) in enumerate(zip(batch.prompts, batch.media, strict=True)):
            _check_sample(index, prompt, image)
        # Images already have their final size (multiples of 28): the processor only
        # rescales, normalises and patchifies.
        inputs = self.model.processor(
            text=[render_text(p) for p in batch.prompts],
            images=[self.prepare_image(m) for m in batch.media],
            padding=True,
            return_tensors="pt",
            do_resize=False,
        )
        return dict(inputs)

    def raw_outputs(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N, 2]`` float32 ``(μ, log σ)``: the head at the reward token's hidden state."""
        model = self.model
        tensors = {key: value.to(model.device) for key, value in inputs.items()}
        tensors["pixel_values"] = tensors["pixel_values"].to(model.dtype)
        hidden = model.backbone(
            **tensors, position_ids=sequential_positions(tensors["input_ids"]), use_cache=False
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        at = reward_positions(tensors["input_ids"], model.reward_token_id)
        return model.head(hidden[rows, at].float())

    @torch.inference_mode()
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``score`` = μ and ``sigma`` = exp(log σ), float32 ``(N,)`` each."""
        raw = self.raw_outputs(self.encode(batch)).double().cpu()
        return {
            "score": raw[:, 0].numpy().astype(np.float32),
            "sigma": raw[:, 1].exp().numpy().astype(np.float32),
        }


def _head_outputs(head: nn.Module) -> int:
    last = head if isinstance(head, nn.Linear) else head[-1]
    return int(last.out_features)
