"""The ``videoalign`` kind: VideoAlign's preprocessing facts, parity with VideoAlign's own
forward (``Qwen2VLRewardModelBT.forward``, written out below) on a tiny Qwen2-VL in the
Hugging Face layout and on tiny VideoReward releases (the published shape and a full-LoRA
variant, against live peft LoRA models), the decoder's positions, dtypes, batch invariance,
normalisation, option and checkpoint errors, and real servers."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dancegrpo_proto.client import RewardServiceError
from dancegrpo_rewards.base import RewardConfigError, SampleError
from dancegrpo_rewards.kinds import videoalign
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.videoalign import (
    CHAT_FORMAT,
    DEFAULT_PROMPT_TEMPLATE,
    NORM_STATS,
    VideoAlignReward,
    decoder_position_ids,
    head_outputs,
    render_text,
    resized_frame_size,
    sample_frame_indices,
    sampled_frame_count,
)
from dancegrpo_rewards.kinds.videoalign_weights import (
    REWARD_TOKENS,
    is_release_folder,
    lora_scaling,
    merge_lora_state_dict,
)
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import videoalign_models
from dancegrpo_testing.reward_checks import (
    assert_batch_invariant,
    assert_serves_like_local,
    batch_of,
    served_reward,
)

# Small frames keep the tiny model's video tokens few; 8 fps sources give 2..8 frames.
OPTIONS = {"min_frame_pixels": 28 * 28, "max_frame_pixels": 56 * 56 * 2, "source_fps": 8.0}
PROMPTS = [
    "a cat jumping on a sofa",
    "x",
    "two dogs running in a park at sunset",
    "a red car",
    "waves",
    "an astronaut riding a horse on the moon, cinematic",
    "b",
    "a bowl of fruit",
]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return videoalign_models.write_hf_folder(tmp_path_factory.mktemp("videoalign") / "hf")


@pytest.fixture(scope="module")
def reward(hf_folder: Path) -> VideoAlignReward:
    loaded = VideoAlignReward("videoalign", {"path": str(hf_folder), **OPTIONS})
    loaded.load()
    return loaded


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> videoalign_models.TinyRelease:
    """Shaped like the published KwaiVGI/VideoReward (1-output head, LoRA r64 on the LLM's
    linear layers, bf16 weights and torch_dtype, config.json beside model_config.json)."""
    pytest.importorskip("peft")
    return videoalign_models.write_release(tmp_path_factory.mktemp("videoreward"))


@pytest.fixture(scope="module")
def full_release(tmp_path_factory: pytest.TempPathFactory) -> videoalign_models.TinyRelease:
    """3-output head, rsLoRA on every Linear/Embedding outside the vision tower, float32."""
    pytest.importorskip("peft")
    return videoalign_models.write_release(
        tmp_path_factory.mktemp("videoreward-full"), variant=videoalign_models.FULL_LORA
    )


@pytest.fixture(params=[v.name for v in videoalign_models.RELEASE_VARIANTS])
def any_release(request: pytest.FixtureRequest) -> videoalign_models.TinyRelease:
    return request.getfixturevalue("release" if request.param == "published" else "full_release")


def release_options(release: videoalign_models.TinyRelease, **extra) -> dict:
    return {
        "path": str(release.release),
        "base_model_path": str(release.base_model),
        **OPTIONS,
        **extra,
    }


# --- VideoAlign's own forward, the reference ------------------------------------------------

#: Frames a 9-frame video at 8 fps is scored on: qwen-vl-utils' smart_nframes clamps
#: 9 / 8 · 2 = 2.25 to 4 frames, at round(linspace(0, 8, 4)) = 0, 3, 5, 8.
PARITY_FRAMES = [0, 3, 5, 8]
#: Frame sizes that smart_resize leaves as they are (multiples of 28 inside OPTIONS' bounds).
PARITY_SIZES = [(28, 56), (56, 56), (28, 28), (56, 28), (28, 84), (84, 56)]


def parity_videos() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, 256, (9, h, w, 3), dtype=np.uint8) for h, w in PARITY_SIZES]


def official_inputs(processor, videos: list[np.ndarray], prompts: list[str]) -> dict:
    """The batch VideoAlign's ``prepare_batch`` builds for these videos: the chat text, the
    sampled frames (already at their smart_resize size), padded on the right."""
    assert processor.tokenizer.padding_side == "right"  # create_model_and_processor sets it
    frames = [torch.from_numpy(v[PARITY_FRAMES]).permute(0, 3, 1, 2) for v in videos]
    return dict(
        processor(
            text=[render_text(DEFAULT_PROMPT_TEMPLATE, p) for p in prompts],
            videos=frames,
            padding=True,
            return_tensors="pt",
            do_resize=False,
            do_sample_frames=False,
            cap_pixels_per_frame=False,
        )
    )


def videoalign_forward(model, inputs: dict, special_token_ids: list[int]) -> torch.Tensor:
    """``[N, 3]`` (VQ, MQ, TA) as VideoAlign's ``Qwen2VLRewardModelBT.forward`` computes them
    (KwaiVGI/VideoAlign ``trainer.py``), step by step in transformers-5 names, independent of
    the kind's code. ``model`` is a ``Qwen2VLForConditionalGeneration`` with an ``rm_head``.

    1. ``inputs_embeds = self.model.embed_tokens(input_ids)``;
    2. ``self.visual(pixel_values_videos.type(self.visual.get_dtype()), grid_thw=...)``
       scattered into the ``video_token_id`` positions (``masked_scatter``);
    3. ``self.model(input_ids=None, position_ids=position_ids, attention_mask=...,
       inputs_embeds=...)`` with ``position_ids`` None (the processor gives none): the text
       decoder (transformers 4.45's ``Qwen2VLModel``, 5's ``Qwen2VLTextModel``) then takes
       ``arange(L)`` on all three M-RoPE axes itself, in both versions;
    4. ``logits = self.rm_head(hidden_states)``; the special-token mask's rows viewed as
       ``[B, 3, N]``; ``diagonal`` when ``output_dim == 3``; viewed as ``[B, -1]``.
    """
    inner = model.model
    input_ids = inputs["input_ids"]
    inputs_embeds = inner.get_input_embeddings()(input_ids)
    pixels = inputs["pixel_values_videos"].type(inner.visual.get_dtype())
    video_embeds = inner.visual(pixels, grid_thw=inputs["video_grid_thw"]).pooler_output
    video_mask = (input_ids == model.config.video_token_id).unsqueeze(-1).expand_as(inputs_embeds)
    video_embeds = video_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
    inputs_embeds = inputs_embeds.masked_scatter(video_mask, video_embeds)
    hidden = inner.language_model(
        input_ids=None,
        position_ids=None,
        attention_mask=inputs["attention_mask"],
        inputs_embeds=inputs_embeds,
        use_cache=False,
    ).last_hidden_state
    logits = model.rm_head(hidden)
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in special_token_ids:
        special = special | (input_ids == token_id)
    pooled = logits[special, ...].view(input_ids.shape[0], 3, -1)
    if model.rm_head.out_features == 3:
        pooled = pooled.diagonal(dim1=1, dim2=2)
    return pooled.reshape(input_ids.shape[0], -1)


def videoalign_rewards(raw: torch.Tensor, stats: dict | None) -> dict[str, np.ndarray]:
    """VideoAlign's ``reward()``: ``_norm`` with ``inference_config``, then Overall = sum."""
    out = {}
    for column, name in enumerate(("vq", "mq", "ta")):
        values = raw[:, column].double().numpy()
        if stats is not None:
            mean, std = stats[name]
            values = (values - mean) / std
        out[name] = values
    out["overall"] = out["vq"] + out["mq"] + out["ta"]
    return out


