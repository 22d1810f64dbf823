"""``imagereward``: ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human
Preferences for Text-to-Image Generation"), a BLIP-based human-preference reward.

The official model (github.com/THUDM/ImageReward, ``ImageReward/ImageReward.py``) is BLIP's
ViT-L/16 image encoder, BLIP's BERT text encoder with cross-attention to the image patches
(``models/BLIP/med.py``), and an MLP on the text encoder's first output token::

    tokens  = bert_tokenizer(prompt, padding="max_length", truncation=True, max_length=35)
    patches = ViT(preprocess(image))                        # [N, 1 + (224/16)^2, 1024]
    feature = text_encoder(tokens, cross-attending to patches).last_hidden_state[:, 0]
    reward  = (MLP(feature) - 0.16717362830052426) / 1.0333394966054072

The first token stays ``[CLS]``: ImageReward's tokenizer adds ``[DEC]`` and ``[ENC]`` (as
BLIP's does) but, unlike BLIP's image-text matching head, never swaps ``[CLS]`` for ``[ENC]``
— neither in ``ImageReward.score`` / ``inference_rank`` nor in its training code. The MLP is
``Linear(768, 1024) → Dropout → Linear(1024, 128) → Dropout → Linear(128, 64) → Dropout →
Linear(64, 16) → Linear(16, 1)`` (no activations). Preprocessing: PIL, resize of the shorter
side to 224 (bicubic), centre crop 224, ``/255``, OpenAI CLIP mean/std.

The backbone runs on transformers' BLIP modules, which are ports of the same BLIP code:
``BlipVisionModel`` (timm-style ViT: pre-norm blocks, fused ``qkv``, exact GELU, final
LayerNorm; eps 1e-6 as BLIP's ViT) and ``BlipTextModel`` with cross-attention layers and a
bidirectional (encoder) mask. Masks: ``med.py`` adds -10000 at padded text keys, transformers
the dtype's minimum — both give those keys zero weight after the softmax; the image mask is
all ones in both. ``split_official_state_dict`` maps ``ImageReward.pt``'s key names onto
the modules; the architecture is read from the checkpoint's shapes and ``med_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dancegrpo_rewards.base import Reward, RewardBatch
from dancegrpo_rewards.kinds.checkpoints import (
    checkpoint_error,
    file_digest,
    folder_digest,
    load_errors_as_checkpoint_error,
    load_state_dict_file,
    require_dir,
    require_file,
    version_string,
)
from dancegrpo_rewards.kinds.options import (
    OptionError,
    check_device,
    check_dtype,
    option_path,
    parse_options,
)
from dancegrpo_rewards.kinds.runtime import torch_device, torch_dtype

logger = logging.getLogger(__name__)

DOCS_SECTION = "imagereward"
#: ImageReward.py: ``self.mean``, ``self.std`` of the raw MLP output (ImageReward-v1.0).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: ImageReward.py tokenises with ``padding="max_length", truncation=True, max_length=35``.
MAX_TEXT_TOKENS = 35
#: OpenAI CLIP mean/std (ImageReward.py ``_transform``).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
#: BLIP's ViT-B (768/12) and ViT-L (1024/16) both use 64-wide attention heads.
VISION_HEAD_DIM = 64
#: BLIP's ViT: ``partial(nn.LayerNorm, eps=1e-6)``.
VISION_LAYER_NORM_EPS = 1e-6
#: Tokens ImageReward's ``init_tokenizer`` adds to bert-base-uncased.
ADDED_BOS_TOKEN = "[DEC]"
ADDED_SPECIAL_TOKENS = ("[ENC]",)

CHECKPOINT_EXPECTED = (
    "ImageReward.pt of hub repo THUDM/ImageReward: a torch state dict with "
    "blip.visual_encoder.*, blip.text_encoder.* and mlp.layers.* keys"
)
MED_CONFIG_EXPECTED = "med_config.json of hub repo THUDM/ImageReward (a BERT config JSON)"
TOKENIZER_EXPECTED = "the bert-base-uncased tokenizer folder (vocab.txt, tokenizer_config.json)"

_VISION_PREFIX = "blip.visual_encoder."
_TEXT_PREFIX = "blip.text_encoder."
_HEAD_PREFIX = "mlp.layers."
#: Keys of the file that scoring does not use (BLIP's contrastive projections, buffers).
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")
#: BLIP ViT (vit.py) → transformers ``BlipVisionModel`` names, applied in order.
_VISION_RENAMES = (
    (re.compile(r"^cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"^patch_embed\.proj\."), "embeddings.patch_embedding."),
    (re.compile(r"^blocks\.(\d+)\.norm1\."), r"encoder.layers.\1.layer_norm1."),
    (re.compile(r"^blocks\.(\d+)\.norm2\."), r"encoder.layers.\1.layer_norm2."),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\."), r"encoder.layers.\1.self_attn.qkv."),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\."), r"encoder.layers.\1.self_attn.projection."),
    (re.compile(r"^blocks\.(\d+)\.mlp\."), r"encoder.layers.\1.mlp."),
    (re.compile(r"^norm\."), "post_layernorm."),
)


@dataclasses.dataclass(frozen=True)
class ImageRewardOptions:
    """Options of the ``imagereward`` kind.

    Attributes:
        checkpoint: ``ImageReward.pt`` (required).
        med_config: the text encoder's ``med_config.json``; default: beside ``checkpoint``.
        tokenizer_path: the ``bert-base-uncased`` tokenizer folder; default:
            ``bert-base-uncased/`` beside ``checkpoint``.
        normalize: report ImageReward's ``(reward - mean) / std`` (the official output);
            ``false`` gives the raw MLP output.
        device, dtype: as for every model-backed kind (the MLP head runs in float32).
    """

    checkpoint: str | None = None
    med_config: str | None = None
    tokenizer_path: str | None = None
    normalize: bool = True
    device: str = "cpu"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise OptionError("checkpoint", "required: the path of ImageReward.pt")
        check_device("device", self.device)
        check_dtype("dtype", self.dtype)


@dataclasses.dataclass(frozen=True)
class VisionShape:
    """BLIP ViT sizes read from a checkpoint's tensor shapes."""

    width: int
    depth: int
    patch_size: int
    image_size: int
    mlp_width: int


