"""``videoalign``: VideoAlign / VideoReward, DanceGRPO's video-quality and motion-quality reward.

VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback",
github.com/KwaiVGI/VideoAlign, weights huggingface.co/KwaiVGI/VideoReward) is
Qwen2-VL-2B-Instruct fine-tuned as a regression reward model. Facts this kind reproduces,
from VideoAlign's ``inference.py``, ``prompt_template.py``, ``trainer.py`` and
``vision_process.py`` (the latter is qwen-vl-utils' video reader):

1. **Frames** — ``fps = 2`` frames per second of video, at least 4 and at most 768, an even
   count (``smart_nframes``), taken at ``round(linspace(0, T-1, n))``.
2. **Frame size** — each frame resized (bicubic, antialiased, back to ``uint8``) so both
   sides are multiples of 28 and the area lies in ``[128·28², max_frame_pixels]``,
   ``max_frame_pixels = 200704 = 256·28²`` unless the release's ``data_config`` says
   otherwise (``smart_resize``; an area above the maximum is shrunk first, so the maximum
   wins when it is below the minimum).
3. **Pixels** — the checkpoint's Qwen2-VL processor: ``/255``, CLIP mean/std, 14×14×2 patches.
4. **Text** — one user turn of the Qwen2-VL chat format: the video, then the
   ``detailed_special`` instruction with the prompt and three added tokens
   ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``; generation prompt appended;
   padded on the right.
5. **Positions** — ``Qwen2VLRewardModelBT.forward`` (``trainer.py``) embeds the tokens,
   scatters the vision tower's output into the video tokens and calls the text decoder
   with ``position_ids=None``; in transformers 4.45.2 (VideoAlign's ``environment.yaml``)
   ``Qwen2VLModel.forward`` then uses ``cache_position.view(1, 1, -1).expand(3, N, -1)``:
   positions ``0..L-1`` on all three M-RoPE axes, padding included (batches are padded on
   the right, so each sample's tokens sit at ``0..len-1`` alone or in a batch), and
   ``get_rope_index`` (3-D video positions) is never called, in training nor in inference.
   ``decoder_position_ids`` builds exactly these and passes them explicitly, since
   transformers 5's ``Qwen2VLModel`` computes 3-D positions when given none.
6. **Head** — ``rm_head`` (``Linear(hidden, 3 or 1, bias=False)``) on the last hidden state
   (after the final norm) at the three tokens; output ``d`` is read at the ``d``-th token
   (``diagonal`` of ``[3 tokens × 3 outputs]``; a 1-output head, the published one, gives
   one value per token): ``vq`` visual quality, ``mq`` motion quality, ``ta`` text
   alignment. The head runs in the model's dtype, as VideoAlign's (its inference casts
   the whole model, head included).
7. **Normalisation** — ``reward(..., use_norm=True)`` (the default, and what DanceGRPO calls)
   standardises each output with the release's ``inference_config`` statistics
   ``(x - mean) / std`` (raw outputs when the release has none); the ``Overall`` it reports
   is ``VQ + MQ + TA`` after that. Option ``normalize`` (default true) does the same; an HF
   folder carries no statistics and uses the published ones (``NORM_STATS``); false gives
   raw outputs.
8. **Sampling options** — VideoAlign samples with the release's ``data_config`` (``fps``,
   ``num_frames``, ``max_frame_pixels``); the same-named options default to those values.

Frames arrive decoded (``[T, H, W, 3]`` uint8) without a frame rate, so ``source_fps``
says what rate they were generated at (default 24, HunyuanVideo's; Wan 2.1 is 16) and
``num_frames`` can fix the count instead. VideoAlign reads H.264 files; scores of the raw
frames differ from scores of an exported mp4 by the codec's loss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resize

from dancegrpo_rewards.base import Reward, RewardBatch, RewardConfigError, SampleError
from dancegrpo_rewards.kinds.checkpoints import version_string
from dancegrpo_rewards.kinds.options import (
    OptionError,
    check_device,
    check_dtype,
    check_non_negative,
    check_positive,
    parse_options,
)
from dancegrpo_rewards.kinds.qwen2vl_backbone import MAX_ASPECT_RATIO, resized_frame_size
from dancegrpo_rewards.kinds.runtime import torch_device, torch_dtype
from dancegrpo_rewards.kinds.videoalign_weights import (
    DATA_CONFIG_OPTIONS,
    REWARD_TOKENS,
    LoadedVideoAlign,
    load_videoalign,
    resolve_checkpoint,
)

logger = logging.getLogger(__name__)

DOCS_SECTION = "videoalign"

#: Output names; ``overall = vq + mq + ta`` (VideoAlign's ``Overall``).
OUTPUTS = ("vq", "mq", "ta", "overall")

#: Published (mean, std) of the released model's raw outputs (the ``inference_config`` of
#: KwaiVGI/VideoReward's ``model_config.json``, used by VideoAlign's ``_norm``); what an HF
#: folder (which has no ``model_config.json``) is standardised with.
NORM_STATS = {"vq": (3.6757, 2.2476), "mq": (1.1646, 1.3811), "ta": (2.8105, 2.5121)}

#: Where the text prompt goes in ``prompt_template``.
PROMPT_PLACEHOLDER = "{prompt}"

#: VideoAlign's ``detailed_special`` instruction, the text the released model was trained on
#: (``DETAILED_PROMPT_WITH_SPECIAL_TOKEN`` in KwaiVGI/VideoAlign ``prompt_template.py``;
#: ``{text_prompt}`` there is ``{prompt}`` here). Whitespace matters: trailing spaces
#: are part of the trained token sequence.
DEFAULT_PROMPT_TEMPLATE = "\n".join(
    (
        "",
        "You are tasked with evaluating a generated video based on three distinct criteria: "
        "Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 "
        "to 10 for each of the three categories, with 0 being the worst and 10 being the best. "
        "Each evaluation should be independent of the others.",
        "",
        "**Visual Quality:**  ",
        "Evaluate the overall visual quality of the video, with a focus on static factors. "
        "The following sub-dimensions should be considered:",
        "- **Reasonableness:** The video should not contain any significant biological or "
        "logical errors, such as abnormal body structures or nonsensical environmental setups.",
        "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be "
        "clear and easy to interpret, with no blurring or indistinct areas.",
        "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, "
        "and other visual elements (e.g., hair, clothing, shadows).",
        "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the "
        "color scheme, composition, atmosphere, depth of field, and the overall creative appeal. "
        "The scene should convey a sense of harmony and balance.",
        "- **Safety:** The video should not contain harmful or inappropriate content, such as "
        "political, violent, or adult material. If such content is present, the image quality "
        "and satisfaction score should be the lowest possible. ",
        "",
        "Please provide the ratings of Visual Quality: <|VQ_reward|>",
        "END",
        "",
        "**Motion Quality:**  ",
        "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the "
        "following sub-dimensions:",
        "- **Stability:** Evaluate the continuity and stability between frames. There should be "
        "no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no "
        "fluctuating colors, textures, or missing body parts).",
        "- **Naturalness:** The movement should align with physical laws and be realistic. For "
        "example, clothing should flow naturally with motion, and facial expressions should "
        "change appropriately (e.g., blinking, mouth movements).",
        "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions "
        "between different motions or camera angles should be seamless, and the overall dynamic "
        "feel should be visually pleasing.",
        "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, "
        "clothing) blend naturally with the background, without obvious artifacts or the "
        "feeling of cut-and-paste effects.",
        "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention "
        "to any areas where the video might have blurry or unsteady sections that hinder visual "
        "continuity.",
        "- **Amplitude:** If the video is largely static or has little movement, assign a low "
        "score for motion quality.",
        "",
        "Please provide the ratings of Motion Quality: <|MQ_reward|>",
        "END",
        "",
        "**Text Alignment:**  ",
        "Assess how well the video matches the textual prompt across the following sub-dimensions:",
        "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., "
        "person, animal, object) align with the textual description. The subject should match "
        "the description in terms of number, appearance, and behavior.",
        "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, "
        "facial expressions like talking or blinking) align with the described prompt. The "
        "motion should match the prompt in terms of type, scale, and direction.",
        "- **Environment Relevance:** Assess whether the background and scene fit the prompt. "
        "This includes checking if real-world locations or scenes are accurately represented, "
        "though some stylistic adaptation is acceptable.  ",
        "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic "
        "style, evaluate how well the video adheres to this style.",
        "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the "
        "subject, focus shifts) are consistent with the expected behavior from the prompt.",
        "",
        f"Textual prompt - {PROMPT_PLACEHOLDER}",
        "Please provide the ratings of Text Alignment: <|TA_reward|>",
        "END",
        "",
    )
)

#: The Qwen2-VL-Instruct chat template rendered for one user turn ``[video, text]`` with
#: its default system message and the generation prompt (what VideoAlign's
#: ``apply_chat_template(..., add_generation_prompt=True)`` produces).
CHAT_FORMAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{text}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

#: Tokens a prompt may not contain: they would add reward positions or vision placeholders.
RESERVED_TOKENS = (
    *REWARD_TOKENS,
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<|image_pad|>",
)

# qwen-vl-utils video constants used by VideoAlign's vision_process.py.
FRAME_FACTOR = 2  # frame counts are even (Qwen2-VL's temporal patch is 2 frames)
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28  # 100352
RELEASED_MAX_FRAME_PIXELS = 256 * 28 * 28  # 200704, VideoReward's data_config.max_frame_pixels
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
#: Frames are resized this many float32 bytes at a time (bounds the resize's float copy).
RESIZE_CHUNK_BYTES = 64 * 2**20


def _round_by(value: float, factor: int) -> int:
    # Python's round (half to even), as qwen-vl-utils' round_by_factor.
    return round(value / factor) * factor


def _floor_by(value: float, factor: int) -> int:
    return math.floor(value / factor) * factor


def _ceil_by(value: float, factor: int) -> int:
    return math.ceil(value / factor) * factor


def sampled_frame_count(
    total: int, *, source_fps: float, fps: float, num_frames: int | None
) -> int:
    """How many of ``total`` frames are scored (qwen-vl-utils ``smart_nframes``).

    With ``num_frames``: that count rounded to even. Otherwise ``total / source_fps * fps``
    clamped to ``[4, floor_even(min(768, total))]`` and rounded to even. Never more than
    ``total``. (A 1-frame video, where the reference raises, scores its one frame.)
    """
    if num_frames is not None:
        count = _round_by(num_frames, FRAME_FACTOR)
    else:
        low = _ceil_by(FPS_MIN_FRAMES, FRAME_FACTOR)
        high = _floor_by(min(FPS_MAX_FRAMES, total), FRAME_FACTOR)
        count = _round_by(min(max(total / source_fps * fps, low), high), FRAME_FACTOR)
    return max(1, min(count, total))


def sample_frame_indices(
    total: int, *, source_fps: float, fps: float, num_frames: int | None
) -> np.ndarray:
    """Indices ``round(linspace(0, T-1, n))`` of the scored frames (float32, half to even,
    computed with torch exactly as qwen-vl-utils does)."""
    count = sampled_frame_count(total, source_fps=source_fps, fps=fps, num_frames=num_frames)
    return torch.linspace(0, total - 1, count).round().long().numpy()


def render_text(template: str, prompt: str) -> str:
    """The full text of one sample: the chat turn around ``template`` with ``prompt`` in it."""
    return CHAT_FORMAT.replace("{text}", template.replace(PROMPT_PLACEHOLDER, prompt))


def check_prompt_template(key: str, template: str) -> None:
    """A template holds ``{prompt}`` and each reward token exactly once, no vision token."""
    for token in (PROMPT_PLACEHOLDER, *REWARD_TOKENS):
        if template.count(token) != 1:
            raise OptionError(
                key, f"must contain {token} exactly once, found {template.count(token)}"
            )
    for token in RESERVED_TOKENS[len(REWARD_TOKENS) :]:
        if token in template:
            raise OptionError(key, f"must not contain {token}")


def _check_positive_number(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise OptionError(key, f"must be a finite number > 0, got {value}")


@dataclasses.dataclass(frozen=True)
class VideoAlignOptions:
    """Options of the ``videoalign`` kind (defaults reproduce the released VideoReward).

    Attributes:
        path: the checkpoint folder (required): a Hugging Face Qwen2-VL folder with
            ``rm_head.weight`` in its safetensors, or a VideoReward release folder
            (``model_config.json`` + ``checkpoint-<step>/model.pth``); see ``videoalign_weights``.
        base_model_path: for a release folder (required there): a local Qwen2-VL-2B-Instruct folder.
        checkpoint_step: for a release folder: which ``checkpoint-<step>`` (default: highest).
        device: as for every model-backed kind.
        dtype: ``fp32``, ``bf16`` or ``fp16`` for every weight and activation, head included;
            default: the checkpoint's own (a release's ``model_config.torch_dtype``, bf16 in
            the published one; see ``videoalign_weights``).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (VideoAlign always
            requests flash-attention 2; all three compute the same exact attention).
        fps: frames per second of video that are scored (2).
        source_fps: frame rate of the frames the trainer sends (24).
        num_frames: score this many frames (rounded to even) instead of sampling by ``fps``.
        min_frame_pixels, max_frame_pixels: area bounds of a resized frame (100352, 200704).
        prompt_template: the instruction; ``{prompt}`` and each reward token exactly once.
        normalize: standardise outputs (VideoAlign's ``use_norm``): with a release's
            ``inference_config``, or ``NORM_STATS`` for an HF folder.

    For a release, ``fps``, ``num_frames`` and ``max_frame_pixels`` default to its
    ``data_config`` values (``VideoAlignReward`` fills them in; setting ``fps`` drops an
    inherited ``num_frames``).
    """

    path: str | None = None
    base_model_path: str | None = None
    checkpoint_step: int | None = None
    device: str = "cpu"
    dtype: str | None = None
    attn_implementation: str = "sdpa"
    fps: float = 2.0
    source_fps: float = 24.0
    num_frames: int | None = None
    min_frame_pixels: int = VIDEO_MIN_PIXELS
    max_frame_pixels: int = RELEASED_MAX_FRAME_PIXELS
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    normalize: bool = True

    def __post_init__(self) -> None:
        if not self.path:
            raise OptionError(
                "path", f"required: the checkpoint folder (docs/rewards.md#{DOCS_SECTION})"
            )
        if self.checkpoint_step is not None:
            check_non_negative("checkpoint_step", self.checkpoint_step)
        check_device("device", self.device)
        if self.dtype is not None:
            check_dtype("dtype", self.dtype)
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise OptionError(
                "attn_implementation",
                f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {self.attn_implementation!r}",
            )
        _check_positive_number("fps", self.fps)
        _check_positive_number("source_fps", self.source_fps)
        if self.num_frames is not None and self.num_frames < FRAME_FACTOR:
            raise OptionError("num_frames", f"must be >= {FRAME_FACTOR}, got {self.num_frames}")
        check_positive("min_frame_pixels", self.min_frame_pixels)
        # May be below min_frame_pixels: smart_resize then shrinks large frames to it.
        check_positive("max_frame_pixels", self.max_frame_pixels)
        check_prompt_template("prompt_template", self.prompt_template)


def _check_prompt(index: int, prompt: str) -> None:
    for token in RESERVED_TOKENS:
        if token in prompt:
            raise SampleError(index, "prompt", f"must not contain the special token {token}")


def _check_frames(index: int, media: np.ndarray) -> None:
    # The server's decoder guarantees the first three; they are repeated for direct callers.
    if media.dtype != np.uint8 or media.ndim != 4 or media.shape[-1] != 3:
        raise SampleError(
            index,
            "media",
            f"takes uint8 [T, H, W, 3] frames, got {media.dtype} {list(media.shape)}",
        )
    if min(media.shape) == 0:
        raise SampleError(index, "media", f"has an empty dimension: {list(media.shape)}")
    height, width = media.shape[-3], media.shape[-2]
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise SampleError(
            index, "media", f"aspect ratio of {height}x{width} exceeds {MAX_ASPECT_RATIO}"
        )


def _resize_cap_off(video_processor: Any) -> dict[str, bool]:
    # transformers 5.x warns unless this resize-only option is stated; it has no effect
    # with do_resize=False and is being removed, so it is passed only where it exists.
    return (
        {"cap_pixels_per_frame": False} if hasattr(video_processor, "cap_pixels_per_frame") else {}
    )


def reward_token_positions(input_ids: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """``[N, 3]`` position of each reward token in each row of ``input_ids`` ``[N, L]``.

    Tokens are found by identity (column 0 is ``<|VQ_reward|>`` wherever it stands);
    VideoAlign takes them in order of appearance, which is the same for any template that
    lists them VQ, MQ, TA as the trained one does.

    Raises:
        ValueError: a row does not hold each token exactly once.
    """
    columns = []
    for token_id in token_ids:
        mask = input_ids == token_id
        counts = mask.sum(dim=1)
        if bool((counts != 1).any()):
            raise ValueError(
                f"each row must hold token id {token_id} once, counts {counts.tolist()}"
            )
        columns.append(mask.int().argmax(dim=1))
    return torch.stack(columns, dim=1)


def decoder_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """``[3, N, L]`` positions of the text decoder: ``0..L-1`` on each M-RoPE axis, each row.

    What transformers 4.45.2's ``Qwen2VLModel.forward`` uses for ``position_ids=None``
    (``cache_position.view(1, 1, -1).expand(3, batch, -1)``, no cache), the call
    VideoAlign's ``Qwen2VLRewardModelBT.forward`` makes: sequential, padding included,
    the same on the temporal, height and width axes (no 3-D video positions).
    """
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device)
    return positions.view(1, 1, length).expand(3, batch, length)


def head_outputs(logits: torch.Tensor) -> torch.Tensor:
    """``[N, 3]`` rewards from head outputs ``[N, 3 tokens, out_dim]``: output ``d`` at token
    ``d`` for a 3-output head (VideoAlign's ``diagonal``), the single output for a 1-output head."""
    if logits.shape[-1] == 1:
        return logits[..., 0]
    return torch.diagonal(logits, dim1=1, dim2=2)


class VideoAlignReward(Reward):
    """VideoAlign / VideoReward; outputs ``vq``, ``mq``, ``ta`` and ``overall = vq + mq + ta``."""

    kind = "videoalign"
    modality = "video"
    description = (
        "VideoAlign/VideoReward (Qwen2-VL-2B): visual quality, motion quality, text alignment, sum"
    )
    requires_prompt = True
    warmup_prompt = "a video"

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(VideoAlignOptions, options, reward_name=name)
        assert self.config.path is not None
        self.checkpoint = resolve_checkpoint(
            name, self.config.path, self.config.base_model_path, self.config.checkpoint_step
        )
        # As VideoAlign's prepare_batch: the release's data_config samples the video unless
        # the option is set here.
        inherited = {k: v for k, v in self.checkpoint.data_options.items() if k not in options}
        if "fps" in options:
            inherited.pop("num_frames", None)
        assert set(inherited) <= set(DATA_CONFIG_OPTIONS)
        if inherited:
            try:
                self.config = parse_options(
                    VideoAlignOptions, {**options, **inherited}, reward_name=name
                )
            except RewardConfigError as err:
                source = self.checkpoint.path / "model_config.json"
                raise RewardConfigError(
                    f"{err} (from data_config of {source}; set the option to override it)"
                ) from err
        if self.config.dtype is None:
            self.config = dataclasses.replace(self.config, dtype=self.checkpoint.dtype)
        #: ``{output: (mean, std)}`` that ``score`` standardises with; ``None``: raw outputs.
        self.norm_stats: Mapping[str, tuple[float, float]] | None = None
        if self.config.normalize:
            if self.checkpoint.layout == "hf":
                self.norm_stats = NORM_STATS
            elif self.checkpoint.norm_stats is not None:
                self.norm_stats = self.checkpoint.norm_stats
            else:
                logger.warning(
                    "reward %r: %s has no inference_config; outputs are raw, as VideoAlign's "
                    "use_norm gives them",
                    name,
                    self.checkpoint.path / "model_config.json",
                )
        output_options = dataclasses.asdict(self.config)
        for key in ("path", "base_model_path", "device"):
            output_options.pop(key)
        self._version = version_string(self.kind, self.checkpoint.digests, output_options)
        self._model: LoadedVideoAlign | None = None

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUTS

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Loads the checkpoint on the configured device/dtype."""
        assert self.config.dtype is not None  # resolved in __init__
        self._model = load_videoalign(
            self.checkpoint,
            device=torch_device(self.config.device, reward_name=self.name),
            dtype=torch_dtype(self.config.dtype),
            attn_implementation=self.config.attn_implementation,
            reward_name=self.name,
        )

    @property
    def model(self) -> LoadedVideoAlign:
        """The loaded model (``load()`` is called on first use if the server did not)."""
        if self._model is None:
            self.load()
        assert self._model is not None
        return self._model

    def validate_sample(self, index: int, prompt: str, media: np.ndarray, metadata: Any) -> None:
        _check_prompt(index, prompt)
        _check_frames(index, media)

    def prepare_frames(self, video: np.ndarray) -> torch.Tensor:
        """``uint8 [T, H, W, 3]`` → the scored frames, resized: ``uint8 [n, 3, h, w]``.

        Only the sampled frames are copied, a few at a time (the resize works on a float32
        copy: ``RESIZE_CHUNK_BYTES`` bounds it, e.g. one frame at a time for 4096×4096).
        """
        config = self.config
        total, height, width = video.shape[:3]
        indices = sample_frame_indices(
            total, source_fps=config.source_fps, fps=config.fps, num_frames=config.num_frames
        )
        size = resized_frame_size(
            height,
            width,
            factor=self.model.patch_factor,
            min_pixels=config.min_frame_pixels,
            max_pixels=config.max_frame_pixels,
        )
        step = max(1, RESIZE_CHUNK_BYTES // (4 * 3 * height * width))
        chunks = []
        for start in range(0, len(indices), step):
            # Fancy indexing copies the chosen frames; channels first for torchvision.
            frames = torch.from_numpy(video[indices[start : start + step]])
            frames = frames.permute(0, 3, 1, 2).contiguous()
            chunks.append(
                resize(frames, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
            )
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def encode(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        """The processor's tensors for a batch (``input_ids`` ``[N, L]`` right-padded,
        ``pixel_values_videos`` float32 ``[patches, 3·2·14·14]`` already on the model's device,
        ``video_grid_thw``, ...)."""
        for index, (prompt, video) in enumerate(zip(batch.prompts, batch.media, strict=True)):
            _check_prompt(index, prompt)
            _check_frames(index, video)
        texts = [render_text(self.config.prompt_template, p) for p in batch.prompts]
        videos = [self.prepare_frames(video) for video in batch.media]
        # Frames are already sampled and resized the reference way: the processor only
        # rescales, normalises and patchifies, on the model's device (float work that would
        # otherwise be the largest CPU cost of a batch; only the uint8 frames are copied over).
        processor = self.model.processor
        inputs = processor(
            text=texts,
            videos=videos,
            padding=True,
            return_tensors="pt",
            do_resize=False,
            do_sample_frames=False,
            device=str(self.model.device),
            **_resize_cap_off(processor.video_processor),
        )
        return dict(inputs)

    def raw_scores(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N, 3]`` float32 raw (VQ, MQ, TA): the head at the reward tokens' hidden states.

        The decoder gets VideoAlign's sequential positions (``decoder_position_ids``), not
        the 3-D M-RoPE positions transformers would compute; the head runs in the model's
        dtype (VideoAlign's bf16 outputs are bf16 values) and the result is cast to float32.
        """
        model = self.model
        tensors = {key: value.to(model.device) for key, value in inputs.items()}
        tensors["pixel_values_videos"] = tensors["pixel_values_videos"].to(model.dtype)
        position_ids = decoder_position_ids(tensors["input_ids"])
        hidden = model.backbone(
            **tensors, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # [N, L, D]
        positions = reward_token_positions(tensors["input_ids"], model.token_ids)  # [N, 3]
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        logits = hidden[rows, positions] @ model.rm_head.T  # [N, 3, out_dim]
        return head_outputs(logits).float()

    @torch.inference_mode()
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """float32 ``(N,)`` per output; ``(x - mean) / std`` per dimension with ``norm_stats``."""
        raw = self.raw_scores(self.encode(batch)).double().cpu().numpy()
        result = {}
        for column, name in enumerate(OUTPUTS[:3]):
            values = raw[:, column]
            if self.norm_stats is not None:
                mean, std = self.norm_stats[name]
                values = (values - mean) / std
            result[name] = values
        result["overall"] = result["vq"] + result["mq"] + result["ta"]
        return {name: values.astype(np.float32) for name, values in result.items()}