def release_processor(release: videoalign_models.TinyRelease):
    """As ``create_model_and_processor``: the base processor, right padding, reward tokens."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(
        str(release.base_model), padding_side="right", local_files_only=True
    )
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    return processor


def release_reference_raw(
    release: videoalign_models.TinyRelease, videos: list[np.ndarray], prompts: list[str]
) -> torch.Tensor:
    processor = release_processor(release)
    token_ids = processor.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
    inputs = official_inputs(processor, videos, prompts)
    with torch.inference_mode():
        return videoalign_forward(release.reference.base_model.model, inputs, token_ids)


@pytest.fixture(scope="module")
def videos() -> list[np.ndarray]:
    return videoalign_models.random_videos(8, seed=1)


def test_registry_resolves_videoalign() -> None:
    assert reward_class("videoalign") is VideoAlignReward


def test_default_template_is_videoaligns_detailed_special_text() -> None:
    # Pinned: the exact text (trailing spaces included) was checked character by character
    # against DETAILED_PROMPT_WITH_SPECIAL_TOKEN of KwaiVGI/VideoAlign prompt_template.py.
    digest = hashlib.sha256(DEFAULT_PROMPT_TEMPLATE.encode()).hexdigest()
    assert len(DEFAULT_PROMPT_TEMPLATE) == 3992
    assert digest == "fd7862ecb43bbe39144c6a45a52f886c95a659afb2a231655fd990c2e459976c"
    assert DEFAULT_PROMPT_TEMPLATE.startswith("\nYou are tasked with evaluating a generated video")
    assert DEFAULT_PROMPT_TEMPLATE.endswith(
        "Textual prompt - {prompt}\nPlease provide the ratings of Text Alignment: <|TA_reward|>\nEND\n"
    )
    for token in (*REWARD_TOKENS, "{prompt}"):
        assert DEFAULT_PROMPT_TEMPLATE.count(token) == 1
    order = [DEFAULT_PROMPT_TEMPLATE.index(t) for t in REWARD_TOKENS]
    assert order == sorted(order)  # VQ, MQ, TA: the head's output order


def test_render_text_is_one_qwen2_vl_chat_turn() -> None:
    assert render_text("Rate {prompt}: <|VQ_reward|>", "a {cat}") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "Rate a {cat}: <|VQ_reward|><|im_end|>\n<|im_start|>assistant\n"
    )
    assert CHAT_FORMAT.count("{text}") == 1


@pytest.mark.parametrize(
    ("total", "source_fps", "fps", "num_frames", "expected"),
    [
        (9, 8.0, 2.0, None, 4),  # 2.25 frames → at least 4
        (120, 24.0, 2.0, None, 10),  # 5 s at 2 fps
        (121, 24.0, 2.0, None, 10),  # 10.08 → round to even
        (5000, 24.0, 2.0, None, 416),  # 416.7 → 2·round(208.3)
        (2000, 1.0, 2.0, None, 768),  # at most 768
        (3, 24.0, 2.0, None, 2),  # at most floor_even(T)
        (1, 24.0, 2.0, None, 1),  # one frame: scored alone
        (30, 24.0, 2.0, 7, 8),  # num_frames: 2·round(3.5) = 8 (half to even)
        (30, 24.0, 2.0, 9, 8),  # 2·round(4.5) = 8
        (5, 24.0, 2.0, 16, 5),  # never more than T
    ],
)
def test_frame_count_follows_qwen_vl_utils_smart_nframes(
    total: int, source_fps: float, fps: float, num_frames: int | None, expected: int
) -> None:
    count = sampled_frame_count(total, source_fps=source_fps, fps=fps, num_frames=num_frames)
    assert count == expected


def test_frame_indices_are_rounded_linspace() -> None:
    indices = sample_frame_indices(9, source_fps=8.0, fps=2.0, num_frames=None)
    np.testing.assert_array_equal(indices, [0, 3, 5, 8])  # linspace(0, 8, 4) = 0, 2.67, 5.33, 8
    np.testing.assert_array_equal(
        sample_frame_indices(1, source_fps=8.0, fps=2.0, num_frames=None), [0]
    )


@pytest.mark.parametrize(
    ("height", "width", "min_pixels", "max_pixels", "expected"),
    [
        # 476x840 > 200704 → scale by √(480·832/200704) = 1.4106, floor: 340.3→336, 589.8→588
        (480, 832, 100352, 200704, (336, 588)),
        # 56x56 < 100352 → scale by √(100352/4096) = 4.95, ceil: 316.8→336
        (64, 64, 100352, 200704, (336, 336)),
        (40, 60, 784, 6272, (28, 56)),  # rounded to multiples of 28, inside the bounds
        (10, 10, 784, 6272, (28, 28)),  # never below one 28-pixel patch pair
        # max below min (VideoAlign's DataConfig default 240·320 = 76800 < 100352): the
        # too-large branch runs first: √(480·480/76800) = √3, 277.1 → 252
        (480, 480, 100352, 76800, (252, 252)),
        (64, 64, 100352, 76800, (336, 336)),  # too small: grown past the maximum
    ],
)
def test_frame_size_follows_qwen_vl_utils_smart_resize(
    height: int, width: int, min_pixels: int, max_pixels: int, expected: tuple[int, int]
) -> None:
    size = resized_frame_size(
        height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
    )
    assert size == expected


def test_prepare_frames_samples_and_resizes(reward: VideoAlignReward) -> None:
    video = np.random.default_rng(0).integers(0, 256, (9, 40, 60, 3), dtype=np.uint8)
    frames = reward.prepare_frames(video)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (4, 3, 28, 56)


def test_each_reward_token_is_in_each_row_once_and_padding_is_on_the_right(
    reward: VideoAlignReward, videos: list[np.ndarray]
) -> None:
    inputs = reward.encode(batch_of(videos, PROMPTS))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tokenizer = reward.model.processor.tokenizer
    assert reward.model.token_ids == tuple(tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS)))
    for token_id in reward.model.token_ids:
        assert (ids == token_id).sum(dim=1).tolist() == [1] * len(PROMPTS)
    lengths = mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # prompts and videos of different lengths
    positions = torch.arange(ids.shape[1])
    assert torch.equal(mask.bool(), positions[None, :] < lengths[:, None])


def test_hf_folder_scores_equal_videoaligns_forward(
    reward: VideoAlignReward, hf_folder: Path
) -> None:
    """transformers' own loading of the folder, run through VideoAlign's forward (sequential
    positions) as one right-padded batch; the model's own forward, which computes 3-D M-RoPE
    positions for the video, gives clearly different rewards (so this test can fail)."""
    from safetensors import safe_open
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(str(hf_folder), local_files_only=True)
    model.rm_head = torch.nn.Linear(videoalign_models.HIDDEN_SIZE, 3, bias=False)
    with safe_open(str(hf_folder / "model.safetensors"), framework="pt") as f:
        model.rm_head.weight.data.copy_(f.get_tensor("rm_head.weight"))
    processor = AutoProcessor.from_pretrained(str(hf_folder), local_files_only=True)
    processor.tokenizer.padding_side = "right"
    token_ids = processor.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
    videos, prompts = parity_videos(), PROMPTS[: len(PARITY_SIZES)]
    inputs = official_inputs(processor, videos, prompts)
    assert not bool(inputs["attention_mask"].all())  # a padded batch
    with torch.inference_mode():
        raw = videoalign_forward(model.eval(), inputs, token_ids)
        hidden_3d = model.model(**inputs, use_cache=False).last_hidden_state
    expected = videoalign_rewards(raw, NORM_STATS)
    ours = reward.score(batch_of(videos, prompts))
    for name in reward.output_names:
        np.testing.assert_allclose(ours[name], expected[name], atol=1e-5, rtol=0, err_msg=name)
    assert np.ptp(expected["vq"]) > 1e-2  # the rewards depend on the sample
    ids = inputs["input_ids"]
    rows = torch.arange(len(ids))[:, None]
    at_tokens = torch.stack([(ids == t).int().argmax(dim=1) for t in token_ids], dim=1)
    raw_3d = torch.diagonal(model.rm_head(hidden_3d[rows, at_tokens]), dim1=1, dim2=2)
    assert (raw_3d - raw).abs().max() > 1e-2


def test_decoder_gets_sequential_positions_on_all_three_axes(
    reward: VideoAlignReward, release: videoalign_models.TinyRelease, videos: list[np.ndarray]
) -> None:
    """Fails if the decoder is handed 3-D M-RoPE positions (or none, which transformers 5
    turns into 3-D ones): VideoAlign's decoder saw 0..L-1 on every axis, padding included."""
    bf16 = VideoAlignReward("bf16", release_options(release))
    for scorer in (reward, bf16):
        seen: list[torch.Tensor] = []

        def capture(module, args, kwargs, seen=seen) -> None:
            seen.append(kwargs["position_ids"])

        decoder = scorer.model.backbone.language_model
        handle = decoder.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            inputs = scorer.encode(batch_of(videos[:3], PROMPTS[:3]))
            scorer.raw_scores(inputs)
        finally:
            handle.remove()
        (positions,) = seen
        batch, length = inputs["input_ids"].shape
        assert positions is not None and tuple(positions.shape) == (3, batch, length)
        assert torch.equal(positions.cpu(), torch.arange(length).expand(3, batch, length))
    assert torch.equal(
        decoder_position_ids(torch.zeros(2, 5, dtype=torch.long)),
        torch.tensor([[[0, 1, 2, 3, 4]] * 2] * 3),
    )


