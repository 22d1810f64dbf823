"""Checkpoint layouts of the ``videoalign`` kind and how they load (local files only).

``path`` is one of two layouts (docs/rewards.md, section ``videoalign``):

1. **Hugging Face folder** (``save_pretrained`` of ``Qwen2VLForConditionalGeneration`` plus the
   head): ``config.json``; ``model.safetensors`` (or shards listed in
   ``model.safetensors.index.json``) holding the Qwen2-VL weights *and* ``rm_head.weight``
   ``[3, hidden]`` (or ``[1, hidden]``); tokenizer files whose vocabulary contains the three
   reward tokens; the processor config (``preprocessor_config.json`` or
   ``processor_config.json``). transformers-4 key names (``model.layers.*``, ``visual.*``)
   and transformers-5 names both load.
2. **VideoReward release** (huggingface.co/KwaiVGI/VideoReward, written by VideoAlign's
   trainer): ``model_config.json`` and ``checkpoint-<step>/model.pth``, a ``torch.save``'d
   state dict of the PEFT-wrapped model — every weight, ``rm_head`` included, with
   ``base_model.model.`` prefixes and the LoRA factors *not merged*
   (``<m>.base_layer.weight``, ``<m>.lora_A.default.weight``, ``<m>.lora_B.default.weight``;
   ``lora_embedding_A/B`` for embeddings). The architecture, tokenizer and processor come
   from a local Qwen2-VL-2B-Instruct folder (``base_model_path``). As VideoAlign's
   ``create_model_and_processor`` does, the three reward tokens are added to that tokenizer
   (new ids at the end) and the embeddings take the checkpoint's row count. LoRA factors
   are merged into the weights here — ``W + s·B·A`` with ``s = lora_alpha / r``
   (``lora_alpha / √r`` for rsLoRA), peft's LoRA definition — so neither peft nor the base
   model's weights are needed. Two more blocks of ``model_config.json`` are read, as
   VideoAlign's ``inference.py`` reads them: ``inference_config`` (the ``VQ/MQ/TA`` mean and
   std that ``use_norm`` standardises with) and ``data_config`` (``fps``, ``num_frames``,
   ``max_frame_pixels``: how videos are sampled; only ``sample_type: uniform`` exists here).
   VideoAlign's ``train()`` also ends with ``model.config.save_pretrained(output_dir)``, so a
   release may hold a ``config.json`` beside ``model_config.json``: a folder with
   ``model_config.json`` and a ``checkpoint-<step>/model.pth`` is a release whatever else it
   holds.

**dtype.** VideoAlign's ``create_model_and_processor`` loads the model in
``model_config.torch_dtype`` (``"bfloat16"`` in the published ``train.sh``) and its
``VideoVLMRewardInference`` casts the whole model, ``rm_head`` included, to bf16 by default;
``checkpoint_dtype`` is the dtype a checkpoint runs in unless the ``dtype`` option says
otherwise: a release's ``torch_dtype`` (bf16 when it is unset or ``"auto"``: the inference
default), an HF folder's ``config.json`` dtype (fp32 when unset).

The adapter-only form VideoAlign can also write (``adapter_model.safetensors`` +
``non_lora_state_dict.pth``, base weights taken from the base model) is not supported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dancegrpo_rewards.base import RewardConfigError
from dancegrpo_rewards.kinds.checkpoints import (
    CheckpointError,
    checkpoint_error,
    folder_digest,
    load_errors_as_checkpoint_error,
)
from dancegrpo_rewards.kinds.options import option_path
from dancegrpo_rewards.kinds.qwen2vl_backbone import build_backbone, embedding_rows

DOCS_SECTION = "videoalign"
#: The added tokens whose hidden states the head reads, in output order (VQ, MQ, TA).
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")

EXPECTED_HF = (
    "a Hugging Face Qwen2-VL folder: config.json, model.safetensors (or "
    "model.safetensors.index.json + shards) with the Qwen2-VL weights and rm_head.weight, "
    "tokenizer files containing <|VQ_reward|> <|MQ_reward|> <|TA_reward|>, and "
    "preprocessor_config.json or processor_config.json; or a VideoReward release folder "
    "(model_config.json + checkpoint-<step>/model.pth) with base_model_path"
)
EXPECTED_RELEASE = (
    "a VideoReward release folder (huggingface.co/KwaiVGI/VideoReward): model_config.json and "
    "checkpoint-<step>/model.pth (the full PEFT state dict written by VideoAlign's trainer)"
)
EXPECTED_BASE = (
    "a local Qwen2-VL-2B-Instruct folder (huggingface.co/Qwen/Qwen2-VL-2B-Instruct): "
    "config.json, tokenizer files and preprocessor_config.json"
)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
#: ``data_config`` keys of a release that set the defaults of the same-named options.
DATA_CONFIG_OPTIONS = ("fps", "num_frames", "max_frame_pixels")
#: Output names and their ``inference_config`` key prefixes.
_STAT_PREFIXES = {"vq": "VQ", "mq": "MQ", "ta": "TA"}
#: torch dtype names in ``model_config.torch_dtype`` / ``config.json`` → ``dtype`` option values.
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
#: The dtype ``VideoVLMRewardInference`` casts a release to by default (its ``dtype`` argument).
RELEASE_DEFAULT_DTYPE = "bf16"

# peft's key layout of a wrapped model's state dict (peft.tuners.lora): the wrapper prefix,
# the frozen weight moved under ``base_layer``, LoRA factors per adapter name, full copies
# of ``modules_to_save`` next to the untouched ``original_module``.
_PEFT_PREFIX = "base_model.model."
_LORA_LINEAR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[AB])\.(?P<adapter>[^.]+)\.weight$")
_LORA_EMBEDDING = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_[AB])\.(?P<adapter>[^.]+)$")
_SAVED_MODULE = re.compile(r"^(?P<module>.+)\.modules_to_save\.[^.]+\.(?P<param>.+)$")


@dataclasses.dataclass(frozen=True)
class VideoAlignCheckpoint:
    """A checked checkpoint location (construction time: files exist, configs parse).

    Attributes:
        layout: ``"hf"`` or ``"videoreward"``.
        path: the checkpoint folder.
        weights: ``checkpoint-<step>/model.pth`` of a release; ``None`` for an HF folder.
        base_model: the Qwen2-VL folder of a release; ``None`` for an HF folder.
        lora_scaling: ``s`` of the release's LoRA (``None`` when LoRA is off or for HF).
        digests: fingerprints for ``version``.
        norm_stats: the release's ``inference_config`` as ``{"vq": (mean, std), ...}``;
            ``None`` for an HF folder or a release without that block.
        data_options: the release's ``data_config`` values of ``DATA_CONFIG_OPTIONS`` (those
            it sets to a value); empty for an HF folder.
        dtype: the ``dtype`` option value the checkpoint runs in by default (module docstring).
    """

    layout: str
    path: Path
    weights: Path | None
    base_model: Path | None
    lora_scaling: float | None
    digests: dict[str, str]
    norm_stats: dict[str, tuple[float, float]] | None = None
    data_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "fp32"


@dataclasses.dataclass
class LoadedVideoAlign:
    """A loaded VideoAlign model.

    Attributes:
        backbone: the transformers ``Qwen2VLModel`` (eval mode) giving ``[N, L, D]`` hidden states.
        rm_head: ``[out_dim, D]`` weight of the reward head (``out_dim`` 3 or 1) in ``dtype``.
        processor: the ``Qwen2VLProcessor`` (tokenizer pads on the right).
        token_ids: ids of ``REWARD_TOKENS``.
        patch_factor: ``patch_size * merge_size`` of the video processor (28 for Qwen2-VL).
        device, dtype: where and in which precision the backbone runs.
    """

    backbone: Any
    rm_head: torch.Tensor
    processor: Any
    token_ids: tuple[int, int, int]
    patch_factor: int
    device: torch.device
    dtype: torch.dtype


def _has_any(folder: Path, names: tuple[str, ...]) -> bool:
    return any((folder / name).is_file() for name in names)


def _require_files(
    folder: Path, groups: dict[str, tuple[str, ...]], what: str, expected: str
) -> None:
    """Raises ``CheckpointError`` for the first group of which ``folder`` holds no file."""
    for label, names in groups.items():
        if not _has_any(folder, names):
            problem = f"folder lacks {label} ({' or '.join(names)})"
            raise checkpoint_error(folder, what, expected, DOCS_SECTION, problem)


def _release_error(reward_name: str, path: Path, problem: str) -> CheckpointError:
    what = f"reward {reward_name!r}: VideoReward release (option 'path')"
    return checkpoint_error(path, what, EXPECTED_RELEASE, DOCS_SECTION, problem)


def _read_model_config(reward_name: str, file: Path) -> dict[str, Any]:
    """Parses a release's ``model_config.json`` and checks it describes a special-token head."""
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise _release_error(reward_name, file, f"could not be read ({err})") from err
    model = config.get("model_config") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise _release_error(reward_name, file, "has no 'model_config' mapping")
    # VideoAlign's create_model_and_processor adds the reward tokens only with
    # use_special_tokens, and then Qwen2VLRewardModelBT reads them whatever
    # ``reward_token`` says (special_token_ids set → reward_token = "special").
    if not model.get("use_special_tokens"):
        raise _release_error(
            reward_name, file, "is not a special-token VideoAlign model (use_special_tokens)"
        )
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _norm_stats(
    reward_name: str, file: Path, config: Mapping[str, Any]
) -> dict[str, tuple[float, float]] | None:
    """``inference_config`` as ``{"vq": (mean, std), ...}``; ``None`` when absent (VideoAlign's
    ``_norm`` then returns raw rewards)."""
    block = config.get("inference_config")
    if block is None:
        return None
    if not isinstance(block, dict):
        raise _release_error(reward_name, file, "has an inference_config that is not a mapping")
    stats = {}
    for name, prefix in _STAT_PREFIXES.items():
        mean, std = block.get(f"{prefix}_mean"), block.get(f"{prefix}_std")
        if not (_is_number(mean) and _is_number(std) and std > 0):
            raise _release_error(
                reward_name,
                file,
                f"has an inference_config without a finite {prefix}_mean and a {prefix}_std > 0",
            )
        stats[name] = (float(mean), float(std))
    return stats


