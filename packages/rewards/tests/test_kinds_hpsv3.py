"""The ``hpsv3`` kind against HPSv3's official inference code on a tiny Qwen2-VL.

The reference is the ``hpsv3`` 1.0.0 wheel (the official code, installed ``--no-deps`` from
requirements-test-nodeps.txt). It pins transformers 4.45.2 and imports trl, deepspeed,
pandas, matplotlib, ... at module level, so its definitions are read from the installed
files with ``ast`` and run unmodified, without those imports:

- ``dataset/utils.py`` ``process_vision_info`` (imported: it needs only torchvision/PIL),
- ``dataset/data_collator_qwen.py`` ``INSTRUCTION`` and ``prompt_with_special_token``,
- ``model/qwen2vl_trainer.py`` ``Qwen2VLRewardModelBT`` (``__init__`` builds the ranknet
  head, ``forward`` computes the reward) and
- ``inference.py`` ``HPSv3RewardInferencer.prepare_batch`` / ``reward``.

What is adapted, only around that code: ``Qwen2VLRewardModelBT`` subclasses transformers
4.45's ``Qwen2VLForConditionalGeneration``, whose attribute layout (``self.model`` = the
language model, ``self.visual`` returning merged patch embeddings, a flat config) is
rebuilt over transformers 5's modules (``Legacy445Qwen2VL``); the processor's new
``mm_token_type_ids`` output (transformers 5) is dropped before the 4.45-era ``forward``;
``create_model_and_processor`` (train.py) is not importable, its processor and model
set-up (right padding, ``<|Reward|>`` added, embeddings sized to the tokenizer, pad id
in the config, ``load_state_dict(strict=True)``) is done by hand in ``official_inferencer``.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import shutil
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional  # noqa: UP035 - names the official source uses

import numpy as np
import pytest
import torch
from torch import nn

from dancegrpo_rewards.base import RewardConfigError, SampleError
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.hpsv3 import (
    CHAT_FORMAT,
    DEFAULT_PROMPT_TEMPLATE,
    HPSv3Reward,
    render_text,
    smart_resize,
)
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models
from dancegrpo_testing import hpsv3_models as hm
from dancegrpo_testing.reward_checks import (
    assert_batch_invariant,
    assert_serves_like_local,
    batch_of,
    served_reward,
)

PROMPTS = [
    "a red cube on a table",
    "a dog in the sun, highly detailed",
    "x",
    "prompt with {braces} and {text_prompt}",
    "cute chibi anime cartoon fox, smiling wagging tail with a small cartoon heart above",
    "",
]


# ------------------------------------------------------------------ the official code


def _bare_package(name: str, path: str) -> None:
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module


def _definitions(path: str, names: set[str]) -> dict[str, Any]:
    """Source of the named classes and values of the named constants of a file."""
    text = Path(path).read_text()
    found: dict[str, Any] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef) and node.name in names:
            found[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in names:
                found[target.id] = ast.literal_eval(node.value)
    assert set(found) == names, f"{path}: found {sorted(found)}"
    return found


@functools.lru_cache(maxsize=1)
def official() -> types.SimpleNamespace:
    """The official definitions (see the module docstring)."""
    spec = importlib.util.find_spec("hpsv3")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("hpsv3 is not installed (requirements-test-nodeps.txt)")
    root = spec.submodule_search_locations[0]
    _bare_package("hpsv3", root)
    _bare_package("hpsv3.dataset", f"{root}/dataset")
    from hpsv3.dataset.utils import process_vision_info
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
        Qwen2VLTextModel,
    )

    class LegacyTextModel(Qwen2VLTextModel):
        """4.45's ``Qwen2VLModel`` call: the legacy arguments are the defaults."""

        def forward(
            self,
            *,
            past_key_values: Any = None,
            output_attentions: Any = None,
            output_hidden_states: Any = None,
            return_dict: Any = None,
            **kwargs: Any,
        ) -> Any:
            assert past_key_values is None and not output_attentions and not output_hidden_states
            return super().forward(**kwargs)

    class LegacyVisual(Qwen2VisionTransformerPretrainedModel):
        """4.45's vision tower returned the merged patch embeddings."""

        def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> Any:
            return super().forward(hidden_states, grid_thw=grid_thw).pooler_output

    class LegacyConfig:
        """4.45's flat ``Qwen2VLConfig`` view of a nested 5.x one."""

        def __init__(self, config: Any) -> None:
            object.__setattr__(self, "current", config)
            flat = {"output_attentions": False, "output_hidden_states": False}
            object.__setattr__(self, "flat", {**flat, "use_return_dict": True})

        def __getattr__(self, name: str) -> Any:
            if name in self.flat:
                return self.flat[name]
            try:
                return getattr(self.current, name)
            except AttributeError:
                return getattr(self.current.text_config, name)

        def __setattr__(self, name: str, value: Any) -> None:
            self.flat[name] = value

    class Legacy445Qwen2VL(nn.Module):
        """4.45's ``Qwen2VLForConditionalGeneration`` layout: ``visual``, ``model``, ``lm_head``."""

        def __init__(self, legacy: LegacyConfig) -> None:
            super().__init__()
            config = legacy.current
            self.config = legacy
            self.visual = LegacyVisual._from_config(config.vision_config)
            self.model = LegacyTextModel._from_config(config.text_config)
            text = config.text_config
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    prompts = _definitions(
        f"{root}/dataset/data_collator_qwen.py",
        {"INSTRUCTION", "prompt_with_special_token", "prompt_without_special_token"},
    )
    namespace: dict[str, Any] = {
        "torch": torch,
        "nn": nn,
        "Optional": Optional,
        "List": list,
        "Qwen2VLForConditionalGeneration": Legacy445Qwen2VL,
    }
    model_source = _definitions(f"{root}/model/qwen2vl_trainer.py", {"Qwen2VLRewardModelBT"})
    exec(model_source["Qwen2VLRewardModelBT"], namespace)  # noqa: S102 - the official class
    inference = {
        "os": os,
        "Mapping": Mapping,
        "torch": torch,
        "process_vision_info": process_vision_info,
        **prompts,
    }
    inferencer_source = _definitions(f"{root}/inference.py", {"HPSv3RewardInferencer"})
    exec(inferencer_source["HPSv3RewardInferencer"], inference)  # noqa: S102
    return types.SimpleNamespace(
        prompts=prompts,
        process_vision_info=process_vision_info,
        LegacyConfig=LegacyConfig,
        RewardModel=namespace["Qwen2VLRewardModelBT"],
        Inferencer=inference["HPSv3RewardInferencer"],
    )