def test_batch_of_8_equals_one_by_one(reward: VideoAlignReward, videos: list[np.ndarray]) -> None:
    assert len({v.shape for v in videos}) == len(videos)
    assert reward.output_names == ("vq", "mq", "ta", "overall")
    together = assert_batch_invariant(reward, batch_of(videos, PROMPTS), atol=1e-5)
    for name in reward.output_names:
        assert together[name].shape == (8,) and together[name].dtype == np.float32


def test_normalize_standardises_raw_outputs_with_the_published_statistics(
    reward: VideoAlignReward, hf_folder: Path, videos: list[np.ndarray]
) -> None:
    raw_reward = VideoAlignReward("raw", {"path": str(hf_folder), **OPTIONS, "normalize": False})
    batch = batch_of(videos[:4], PROMPTS[:4])
    raw, normalized = raw_reward.score(batch), reward.score(batch)
    assert NORM_STATS == {"vq": (3.6757, 2.2476), "mq": (1.1646, 1.3811), "ta": (2.8105, 2.5121)}
    for name, (mean, std) in NORM_STATS.items():
        np.testing.assert_allclose(normalized[name], (raw[name] - mean) / std, atol=1e-6, rtol=0)
    for out in (raw, normalized):
        np.testing.assert_allclose(out["overall"], out["vq"] + out["mq"] + out["ta"], atol=1e-6)