def vision_shape(vision: Mapping[str, torch.Tensor]) -> VisionShape:
    """The ViT's sizes from its (official-name) weights.

    Raises:
        KeyError / ValueError: a key is missing or the shapes are not a square ViT.
    """
    width = int(vision["cls_token"].shape[-1])
    patch_size = int(vision["patch_embed.proj.weight"].shape[-1])
    positions = int(vision["pos_embed"].shape[1]) - 1
    grid = round(positions**0.5)
    if grid * grid != positions:
        raise ValueError(f"pos_embed holds {positions} patch positions, not a square grid")
    depth = len({k.split(".")[1] for k in vision if k.startswith("blocks.")})
    if width % VISION_HEAD_DIM:
        raise ValueError(f"ViT width {width} is not a multiple of {VISION_HEAD_DIM}")
    mlp_width = int(vision["blocks.0.mlp.fc1.weight"].shape[0])
    return VisionShape(width, depth, patch_size, grid * patch_size, mlp_width)


def _rename_vision(key: str) -> str:
    for pattern, replacement in _VISION_RENAMES:
        new, count = pattern.subn(replacement, key)
        if count:
            return new
    raise KeyError(f"unexpected ViT weight {_VISION_PREFIX}{key}")


@dataclasses.dataclass(frozen=True)
class SplitStateDict:
    """``ImageReward.pt`` split into transformers-named parts."""

    vision: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    vision_shape: VisionShape
    ignored: tuple[str, ...]