def _data_options(reward_name: str, file: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data_config`` values VideoAlign's ``prepare_batch`` samples videos with."""
    block = config.get("data_config") or {}
    if not isinstance(block, dict):
        raise _release_error(reward_name, file, "has a data_config that is not a mapping")
    sample_type = block.get("sample_type", "uniform")
    if sample_type != "uniform":
        raise _release_error(
            reward_name,
            file,
            f"has data_config.sample_type {sample_type!r}; only 'uniform' frame sampling is supported",
        )
    options = {key: block[key] for key in DATA_CONFIG_OPTIONS if block.get(key) is not None}
    for key, value in options.items():
        integral = key != "fps"
        if not _is_number(value) or value <= 0 or (integral and value != int(value)):
            kind = "an integer" if integral else "a number"
            raise _release_error(
                reward_name, file, f"has data_config.{key} {value!r}; expected {kind} > 0"
            )
        options[key] = int(value) if integral else float(value)
    return options


def _release_dtype(reward_name: str, file: Path, model: Mapping[str, Any]) -> str:
    """``model_config.torch_dtype`` as a ``dtype`` option value (unset/``auto``: bf16)."""
    value = model.get("torch_dtype")
    if value in (None, "auto"):
        return RELEASE_DEFAULT_DTYPE
    if value not in _DTYPE_NAMES:
        raise _release_error(
            reward_name,
            file,
            f"has model_config.torch_dtype {value!r}; expected one of "
            f"{', '.join(_DTYPE_NAMES)}, 'auto' or null",
        )
    return _DTYPE_NAMES[value]


def _hf_dtype(folder: Path) -> str:
    """The dtype an HF folder's ``config.json`` records (``dtype``, or transformers-4's
    ``torch_dtype``); fp32 when it records none or one the kind does not run."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "fp32"  # unreadable files fail at load() with the full message
    if not isinstance(config, dict):
        return "fp32"
    value = config.get("dtype", config.get("torch_dtype"))
    return _DTYPE_NAMES.get(value, "fp32") if isinstance(value, str) else "fp32"


def lora_scaling(peft_config: Mapping[str, Any]) -> float | None:
    """``s`` of a VideoAlign ``peft_lora_config``: ``lora_alpha / r`` (``/ √r`` with rsLoRA).

    ``None`` when ``lora_enable`` is false. Defaults are VideoAlign's ``PEFTLoraConfig``
    (``lora_r = 16``, ``lora_alpha = 32``).
    """
    if not peft_config.get("lora_enable", False):
        return None
    rank = float(peft_config.get("lora_r", 16))
    alpha = float(peft_config.get("lora_alpha", 32))
    return alpha / (math.sqrt(rank) if peft_config.get("use_rslora", False) else rank)


def _checkpoint_dir(reward_name: str, path: Path, step: int | None) -> Path:
    """``checkpoint-<step>``, or the highest step as VideoAlign's loader picks by default."""
    steps = {
        int(match.group(1)): child
        for child in path.iterdir()
        if child.is_dir() and (match := _CHECKPOINT_DIR.match(child.name))
    }
    if not steps:
        raise _release_error(reward_name, path, "holds no checkpoint-<step> folder")
    if step is None:
        return steps[max(steps)]
    if step not in steps:
        found = ", ".join(str(s) for s in sorted(steps))
        raise _release_error(reward_name, path, f"has no checkpoint-{step} (found steps: {found})")
    return steps[step]


def _resolve_base_model(reward_name: str, value: str | None, release: Path) -> Path:
    if not value:
        raise RewardConfigError(
            f"reward {reward_name!r}: option 'base_model_path': required because {release} is a "
            f"VideoReward release folder; set it to {EXPECTED_BASE} "
            f"(docs/rewards.md, section {DOCS_SECTION!r})"
        )
    base = option_path(reward_name, "base_model_path", value)
    what = f"reward {reward_name!r}: base model (option 'base_model_path')"
    if not base.is_dir():
        raise checkpoint_error(base, what, EXPECTED_BASE, DOCS_SECTION, "folder not found")
    groups = {"config": ("config.json",), "tokenizer files": _TOKENIZER_FILES}
    groups["a processor config"] = _PROCESSOR_FILES
    _require_files(base, groups, what, EXPECTED_BASE)
    return base


def _resolve_release(
    reward_name: str, path: Path, base_model_path: str | None, step: int | None
) -> VideoAlignCheckpoint:
    config = _read_model_config(reward_name, path / "model_config.json")
    folder = _checkpoint_dir(reward_name, path, step)
    weights = folder / "model.pth"
    if not weights.is_file():
        adapter_only = (folder / "adapter_model.safetensors").is_file()
        problem = (
            "holds only LoRA adapters (adapter_model.safetensors); the full model.pth is required"
            if adapter_only
            else "lacks model.pth"
        )
        raise _release_error(reward_name, folder, problem)
    base = _resolve_base_model(reward_name, base_model_path, path)
    scaling = lora_scaling(config.get("peft_lora_config") or {})
    digests = {"path": folder_digest(path), "base_model_path": folder_digest(base)}
    file = path / "model_config.json"
    return VideoAlignCheckpoint(
        "videoreward",
        path,
        weights,
        base,
        scaling,
        digests,
        norm_stats=_norm_stats(reward_name, file, config),
        data_options=_data_options(reward_name, file, config),
        dtype=_release_dtype(reward_name, file, config["model_config"]),
    )


def is_release_folder(path: Path) -> bool:
    """A VideoReward release: ``model_config.json`` and a ``checkpoint-<step>/model.pth``
    (whatever else it holds: VideoAlign's trainer also writes ``config.json`` there), or
    ``model_config.json`` without ``config.json`` (an incomplete release, reported as one)."""
    if not (path / "model_config.json").is_file():
        return False
    if not (path / "config.json").is_file():
        return True
    return any(
        child.is_dir() and _CHECKPOINT_DIR.match(child.name) and (child / "model.pth").is_file()
        for child in path.iterdir()
    )


def resolve_checkpoint(
    reward_name: str, path_value: str, base_model_path: str | None, step: int | None
) -> VideoAlignCheckpoint:
    """Checks the ``path`` folder (and ``base_model_path`` for a release) at construction.

    Raises:
        CheckpointError: a missing folder or file, or an unreadable ``model_config.json``;
            the message names the path, the expected layout and the docs section.
        RewardConfigError: ``base_model_path`` missing for a release or given for an HF folder.
    """
    path = option_path(reward_name, "path", path_value)
    what = f"reward {reward_name!r}: VideoAlign checkpoint (option 'path')"
    if not path.is_dir():
        raise checkpoint_error(path, what, EXPECTED_HF, DOCS_SECTION, "folder not found")
    if is_release_folder(path):
        return _resolve_release(reward_name, path, base_model_path, step)
    if not (path / "config.json").is_file():
        problem = "holds neither config.json (Hugging Face folder) nor model_config.json (release)"
        raise checkpoint_error(path, what, EXPECTED_HF, DOCS_SECTION, problem)
    if base_model_path or step is not None:
        key = "base_model_path" if base_model_path else "checkpoint_step"
        raise RewardConfigError(
            f"reward {reward_name!r}: option {key!r}: only for a VideoReward release folder, "
            f"but {path} is a Hugging Face folder (config.json)"
        )
    groups = {"weights": _WEIGHT_FILES, "tokenizer files": _TOKENIZER_FILES}
    groups["a processor config"] = _PROCESSOR_FILES
    _require_files(path, groups, what, EXPECTED_HF)
    digests = {"path": folder_digest(path)}
    return VideoAlignCheckpoint("hf", path, None, None, None, digests, dtype=_hf_dtype(path))


# --- LoRA merge ------------------------------------------------------------------------


def _lora_delta(module: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``B·A`` of one LoRA module, shaped like its base weight.

    Linear (peft ``lora.Linear``): ``A [r, in]``, ``B [out, r]`` → ``B @ A [out, in]``.
    Embedding (peft ``lora.Embedding``): ``A [r, num]``, ``B [dim, r]`` → ``(B @ A)ᵀ [num, dim]``.
    """
    if {"lora_A", "lora_B"} <= parts.keys():
        return parts["lora_B"].float() @ parts["lora_A"].float()
    if {"lora_embedding_A", "lora_embedding_B"} <= parts.keys():
        return (parts["lora_embedding_B"].float() @ parts["lora_embedding_A"].float()).T
    raise ValueError(f"LoRA module {module!r} has an incomplete factor pair: {sorted(parts)}")


def _split_peft_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``(plain weights, LoRA factors per module)`` with peft's wrapper names removed."""
    plain: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix(_PEFT_PREFIX)
        if "lora_magnitude_vector" in key:
            raise ValueError(f"DoRA weights are not supported: {key}")
        if match := _LORA_LINEAR.match(key) or _LORA_EMBEDDING.match(key):
            factors.setdefault(match.group("module"), {})[match.group("part")] = value
        elif match := _SAVED_MODULE.match(key):
            saved[f"{match.group('module')}.{match.group('param')}"] = value
        elif ".original_module." not in key:
            plain[key.replace(".base_layer.", ".")] = value
    plain.update(saved)  # a trained copy replaces the frozen original
    return plain, factors


def merge_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor], scaling: float | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Plain weights of a peft-wrapped model's state dict, LoRA merged: ``W + s·B·A``.

    peft's LoRA forward is ``base(x) + s·B(A(x))`` (dropout is the identity in eval mode),
    which equals ``x`` through the merged weight ``W + s·B·A``. Merged weights are computed
    in float32 and stored in ``dtype``; other tensors keep their dtype.

    Raises:
        ValueError: LoRA factors without ``scaling``, incomplete factor pairs, a factor
            whose module has no base weight, or DoRA weights.
    """
    plain, factors = _split_peft_state_dict(state_dict)
    if factors and scaling is None:
        raise ValueError(
            "the state dict has LoRA factors but model_config.json has lora_enable false"
        )
    for module, parts in factors.items():
        key = f"{module}.weight"
        if key not in plain:
            raise ValueError(f"LoRA module {module!r} has no base weight {key!r}")
        delta = _lora_delta(module, parts)
        assert scaling is not None
        plain[key] = (plain[key].float() + scaling * delta).to(dtype)
    return plain


# --- loading ---------------------------------------------------------------------------


def _read_safetensors_folder(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards listed in the index."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        state_dict.update(load_file(str(path / name), device="cpu"))
    return state_dict


def _hf_parts(checkpoint: VideoAlignCheckpoint) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    from transformers import AutoProcessor, Qwen2VLConfig

    config = Qwen2VLConfig.from_pretrained(str(checkpoint.path), local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(checkpoint.path), local_files_only=True)
    return config, processor, _read_safetensors_folder(checkpoint.path)


def _release_parts(
    checkpoint: VideoAlignCheckpoint, dtype: torch.dtype
) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    from transformers import AutoProcessor, Qwen2VLConfig

    assert checkpoint.base_model is not None and checkpoint.weights is not None
    base = str(checkpoint.base_model)
    config = Qwen2VLConfig.from_pretrained(base, local_files_only=True)
    processor = AutoProcessor.from_pretrained(base, local_files_only=True)
    # As VideoAlign's create_model_and_processor: the reward tokens are appended to the
    # base tokenizer's vocabulary.
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    raw = torch.load(str(checkpoint.weights), map_location="cpu", weights_only=True, mmap=True)
    # The language-model head is never evaluated: its (LoRA) weights are not merged at all.
    raw = {k: v for k, v in raw.items() if not k.removeprefix(_PEFT_PREFIX).startswith("lm_head.")}
    return config, processor, merge_lora_state_dict(raw, checkpoint.lora_scaling, dtype)


def _reward_token_ids(tokenizer: Any, vocab_rows: int) -> tuple[int, int, int]:
    """Ids of ``REWARD_TOKENS``; each must be one token inside the embedding table."""
    ids = []
    for token in REWARD_TOKENS:
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1 or not 0 <= encoded[0] < vocab_rows:
            raise ValueError(f"the tokenizer does not hold {token} as one token (got {encoded})")
        ids.append(int(encoded[0]))
    return ids[0], ids[1], ids[2]


def _check_head(rm_head: torch.Tensor, hidden_size: int) -> torch.Tensor:
    if rm_head.ndim != 2 or rm_head.shape[0] not in (1, 3) or rm_head.shape[1] != hidden_size:
        raise ValueError(
            f"rm_head.weight must be [3, {hidden_size}] or [1, {hidden_size}], got {list(rm_head.shape)}"
        )
    return rm_head


def load_videoalign(
    checkpoint: VideoAlignCheckpoint,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str,
    reward_name: str,
) -> LoadedVideoAlign:
    """Loads a resolved checkpoint on ``device`` in ``dtype`` (eval mode).

    Raises:
        CheckpointError: anything in the files does not load or does not fit together;
            the message names the path, the expected layout and the docs section.
    """
    with load_errors_as_checkpoint_error(
        checkpoint.path,
        what=f"reward {reward_name!r}: VideoAlign checkpoint (option 'path')",
        expected=EXPECTED_HF if checkpoint.layout == "hf" else EXPECTED_RELEASE,
        docs_section=DOCS_SECTION,
    ):
        if checkpoint.layout == "hf":
            config, processor, state_dict = _hf_parts(checkpoint)
        else:
            config, processor, state_dict = _release_parts(checkpoint, dtype)
        if "rm_head.weight" not in state_dict:
            raise ValueError("no rm_head.weight in the weights")
        rm_head = _check_head(state_dict.pop("rm_head.weight"), config.text_config.hidden_size)
        rows = embedding_rows(state_dict)
        if checkpoint.layout == "videoreward" and len(processor.tokenizer) != rows:
            # VideoAlign resized the embeddings to the extended tokenizer's length.
            raise ValueError(
                f"the base model's tokenizer has {len(processor.tokenizer)} tokens with the reward "
                f"tokens but the checkpoint's embeddings have {rows} rows: base_model_path is not "
                "the model this checkpoint was trained from"
            )
        token_ids = _reward_token_ids(processor.tokenizer, rows)
        backbone = build_backbone(config, state_dict, dtype, attn_implementation)
    processor.tokenizer.padding_side = "right"
    videos = processor.video_processor
    return LoadedVideoAlign(
        backbone=backbone.to(device),
        rm_head=rm_head.to(device=device, dtype=dtype),
        processor=processor,
        token_ids=token_ids,
        patch_factor=int(videos.patch_size * videos.merge_size),
        device=device,
        dtype=dtype,
    )