def test_head_reads_output_d_at_token_d_or_one_output_per_token() -> None:
    logits = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)
    assert head_outputs(logits).tolist() == [[0, 4, 8], [9, 13, 17]]
    single = torch.tensor([[[1.0], [2.0], [3.0]]])
    assert head_outputs(single).tolist() == [[1.0, 2.0, 3.0]]


def test_release_scores_equal_videoaligns_forward_in_fp32(
    any_release: videoalign_models.TinyRelease,
) -> None:
    """Both release variants in fp32, loaded and merged by the kind, equal VideoAlign's
    forward on the live peft LoRA model; checkpoint-10 (zero LoRA) equals it with adapters
    disabled. The reward tokens were appended to the base vocabulary (as VideoAlign does:
    151657-151659 on Qwen2-VL-2B's)."""
    videos, prompts = parity_videos(), PROMPTS[: len(PARITY_SIZES)]
    latest = VideoAlignReward("latest", release_options(any_release, dtype="fp32"))
    older = VideoAlignReward(
        "older", release_options(any_release, dtype="fp32", checkpoint_step=any_release.older_step)
    )
    base_vocabulary = len(videoalign_models.tiny_tokenizer())
    assert latest.model.token_ids == tuple(range(base_vocabulary, base_vocabulary + 3))
    batch = batch_of(videos, prompts)
    stats = latest.norm_stats
    expected = videoalign_rewards(release_reference_raw(any_release, videos, prompts), stats)
    for name, values in latest.score(batch).items():
        np.testing.assert_allclose(values, expected[name], atol=1e-5, rtol=0, err_msg=name)
    with any_release.reference.disable_adapter():
        raw = release_reference_raw(any_release, videos, prompts)
    for name, values in older.score(batch).items():
        expected_older = videoalign_rewards(raw, stats)[name]
        np.testing.assert_allclose(values, expected_older, atol=1e-5, rtol=0, err_msg=name)
    assert latest.version != older.version


def test_release_default_runs_bf16_head_included_like_videoalign(
    release: videoalign_models.TinyRelease, full_release: videoalign_models.TinyRelease
) -> None:
    """The default dtype is the release's model_config.torch_dtype (published: bfloat16);
    the head runs in it too, so raw outputs are bf16 values, as VideoAlign's. Against
    VideoAlign's forward on the live LoRA model cast to bf16 (LoRA unmerged), agreement is
    at bf16 rounding; the merged rm_head (a LoRA target in the full variant) is W + s·B·A
    rounded to bf16."""
    import copy

    videos, prompts = parity_videos(), PROMPTS[: len(PARITY_SIZES)]
    default = VideoAlignReward("default", release_options(release))
    assert default.config.dtype == "bf16"
    assert default.model.dtype == default.model.rm_head.dtype == torch.bfloat16
    raw = default.raw_scores(default.encode(batch_of(videos, prompts)))
    assert raw.dtype == torch.float32 and torch.equal(raw, raw.bfloat16().float())
    processor = release_processor(release)
    token_ids = processor.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
    bf16_reference = copy.deepcopy(release.reference.base_model.model).to(torch.bfloat16)
    with torch.inference_mode():
        inputs = official_inputs(processor, videos, prompts)
        expected = videoalign_forward(bf16_reference, inputs, token_ids).float()
    scale = expected.abs().max()
    assert (raw - expected).abs().max() <= 0.05 * scale
    fp32 = VideoAlignReward("fp32", release_options(release, dtype="fp32"))
    assert default.version != fp32.version

    assert VideoAlignReward("full", release_options(full_release)).config.dtype == "fp32"
    full_bf16 = VideoAlignReward("full-bf16", release_options(full_release, dtype="bf16"))
    state = torch.load(full_release.release / "checkpoint-20" / "model.pth", weights_only=True)
    prefix = "base_model.model.rm_head."
    w, a, b = (
        state[prefix + k]
        for k in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight")
    )
    merged = w.float() + full_release.variant.lora_scaling * (b.float() @ a.float())
    assert torch.equal(full_bf16.model.rm_head, merged.bfloat16())