def split_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> SplitStateDict:
    """Maps the official key names onto ``BlipVisionModel``, ``BlipTextModel`` and the head.

    ``blip.visual_encoder.*`` → vision (renamed, see ``_VISION_RENAMES``);
    ``blip.text_encoder.*`` → text (BLIP's ``med.py`` names are transformers' BLIP text
    names); ``mlp.layers.<i>.*`` → head ``<i>.*``. BLIP's ``vision_proj``/``text_proj`` and
    ``position_ids`` buffers are not used for scoring; any other key is reported in
    ``ignored`` (the official loader uses ``strict=False`` and skips them too).
    """
    official_vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    ignored = []
    for key, value in state_dict.items():
        if _UNUSED.search(key):
            continue
        if key.startswith(_VISION_PREFIX):
            official_vision[key[len(_VISION_PREFIX) :]] = value
        elif key.startswith(_TEXT_PREFIX):
            text[key[len(_TEXT_PREFIX) :]] = value
        elif key.startswith(_HEAD_PREFIX):
            head[key[len(_HEAD_PREFIX) :]] = value
        else:
            ignored.append(key)
    shape = vision_shape(official_vision)
    vision = {_rename_vision(k): v for k, v in official_vision.items()}
    return SplitStateDict(vision, text, head, shape, tuple(ignored))


def head_from_state_dict(head: Mapping[str, torch.Tensor]) -> nn.Sequential:
    """ImageReward's MLP with the file's layer sizes; index layout ``0, 2, 4, 6, 7`` kept."""
    indices = sorted({int(k.split(".")[0]) for k in head})
    if indices != [0, 2, 4, 6, 7]:
        raise KeyError(f"head layers {indices}, expected mlp.layers.{{0,2,4,6,7}}")
    dropouts = {1: 0.2, 3: 0.2, 5: 0.1}  # ImageReward.py MLP (identity in eval mode)
    layers: list[nn.Module] = []
    for index in range(8):
        if index in dropouts:
            layers.append(nn.Dropout(dropouts[index]))
        else:
            out_features, in_features = head[f"{index}.weight"].shape
            layers.append(nn.Linear(in_features, out_features))
    mlp = nn.Sequential(*layers)
    mlp.load_state_dict(dict(head), strict=True)
    return mlp


def text_config_from_med(med: Mapping[str, Any], *, encoder_width: int) -> Any:
    """A ``BlipTextConfig`` equal to BLIP's ``med.py`` BERT built from ``med_config.json``.

    ``encoder_width`` (the ViT width) replaces the file's value, as ``BLIP_Pretrain`` does;
    ``is_decoder=True`` only makes transformers build the cross-attention layers — the
    forward runs as an encoder (bidirectional mask).
    """
    from transformers import BlipTextConfig

    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    if not med.get("add_cross_attention", False):
        raise ValueError("add_cross_attention must be true (ImageReward cross-attends)")
    config = BlipTextConfig(
        vocab_size=int(med["vocab_size"]),
        hidden_size=int(med["hidden_size"]),
        encoder_hidden_size=encoder_width,
        intermediate_size=int(med["intermediate_size"]),
        num_hidden_layers=int(med["num_hidden_layers"]),
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=int(med["max_position_embeddings"]),
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=float(med.get("hidden_dropout_prob", 0.0)),
        attention_probs_dropout_prob=float(med.get("attention_probs_dropout_prob", 0.0)),
        pad_token_id=int(med.get("pad_token_id", 0)),
        is_decoder=True,
    )
    config._attn_implementation = "eager"
    return config