class Legacy445Processor:
    """The processor as 4.45 returned it (no ``mm_token_type_ids``)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self.processor.apply_chat_template(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.processor(*args, **kwargs)
        out.pop("mm_token_type_ids", None)
        return out


def official_inferencer(files: hm.TinyHPSv3Files) -> Any:
    """``HPSv3RewardInferencer`` with create_model_and_processor's set-up done by hand."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen2VLConfig

    code = official()
    processor = AutoProcessor.from_pretrained(str(files.base), padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    special_token_ids = processor.tokenizer.convert_tokens_to_ids(["<|Reward|>"])
    config = Qwen2VLConfig.from_pretrained(str(files.base))
    config.text_config.vocab_size = len(processor.tokenizer)  # resize_token_embeddings
    config._attn_implementation = "sdpa"
    model = code.RewardModel(
        code.LegacyConfig(config),
        output_dim=2,
        reward_token="special",
        special_token_ids=special_token_ids,
        rm_head_type="ranknet",
        rm_head_kwargs=None,
    )
    model.config.pad_token_id = processor.tokenizer.pad_token_id
    result = model.load_state_dict(load_file(str(files.checkpoint)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    inferencer = object.__new__(code.Inferencer)
    inferencer.model = model.eval()
    inferencer.processor = Legacy445Processor(processor)
    inferencer.device = "cpu"
    inferencer.use_special_tokens = True
    return inferencer


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> hm.TinyHPSv3Files:
    return hm.write_hpsv3_files(tmp_path_factory.mktemp("hpsv3"))


@pytest.fixture(scope="module")
def reward(files: hm.TinyHPSv3Files) -> HPSv3Reward:
    reward = HPSv3Reward("hpsv3", {"checkpoint": str(files.checkpoint)})
    reward.load()
    return reward


def official_outputs(files: hm.TinyHPSv3Files, images: list, prompts: list[str]) -> np.ndarray:
    from PIL import Image

    inferencer = official_inferencer(files)
    with torch.no_grad():
        logits = inferencer.reward([Image.fromarray(i) for i in images], prompts)
    return logits.double().numpy()


# --------------------------------------------------------------------------- tests


def test_registry_resolves_hpsv3() -> None:
    assert reward_class("hpsv3") is HPSv3Reward


def test_the_instruction_is_the_official_text() -> None:
    prompts = official().prompts
    expected = prompts["INSTRUCTION"].format(text_prompt="{prompt}")
    assert expected + prompts["prompt_with_special_token"] == DEFAULT_PROMPT_TEMPLATE


def test_the_chat_text_is_the_official_template(files: hm.TinyHPSv3Files) -> None:
    """Qwen2-VL-Instruct's chat template on prepare_batch's messages gives ``render_text``."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(files.base))
    prompts = official().prompts
    for prompt in PROMPTS:
        text = prompts["INSTRUCTION"].format(text_prompt=prompt)
        content = [
            {"type": "image", "image": None},
            {"type": "text", "text": text + prompts["prompt_with_special_token"]},
        ]
        rendered = processor.apply_chat_template(
            [[{"role": "user", "content": content}]], tokenize=False, add_generation_prompt=True
        )
        assert rendered == [render_text(prompt)]
    assert CHAT_FORMAT.count("<|image_pad|>") == 1


def test_hpsv3_equals_the_official_inference(reward: HPSv3Reward, files: hm.TinyHPSv3Files) -> None:
    """μ and log σ of ``HPSv3RewardInferencer.reward`` on the same images and prompts."""
    images = clip_models.random_images(6, seed=21, min_size=40, max_size=600)
    reference = official_outputs(files, images, PROMPTS)
    ours = reward.score(batch_of(images, PROMPTS))
    assert ours["score"].dtype == ours["sigma"].dtype == np.float32
    assert np.ptp(reference[:, 0]) > 0.3 and np.ptp(reference[:, 1]) > 0.1
    np.testing.assert_allclose(ours["score"], reference[:, 0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.log(ours["sigma"]), reference[:, 1], atol=1e-5, rtol=0)


def test_inputs_equal_the_official_prepare_batch(
    reward: HPSv3Reward, files: hm.TinyHPSv3Files
) -> None:
    from PIL import Image

    images = clip_models.random_images(3, seed=22, min_size=30, max_size=900)
    inferencer = official_inferencer(files)
    theirs = inferencer.prepare_batch([Image.fromarray(i) for i in images], PROMPTS[:3])
    ours = reward.encode(batch_of(images, PROMPTS[:3]))
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        assert torch.equal(ours[key], theirs[key]), key
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    # min_pixels = max_pixels = 200704: ~256 image tokens whatever the input size (ceil
    # rounding of small images can exceed max_pixels slightly, in HPSv3 too).
    pixels = {"min_pixels": 200704, "max_pixels": 200704}
    sizes = [smart_resize(i.shape[0], i.shape[1], **pixels) for i in images]
    assert ours["image_grid_thw"].tolist() == [[1, h // 14, w // 14] for h, w in sizes]


def test_the_language_model_gets_sequential_positions(reward: HPSv3Reward) -> None:
    """HPSv3 calls the language model without position ids; Qwen2-VL's own 3-D M-RoPE
    positions (what a plain ``Qwen2VLModel`` call computes) give different rewards."""
    model = reward.model
    batch = batch_of(clip_models.random_images(2, seed=23, min_size=100, max_size=300), PROMPTS[:2])
    with torch.no_grad():
        inputs = reward.encode(batch)
        ours = reward.raw_outputs(inputs)
        hidden = model.backbone(**inputs, use_cache=False).last_hidden_state  # 3-D positions
        at = (inputs["input_ids"] == model.reward_token_id).int().argmax(dim=1)
        three_d = model.head(hidden[torch.arange(2), at].float())
    assert (ours - three_d).abs().max() > 1e-3


def test_batch_of_6_equals_one_by_one(reward: HPSv3Reward) -> None:
    batch = batch_of(clip_models.random_images(6, seed=24, min_size=20, max_size=500), PROMPTS)
    assert_batch_invariant(reward, batch, atol=2e-5)


def test_smart_resize_equals_the_official_one() -> None:
    official()  # makes hpsv3.dataset importable without its package __init__
    from hpsv3.dataset.utils import smart_resize as official_smart_resize

    pixels = {"min_pixels": 200704, "max_pixels": 200704}
    assert smart_resize(512, 512, **pixels) == (448, 448)
    assert smart_resize(720, 1280, **pixels) == (336, 588)
    sides = [1, 2, 27, 28, 29, 64, 100, 255, 448, 449, 720, 1000, 1280, 4096]
    for bounds in (pixels, {"min_pixels": 3136, "max_pixels": 12845056}):
        for h in sides:
            for w in sides:
                if max(h, w) / min(h, w) <= 200:
                    expected = official_smart_resize(h, w, factor=28, **bounds)
                    assert smart_resize(h, w, **bounds) == expected, (h, w, bounds)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201, **pixels)


def test_bad_samples_are_rejected_naming_the_field(reward: HPSv3Reward) -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    for prompt in ("a <|Reward|> b", "x <|image_pad|>", "<|vision_start|>"):
        with pytest.raises(SampleError, match="prompt") as err:
            reward.validate_sample(3, prompt, image, None)
        assert err.value.index == 3
    with pytest.raises(SampleError, match="aspect ratio") as err:
        reward.validate_sample(1, "ok", np.zeros((1, 300, 3), np.uint8), None)
    assert err.value.field == "media"


def test_edge_images_are_scored(reward: HPSv3Reward) -> None:
    images = [
        np.zeros((1, 1, 3), np.uint8),
        np.full((1, 150, 3), 255, np.uint8),
        np.full((2000, 30, 3), 7, np.uint8),
    ]
    out = reward.score(batch_of(images, ["a", "b" * 3000, "c"]))
    assert all(np.all(np.isfinite(v)) for v in out.values()) and np.all(out["sigma"] > 0)


def test_start_up_errors_name_the_path(tmp_path: Path, files: hm.TinyHPSv3Files) -> None:
    missing = tmp_path / "HPSv3.safetensors"
    with pytest.raises(CheckpointError, match="'checkpoint'") as err:
        HPSv3Reward("h", {"checkpoint": str(missing)})
    assert str(missing) in str(err.value) and "hpsv3" in str(err.value)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(files.checkpoint, alone / "HPSv3.safetensors")
    with pytest.raises(CheckpointError, match="'base_model_path'") as err:
        HPSv3Reward("h", {"checkpoint": str(alone / "HPSv3.safetensors")})
    assert str(alone / "Qwen2-VL-7B-Instruct") in str(err.value)
    base = alone / "Qwen2-VL-7B-Instruct"
    base.mkdir()
    shutil.copy(files.base / "config.json", base / "config.json")
    with pytest.raises(CheckpointError, match="lacks tokenizer.json") as err:
        HPSv3Reward("h", {"checkpoint": str(alone / "HPSv3.safetensors")})
    explicit = HPSv3Reward(
        "h",
        {"checkpoint": str(alone / "HPSv3.safetensors"), "base_model_path": str(files.base)},
    )
    assert explicit.base_model_path == files.base


def test_checkpoints_that_do_not_fit_fail_at_load(tmp_path: Path, files: hm.TinyHPSv3Files) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "HPSv3.safetensors"
    broken.write_bytes(b"garbage")
    options = {"checkpoint": str(broken), "base_model_path": str(files.base)}
    with pytest.raises(CheckpointError, match="could not be read") as err:
        HPSv3Reward("h", options).load()
    assert str(broken) in str(err.value)
    state = load_file(str(files.checkpoint))
    without_head = {k: v for k, v in state.items() if not k.startswith("rm_head.3")}
    save_file(without_head, str(broken))
    with pytest.raises(CheckpointError, match="rm_head"):
        HPSv3Reward("h", options).load()
    without_layer = {k: v for k, v in state.items() if "layers.1.mlp" not in k}
    save_file(without_layer, str(broken))
    with pytest.raises(CheckpointError, match="missing"):
        HPSv3Reward("h", options).load()
    rows = state["model.embed_tokens.weight"].shape[0]
    shrunk = {**state, "model.embed_tokens.weight": state["model.embed_tokens.weight"][: rows - 1]}
    save_file(shrunk, str(broken))
    with pytest.raises(CheckpointError, match="not the model HPSv3 was trained from"):
        HPSv3Reward("h", options).load()


def test_a_torch_pth_with_a_model_key_loads(
    tmp_path: Path, files: hm.TinyHPSv3Files, reward: HPSv3Reward
) -> None:
    """inference.py also reads ``torch.load`` files, unwrapping ``{"model": state_dict}``."""
    from safetensors.torch import load_file

    torch.save({"model": load_file(str(files.checkpoint))}, tmp_path / "HPSv3_7B.pth")
    pth = HPSv3Reward(
        "h", {"checkpoint": str(tmp_path / "HPSv3_7B.pth"), "base_model_path": str(files.base)}
    )
    batch = batch_of(clip_models.random_images(2, seed=25), PROMPTS[:2])
    np.testing.assert_allclose(
        pth.score(batch)["score"], reward.score(batch)["score"], atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "checkpoint"),
        ({"checkpoint": "x", "dtype": "int8"}, "dtype"),
        ({"checkpoint": "x", "device": "gpu"}, "device"),
        ({"checkpoint": "x", "min_pixels": 0}, "min_pixels"),
        ({"checkpoint": "x", "max_pixels": -1}, "max_pixels"),
        ({"checkpoint": "x", "attn_implementation": "flash"}, "attn_implementation"),
        ({"checkpoint": "x", "prompt_template": "{prompt}"}, "prompt_template"),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(RewardConfigError, match=f"'{key}'"):
        HPSv3Reward("h", options)


def test_version_tracks_weights_and_output_options(files: hm.TinyHPSv3Files) -> None:
    base = {"checkpoint": str(files.checkpoint)}
    a = HPSv3Reward("a", base)
    assert a.version.startswith("hpsv3-")
    assert a.version == HPSv3Reward("b", {**base, "device": "cpu"}).version
    assert a.version != HPSv3Reward("c", {**base, "dtype": "bf16"}).version
    assert a.version != HPSv3Reward("d", {**base, "max_pixels": 100352}).version


def test_hpsv3_scores_through_a_real_server(files: hm.TinyHPSv3Files) -> None:
    options = {"checkpoint": str(files.checkpoint)}
    config = {"rewards": {"hpsv3": {"kind": "hpsv3", "options": options}}}
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    local = HPSv3Reward("hpsv3", options)
    assert local.output_names == ("score", "sigma")
    with served_reward(config, startup_timeout_s=120) as client:
        batch = batch_of(list(images), PROMPTS[:3])
        assert_serves_like_local(client, "hpsv3", local, batch, atol=1e-5)
        with pytest.raises(Exception, match="samples\\[1\\].prompt"):
            client.score("hpsv3", images=images[:2], prompts=["ok", "a <|Reward|>"])