@pytest.mark.parametrize(
    ("torch_dtype", "expected"),
    [
        ("bfloat16", "bf16"),
        ("float16", "fp16"),
        ("float32", "fp32"),
        (None, "bf16"),
        ("auto", "bf16"),
    ],
)
def test_release_dtype_comes_from_model_config(
    tmp_path: Path, release: videoalign_models.TinyRelease, torch_dtype, expected: str
) -> None:
    """model_config.torch_dtype; unset or "auto" → bf16, what VideoVLMRewardInference casts
    to by default. An HF folder runs in its config.json dtype (the tiny one: float32)."""

    def set_dtype(config: dict) -> None:
        config["model_config"]["torch_dtype"] = torch_dtype

    _, options = _release_copy(tmp_path, release, set_dtype)
    options.pop("dtype", None)
    assert VideoAlignReward("va", options).config.dtype == expected
    assert VideoAlignReward("va", {**options, "dtype": "fp32"}).config.dtype == "fp32"


def test_unknown_release_dtype_is_a_checkpoint_error(
    tmp_path: Path, release: videoalign_models.TinyRelease, hf_folder: Path
) -> None:
    def set_dtype(config: dict) -> None:
        config["model_config"]["torch_dtype"] = "int8"

    _, options = _release_copy(tmp_path, release, set_dtype)
    with pytest.raises(CheckpointError, match="torch_dtype 'int8'"):
        VideoAlignReward("va", options)
    assert VideoAlignReward("hf", {"path": str(hf_folder)}).config.dtype == "fp32"


def test_a_release_is_detected_whatever_else_its_folder_holds(
    tmp_path: Path, release: videoalign_models.TinyRelease, full_release, hf_folder: Path
) -> None:
    """VideoAlign's train() writes config.json beside model_config.json: still a release."""
    assert (release.release / "config.json").is_file()
    assert not (full_release.release / "config.json").is_file()
    assert is_release_folder(release.release) and is_release_folder(full_release.release)
    assert not is_release_folder(hf_folder)
    assert VideoAlignReward("va", release_options(release)).checkpoint.layout == "videoreward"
    # model_config.json and config.json without any checkpoint-*/model.pth: an HF folder
    stray = tmp_path / "stray"
    shutil.copytree(hf_folder, stray)
    shutil.copy(release.release / "model_config.json", stray)
    assert not is_release_folder(stray)
    assert VideoAlignReward("va", {"path": str(stray)}).checkpoint.layout == "hf"


def test_sdpa_and_eager_attention_give_the_same_scores(
    release: videoalign_models.TinyRelease,
) -> None:
    """Both compute exact softmax(QKᵀ/√d + mask)·V (as flash-attention 2, which VideoAlign
    requests, does): they differ only in float summation order."""
    batch = batch_of(parity_videos(), PROMPTS[: len(PARITY_SIZES)])
    scores = [
        VideoAlignReward(
            attn, release_options(release, dtype="fp32", attn_implementation=attn)
        ).score(batch)
        for attn in ("sdpa", "eager")
    ]
    for name, values in scores[0].items():
        np.testing.assert_allclose(values, scores[1][name], atol=1e-5, rtol=0, err_msg=name)


def test_releases_score_like_videoalign_through_a_real_server(
    release: videoalign_models.TinyRelease, full_release: videoalign_models.TinyRelease
) -> None:
    """Both head variants served in fp32 by one real server equal VideoAlign's forward on
    the live LoRA models to 1e-3 relative: raw outputs (normalize off, purely relative) and
    normalised ones as VideoAlign's reward() reports them."""
    videos, prompts = parity_videos(), PROMPTS[: len(PARITY_SIZES)]
    releases = {"published": release, "full_lora": full_release}
    rewards = {}
    for name, tiny in releases.items():
        for normalize in (False, True):
            options = release_options(tiny, dtype="fp32", normalize=normalize)
            rewards[f"{name}-{'norm' if normalize else 'raw'}"] = {
                "kind": "videoalign",
                "max_batch_size": 8,
                "options": options,
            }
    config = {"server": {"host": "127.0.0.1"}, "rewards": rewards}
    with served_reward(config, startup_timeout_s=180, metrics=False) as client:
        remote = {
            name: client.score(name, videos=videos, prompts=prompts, timeout=120)
            for name in rewards
        }
    for name, tiny in releases.items():
        raw = release_reference_raw(tiny, videos, prompts)
        stats = VideoAlignReward("stats", release_options(tiny)).norm_stats
        for suffix, expected in (
            ("raw", videoalign_rewards(raw, None)),
            ("norm", videoalign_rewards(raw, stats)),
        ):
            got = remote[f"{name}-{suffix}"]
            for output in ("vq", "mq", "ta", "overall"):
                # raw: relative, nothing absolute; normalised values may sit near 0
                atol = 0 if suffix == "raw" else 1e-5
                np.testing.assert_allclose(
                    got[output], expected[output], rtol=1e-3, atol=atol, err_msg=f"{name} {output}"
                )