def vision_config(shape: VisionShape) -> Any:
    """A ``BlipVisionConfig`` equal to BLIP's ``VisionTransformer`` of these sizes."""
    from transformers import BlipVisionConfig

    config = BlipVisionConfig(
        hidden_size=shape.width,
        intermediate_size=shape.mlp_width,
        num_hidden_layers=shape.depth,
        num_attention_heads=shape.width // VISION_HEAD_DIM,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )
    config._attn_implementation = "eager"
    return config


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head: raw ImageReward outputs ``[N]``."""

    def __init__(self, vision: nn.Module, text: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.head = head

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``pixel_values [N, 3, S, S]``, ``input_ids``/``attention_mask [N, L]`` → ``[N]`` float32."""
        patches = self.vision(pixel_values=pixel_values).last_hidden_state
        patch_mask = torch.ones(patches.shape[:-1], dtype=torch.long, device=patches.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=patches,
            encoder_attention_mask=patch_mask,
            is_decoder=False,
        )
        feature = out.last_hidden_state[:, 0, :].float()
        return self.head(feature).squeeze(-1)


def build_model(state_dict: Mapping[str, torch.Tensor], med: Mapping[str, Any]) -> ImageRewardModel:
    """The model of an official ``ImageReward.pt`` state dict and ``med_config.json``.

    Raises:
        KeyError / ValueError / RuntimeError: a key is missing or a shape does not fit.
    """
    from transformers import BlipTextModel, BlipVisionModel

    split = split_official_state_dict(state_dict)
    if split.ignored:
        logger.warning("ImageReward checkpoint: keys not used for scoring: %s", split.ignored)
    vision = BlipVisionModel(vision_config(split.vision_shape))
    vision.load_state_dict(split.vision, strict=True)
    text = BlipTextModel(
        text_config_from_med(med, encoder_width=split.vision_shape.width), add_pooling_layer=False
    )
    text.load_state_dict(split.text, strict=True)
    head = head_from_state_dict(split.head)
    if head[0].in_features != text.config.hidden_size:
        raise ValueError(
            f"head takes {head[0].in_features} features, text encoder is "
            f"{text.config.hidden_size} wide"
        )
    return ImageRewardModel(vision, text, head).eval()


def load_tokenizer(path: Path) -> Any:
    """bert-base-uncased's tokenizer with ImageReward's added ``[DEC]`` and ``[ENC]``
    (``models/BLIP/blip.py`` ``init_tokenizer``)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": ADDED_BOS_TOKEN})
    tokenizer.add_special_tokens({"additional_special_tokens": list(ADDED_SPECIAL_TOKENS)})
    return tokenizer


def preprocess(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """``uint8 [H, W, 3]`` images → ``[N, 3, size, size]`` float32 as ImageReward's ``_transform``:
    PIL bicubic resize of the shorter side to ``size``, centre crop, ``/255``, CLIP mean/std."""
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGE_MEAN, IMAGE_STD),
        ]
    )
    return torch.stack(
        [transform(Image.fromarray(np.ascontiguousarray(m), mode="RGB")) for m in images]
    )


class ImageRewardReward(Reward):
    """ImageReward-v1.0: BLIP + MLP preference score, standardised as the official code."""

    kind = "imagereward"
    modality = "image"
    description = "ImageReward (BLIP ViT-L + cross-attending BERT + MLP), (r - mean) / std"
    requires_prompt = True

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(ImageRewardOptions, options, reward_name=name)
        assert self.config.checkpoint is not None
        c = self.config
        self.checkpoint = option_path(name, "checkpoint", c.checkpoint)
        folder = self.checkpoint.parent
        self.med_config = (
            option_path(name, "med_config", c.med_config)
            if c.med_config
            else folder / "med_config.json"
        )
        self.tokenizer_path = (
            option_path(name, "tokenizer_path", c.tokenizer_path)
            if c.tokenizer_path
            else folder / "bert-base-uncased"
        )
        require_file(
            self.checkpoint,
            what=f"reward {name!r}: ImageReward checkpoint (option 'checkpoint')",
            expected=CHECKPOINT_EXPECTED,
            docs_section=DOCS_SECTION,
        )
        med_what = f"reward {name!r}: text encoder config (option 'med_config')"
        require_file(
            self.med_config, what=med_what, expected=MED_CONFIG_EXPECTED, docs_section=DOCS_SECTION
        )
        try:
            self._med = json.loads(self.med_config.read_text())
            if not isinstance(self._med, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            raise checkpoint_error(
                self.med_config, med_what, MED_CONFIG_EXPECTED, DOCS_SECTION, f"is invalid ({err})"
            ) from None
        require_dir(
            self.tokenizer_path,
            ["vocab.txt"],
            what=f"reward {name!r}: tokenizer folder (option 'tokenizer_path')",
            expected=TOKENIZER_EXPECTED,
            docs_section=DOCS_SECTION,
        )
        self._version = version_string(
            self.kind,
            {
                "checkpoint": file_digest(self.checkpoint),
                "med_config": file_digest(self.med_config),
                "tokenizer": folder_digest(self.tokenizer_path),
            },
            {"dtype": self.config.dtype, "normalize": self.config.normalize},
        )
        self._model: ImageRewardModel | None = None
        self._tokenizer: Any = None
        self._device = torch.device("cpu")

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("score",)

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Reads the checkpoint, builds the BLIP modules and the tokenizer (eval mode)."""
        device = torch_device(self.config.device, reward_name=self.name)
        dtype = torch_dtype(self.config.dtype)
        what = f"reward {self.name!r}: ImageReward checkpoint (option 'checkpoint')"
        state_dict = load_state_dict_file(
            self.checkpoint, what=what, expected=CHECKPOINT_EXPECTED, docs_section=DOCS_SECTION
        )
        try:
            model = build_model(state_dict, self._med)
        except (KeyError, ValueError, RuntimeError) as err:
            raise checkpoint_error(
                self.checkpoint,
                what,
                f"{CHECKPOINT_EXPECTED}, matching {self.med_config}",
                DOCS_SECTION,
                f"does not fit ({err})",
            ) from err
        tokenizer_what = f"reward {self.name!r}: tokenizer folder (option 'tokenizer_path')"
        with load_errors_as_checkpoint_error(
            self.tokenizer_path,
            what=tokenizer_what,
            expected=TOKENIZER_EXPECTED,
            docs_section=DOCS_SECTION,
        ):
            tokenizer = load_tokenizer(self.tokenizer_path)
        vocab = model.text.config.vocab_size
        if len(tokenizer) > vocab:
            raise checkpoint_error(
                self.tokenizer_path,
                tokenizer_what,
                TOKENIZER_EXPECTED,
                DOCS_SECTION,
                f"has {len(tokenizer)} tokens with [DEC]/[ENC], the text encoder only {vocab}",
            )
        model.vision.to(device=device, dtype=dtype)
        model.text.to(device=device, dtype=dtype)
        model.head.to(device=device, dtype=torch.float32)
        self._model, self._tokenizer, self._device = model, tokenizer, device

    @property
    def model(self) -> ImageRewardModel:
        """The loaded model (``load()`` is called on first use if the server did not)."""
        if self._model is None:
            self.load()
        assert self._model is not None
        return self._model

    @torch.inference_mode()
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``score`` = ImageReward's standardised reward (raw with ``normalize: false``), ``(N,)``."""
        model = self.model
        tokens = self._tokenizer(
            list(batch.prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_TEXT_TOKENS,
            return_tensors="pt",
        )
        dtype = next(model.vision.parameters()).dtype
        pixels = preprocess(batch.media, model.vision.config.image_size)
        reward = model(
            pixels.to(self._device, dtype),
            tokens["input_ids"].to(self._device),
            tokens["attention_mask"].to(self._device),
        )
        if self.config.normalize:
            reward = (reward - REWARD_MEAN) / REWARD_STD
        return {"score": reward.cpu().numpy().astype(np.float32)}