def test_merge_lora_state_dict_is_w_plus_s_b_a() -> None:
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    w, bias, a, b = t(2, 3), t(2), t(1, 3), t(2, 1)
    e, ea, eb = t(4, 2), t(1, 4), t(2, 1)
    saved, original, other = t(2, 2), t(2, 2), t(5)
    state = {
        "base_model.model.lin.base_layer.weight": w,
        "base_model.model.lin.base_layer.bias": bias,
        "base_model.model.lin.lora_A.default.weight": a,
        "base_model.model.lin.lora_B.default.weight": b,
        "base_model.model.emb.base_layer.weight": e,
        "base_model.model.emb.lora_embedding_A.default": ea,
        "base_model.model.emb.lora_embedding_B.default": eb,
        "base_model.model.head.original_module.weight": original,
        "base_model.model.head.modules_to_save.default.weight": saved,
        "base_model.model.other": other,
    }
    merged = merge_lora_state_dict(state, 2.0, torch.float32)
    assert set(merged) == {"lin.weight", "lin.bias", "emb.weight", "head.weight", "other"}
    torch.testing.assert_close(merged["lin.weight"], w + 2.0 * b @ a)
    torch.testing.assert_close(merged["emb.weight"], e + 2.0 * (eb @ ea).T)
    assert (
        merged["lin.bias"] is bias and merged["head.weight"] is saved and merged["other"] is other
    )
    with pytest.raises(ValueError, match="lora_enable"):
        merge_lora_state_dict(state, None, torch.float32)
    incomplete = {k: v for k, v in state.items() if "lin.lora_B" not in k}
    with pytest.raises(ValueError, match="incomplete"):
        merge_lora_state_dict(incomplete, 2.0, torch.float32)


def test_lora_scaling_is_alpha_over_rank_or_its_root() -> None:
    assert lora_scaling({"lora_enable": True, "lora_r": 16, "lora_alpha": 32}) == 2.0
    assert (
        lora_scaling({"lora_enable": True, "lora_r": 16, "lora_alpha": 32, "use_rslora": True})
        == 8.0
    )
    assert lora_scaling({"lora_enable": False, "lora_r": 16}) is None


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "path"),
        ({"path": "x", "fps": 0}, "fps"),
        ({"path": "x", "source_fps": -24}, "source_fps"),
        ({"path": "x", "num_frames": 1}, "num_frames"),
        ({"path": "x", "min_frame_pixels": 0}, "min_frame_pixels"),
        ({"path": "x", "max_frame_pixels": 0}, "max_frame_pixels"),
        (
            {"path": "x", "prompt_template": "Rate {prompt} <|VQ_reward|> <|MQ_reward|>"},
            "prompt_template",
        ),
        (
            {"path": "x", "prompt_template": DEFAULT_PROMPT_TEMPLATE.replace("{prompt}", "")},
            "prompt_template",
        ),
        (
            {"path": "x", "prompt_template": DEFAULT_PROMPT_TEMPLATE + "<|video_pad|>"},
            "prompt_template",
        ),
        ({"path": "x", "dtype": "fp64"}, "dtype"),
        ({"path": "x", "device": "gpu"}, "device"),
        ({"path": "x", "attn_implementation": "flash"}, "attn_implementation"),
        ({"path": "x", "normalize": "yes"}, "normalize"),
        ({"path": "x", "checkpoint_step": -1}, "checkpoint_step"),
        ({"path": "x", "frames": 8}, "frames"),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(RewardConfigError, match=f"'{key}'") as err:
        VideoAlignReward("va", options)
    assert "'va'" in str(err.value)


def test_release_and_hf_specific_options_are_checked(
    hf_folder: Path, release: videoalign_models.TinyRelease
) -> None:
    with pytest.raises(RewardConfigError, match="'base_model_path': required"):
        VideoAlignReward("va", {"path": str(release.release)})
    with pytest.raises(
        RewardConfigError, match="'base_model_path': only for a VideoReward release"
    ):
        VideoAlignReward("va", {"path": str(hf_folder), "base_model_path": str(release.base_model)})
    with pytest.raises(CheckpointError, match="no checkpoint-7") as err:
        VideoAlignReward(
            "va",
            {
                "path": str(release.release),
                "base_model_path": str(release.base_model),
                "checkpoint_step": 7,
            },
        )
    assert "found steps: 10, 20" in str(err.value)


def _assert_names_path_and_docs(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert str(path) in message and "expected:" in message
    assert "docs/rewards.md" in message and "'videoalign'" in message


def test_missing_or_incomplete_checkpoints_fail_at_construction(
    tmp_path: Path, hf_folder: Path, release: videoalign_models.TinyRelease
) -> None:
    missing = tmp_path / "VideoReward"
    with pytest.raises(CheckpointError, match="folder not found") as err:
        VideoAlignReward("va", {"path": str(missing)})
    _assert_names_path_and_docs(err, missing)

    no_weights = tmp_path / "no-weights"
    shutil.copytree(hf_folder, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(CheckpointError, match="lacks weights") as err:
        VideoAlignReward("va", {"path": str(no_weights)})
    _assert_names_path_and_docs(err, no_weights)

    adapters = tmp_path / "adapters"
    (adapters / "checkpoint-5").mkdir(parents=True)
    (adapters / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"")
    shutil.copy(release.release / "model_config.json", adapters)
    with pytest.raises(CheckpointError, match="only LoRA adapters") as err:
        VideoAlignReward("va", {"path": str(adapters), "base_model_path": str(release.base_model)})
    _assert_names_path_and_docs(err, adapters / "checkpoint-5")

    no_base = tmp_path / "Qwen2-VL"
    with pytest.raises(CheckpointError, match="folder not found") as err:
        VideoAlignReward("va", {"path": str(release.release), "base_model_path": str(no_base)})
    _assert_names_path_and_docs(err, no_base)


def _release_copy(
    tmp_path: Path, release: videoalign_models.TinyRelease, edit
) -> tuple[Path, dict]:
    """A copy of the release whose ``model_config.json`` went through ``edit(config)``;
    returns the folder and the options that load it."""
    folder = tmp_path / "VideoReward-edited"
    shutil.copytree(release.release, folder)
    config = json.loads((folder / "model_config.json").read_text())
    edit(config)
    (folder / "model_config.json").write_text(json.dumps(config))
    return folder, {"path": str(folder), "base_model_path": str(release.base_model), **OPTIONS}


def test_release_reads_the_special_tokens_whatever_reward_token_says(
    tmp_path: Path, release: videoalign_models.TinyRelease, videos: list[np.ndarray]
) -> None:
    """VideoAlign's Qwen2VLRewardModelBT sets reward_token = "special" whenever the tokens
    were added (use_special_tokens), so "last" (ModelConfig's default) in the file is moot."""

    def last(config: dict) -> None:
        config["model_config"]["reward_token"] = "last"

    folder, options = _release_copy(tmp_path, release, last)
    batch = batch_of(videos[:2], PROMPTS[:2])
    reference = VideoAlignReward("ref", {**options, "path": str(release.release)})
    edited = VideoAlignReward("last", options).score(batch)
    for name, values in reference.score(batch).items():
        np.testing.assert_allclose(edited[name], values, atol=1e-6, rtol=0)

    def no_tokens(config: dict) -> None:
        config["model_config"]["use_special_tokens"] = False

    folder, options = _release_copy(tmp_path / "2", release, no_tokens)
    with pytest.raises(CheckpointError, match="not a special-token VideoAlign model"):
        VideoAlignReward("va", options)


def test_release_normalises_with_its_inference_config_or_not_at_all(
    tmp_path: Path, release: videoalign_models.TinyRelease, videos: list[np.ndarray]
) -> None:
    """As VideoAlign's ``_norm``: the release's own statistics; none there → raw outputs."""
    stats = {"vq": (1.5, 0.5), "mq": (-2.0, 4.0), "ta": (0.25, 3.0)}

    def own_stats(config: dict) -> None:
        config["inference_config"] = {
            f"{name.upper()}_{key}": value
            for name, (mean, std) in stats.items()
            for key, value in (("mean", mean), ("std", std))
        }

    def no_stats(config: dict) -> None:
        del config["inference_config"]

    _, options = _release_copy(tmp_path / "own", release, own_stats)
    _, bare_options = _release_copy(tmp_path / "bare", release, no_stats)
    batch = batch_of(videos[:3], PROMPTS[:3])
    raw = VideoAlignReward("raw", {**options, "normalize": False}).score(batch)
    own = VideoAlignReward("own", options)
    assert own.norm_stats == stats
    normalized = own.score(batch)
    for name, (mean, std) in stats.items():
        np.testing.assert_allclose(normalized[name], (raw[name] - mean) / std, atol=1e-5, rtol=0)
    bare = VideoAlignReward("bare", bare_options)
    assert bare.norm_stats is None
    for name, values in bare.score(batch).items():
        np.testing.assert_allclose(values, raw[name], atol=1e-6, rtol=0)

    def bad_std(config: dict) -> None:
        config["inference_config"]["MQ_std"] = 0

    _, bad_options = _release_copy(tmp_path / "bad", release, bad_std)
    with pytest.raises(CheckpointError, match="MQ_std > 0"):
        VideoAlignReward("va", bad_options)


def test_release_data_config_sets_the_sampling_defaults(
    tmp_path: Path, release: videoalign_models.TinyRelease
) -> None:
    """VideoAlign samples with data_config's fps / num_frames / max_frame_pixels unless the
    caller passes them; options set here win (fps drops an inherited num_frames)."""

    def sampling(config: dict) -> None:
        config["data_config"].update({"fps": 4, "num_frames": 6, "max_frame_pixels": 76800})

    _, options = _release_copy(tmp_path, release, sampling)
    options = {k: v for k, v in options.items() if k not in ("max_frame_pixels", "fps")}
    inherited = VideoAlignReward("va", options).config
    assert (inherited.fps, inherited.num_frames, inherited.max_frame_pixels) == (4.0, 6, 76800)
    overridden = VideoAlignReward("va", {**options, "fps": 1.0, "max_frame_pixels": 5000}).config
    assert (overridden.fps, overridden.num_frames, overridden.max_frame_pixels) == (1.0, None, 5000)
    assert VideoAlignReward("va", {**options, "num_frames": 2}).config.num_frames == 2
    defaults = VideoAlignReward("va", {**options, "path": str(release.release)}).config
    assert (defaults.fps, defaults.num_frames, defaults.max_frame_pixels) == (2.0, None, 200704)

    def one_frame(config: dict) -> None:
        config["data_config"]["num_frames"] = 1

    _, options = _release_copy(tmp_path / "one", release, one_frame)
    with pytest.raises(RewardConfigError, match="'num_frames'.*from data_config of"):
        VideoAlignReward("va", options)

    def multi_pts(config: dict) -> None:
        config["data_config"]["sample_type"] = "multi_pts"

    _, options = _release_copy(tmp_path / "multi", release, multi_pts)
    with pytest.raises(CheckpointError, match="only 'uniform' frame sampling"):
        VideoAlignReward("va", options)


@pytest.mark.parametrize(
    ("removed", "match"),
    [
        ("rm_head.weight", "no rm_head.weight"),
        ("model.layers.1.mlp.up_proj.weight", "missing: model.language_model.layers.1.mlp.up_proj"),
    ],
)
def test_weights_that_do_not_fit_fail_at_load(
    tmp_path: Path, hf_folder: Path, removed: str, match: str
) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(hf_folder, folder)
    weights = load_file(str(folder / "model.safetensors"))
    del weights[removed]  # transformers-4 key names, as save_pretrained writes them
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    broken = VideoAlignReward("va", {"path": str(folder)})
    with pytest.raises(CheckpointError, match=match) as err:
        broken.load()
    _assert_names_path_and_docs(err, folder)


def test_prompts_with_special_tokens_and_extreme_frames_are_rejected(
    reward: VideoAlignReward,
) -> None:
    video = np.zeros((2, 32, 32, 3), np.uint8)
    for token in (*REWARD_TOKENS, "<|video_pad|>"):
        with pytest.raises(SampleError, match="special token") as err:
            reward.validate_sample(3, f"a {token} cat", video, None)
        assert err.value.index == 3 and err.value.field == "prompt"
    with pytest.raises(SampleError, match="aspect ratio") as err:
        reward.validate_sample(0, "a cat", np.zeros((2, 2, 500, 3), np.uint8), None)
    assert err.value.field == "media"
    with pytest.raises(SampleError, match="special token"):
        reward.score(batch_of([video], ["<|TA_reward|>"]))
    for bad in (
        np.zeros((0, 8, 8, 3), np.uint8),
        np.zeros((2, 0, 8, 3), np.uint8),
        np.zeros((8, 8, 3), np.uint8),
        np.zeros((2, 8, 8, 3), np.float32),
    ):
        with pytest.raises(SampleError) as err:
            reward.validate_sample(1, "a cat", bad, None)
        assert err.value.field == "media" and err.value.index == 1


def test_odd_videos_and_prompts_score_like_one_by_one(reward: VideoAlignReward) -> None:
    """Edge inputs the server accepts never reach the processor as errors: 1-3 frames,
    1000 frames, 1x1 and 200:1 frames, prompts with chat tokens, braces, 10k characters."""
    rng = np.random.default_rng(5)

    def video(t: int, h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)

    samples = [
        (video(1, 32, 32), "one frame"),
        (video(2, 32, 32), "two frames"),
        (video(3, 40, 24), "three frames"),
        (video(1000, 24, 24), "a thousand frames"),
        (video(4, 1, 1), "one pixel"),
        (video(4, 1, 200), "a 1x200 strip"),
        (video(4, 200, 1), "a 200x1 strip"),
        (video(4, 32, 32), "a <|im_end|> cat <|endoftext|> <|im_start|>assistant"),
        (video(4, 32, 32), "{prompt} {text} {} END"),
        (video(4, 32, 32), "猫 🐱\u200b\t\n" + "long " * 1998),
    ]
    videos, prompts = [v for v, _ in samples], [p for _, p in samples]
    for index, (v, p) in enumerate(samples):
        reward.validate_sample(index, p, v, None)
    assert len(prompts[-1]) <= 10_000  # the server's MAX_PROMPT_CHARS
    together = reward.score(batch_of(videos, prompts))
    alone = [reward.score(batch_of([v], [p])) for v, p in samples]
    for name in reward.output_names:
        assert np.isfinite(together[name]).all()
        one_by_one = np.concatenate([a[name] for a in alone])
        np.testing.assert_allclose(together[name], one_by_one, atol=1e-4, rtol=0)
    # 1000 frames at 8 fps are 125 s: 250 frames at 2 fps, resized to one 28x28 patch pair
    assert tuple(reward.prepare_frames(videos[3]).shape) == (250, 3, 28, 28)


def test_frames_are_resized_a_few_at_a_time_with_the_same_result(
    reward: VideoAlignReward, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = np.random.default_rng(6).integers(0, 256, (9, 40, 60, 3), dtype=np.uint8)
    whole = reward.prepare_frames(video)
    monkeypatch.setattr(videoalign, "RESIZE_CHUNK_BYTES", 1)  # one frame per chunk
    assert torch.equal(reward.prepare_frames(video), whole)
    frames = torch.from_numpy(video[[0, 3, 5, 8]]).permute(0, 3, 1, 2)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    expected = resize(frames, [28, 56], interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(whole, expected)


def test_version_names_the_kind_and_changes_with_output_options(hf_folder: Path) -> None:
    a = VideoAlignReward("a", {"path": str(hf_folder)})
    assert a.version.startswith("videoalign-")
    assert a.version == VideoAlignReward("b", {"path": str(hf_folder), "device": "cpu"}).version
    assert a.version != VideoAlignReward("c", {"path": str(hf_folder), "normalize": False}).version
    assert a.version != VideoAlignReward("d", {"path": str(hf_folder), "fps": 4.0}).version


def test_scores_through_a_real_server(
    reward: VideoAlignReward, hf_folder: Path, videos: list[np.ndarray]
) -> None:
    options = {"path": str(hf_folder), **OPTIONS}
    config = {
        "server": {"host": "127.0.0.1"},
        "rewards": {"videoalign": {"kind": "videoalign", "max_batch_size": 8, "options": options}},
    }
    with served_reward(config, startup_timeout_s=120, metrics=False) as client:
        with pytest.raises(RewardServiceError) as bad_prompt:
            client.score("videoalign", videos=videos[:2], prompts=["a cat", "a <|MQ_reward|>"])
        with pytest.raises(RewardServiceError) as bad_frames:
            client.score("videoalign", videos=[np.zeros((2, 2, 500, 3), np.uint8)], prompts=["x"])
        batch = batch_of(videos[:4], PROMPTS[:4])
        assert_serves_like_local(client, "videoalign", reward, batch, atol=1e-5)
    assert bad_prompt.value.code.name == bad_frames.value.code.name == "INVALID_ARGUMENT"
    assert "samples[1].prompt: must not contain the special token" in bad_prompt.value.details
    assert "samples[0].media: aspect ratio of 2x500" in bad_frames.value.details
