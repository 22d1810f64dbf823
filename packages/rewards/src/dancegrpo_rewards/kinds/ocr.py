"""``ocr``: text-rendering accuracy, Flow-GRPO's OCR reward on PP-OCR models.

The prompt's quoted text is the target (``ocr_text.ocr_target``); PP-OCR detects and
recognises the image's text; ``score = 1 - min(1, Levenshtein(recognised, target) /
len(target))`` after Flow-GRPO's normalisation (``ocr_text``). Flow-GRPO runs PaddleOCR 2.x
(``PaddleOCR(use_angle_cls=False, lang="en")``); here the same PP-OCR pipeline (DB text
detection, boxes sorted top-to-bottom then left-to-right, CTC recognition, results below
``text_score`` dropped) runs on ONNX Runtime through ``rapidocr-onnxruntime``, whose wheel
ships the PP-OCRv4 detection and recognition models: real weights, offline, CPU or CUDA.

Every image is recognised on its own (PP-OCR batches only the text lines of one image), so
the reward is batch-invariant. Heavy dependencies (``rapidocr_onnxruntime``, onnxruntime,
OpenCV) are imported in ``load()``; install them with ``dancegrpo-rewards[ocr]``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dancegrpo_rewards.base import Reward, RewardBatch, RewardConfigError, SampleError
from dancegrpo_rewards.kinds.checkpoints import file_digest, require_file, version_string
from dancegrpo_rewards.kinds.ocr_text import ocr_match, ocr_target
from dancegrpo_rewards.kinds.options import OptionError, option_path, parse_options

DOCS_SECTION = "ocr"
#: The extra that installs this kind's dependencies.
EXTRA = "ocr"
_PACKAGE = "rapidocr_onnxruntime"
#: Models inside the ``rapidocr-onnxruntime`` wheel (relative to the package folder).
_WHEEL_MODELS = {
    "det_model_path": "models/ch_PP-OCRv4_det_infer.onnx",
    "rec_model_path": "models/ch_PP-OCRv4_rec_infer.onnx",
}
_EXPECTED = {
    "det_model_path": "a PP-OCR DB text-detection model exported to ONNX",
    "rec_model_path": "a PP-OCR CTC text-recognition model exported to ONNX",
    "rec_keys_path": "the recogniser's character dictionary (one character per line)",
}


def missing_extra_error(reward_name: str, kind: str, extra: str, module: str) -> RewardConfigError:
    """The start-up error for a kind whose optional dependencies are not installed."""
    return RewardConfigError(
        f"reward {reward_name!r}: kind {kind!r} needs the Python package {module!r}, which is "
        f"not installed; install it with: pip install 'dancegrpo-rewards[{extra}]'"
    )


@dataclasses.dataclass(frozen=True)
class OcrOptions:
    """Options of the ``ocr`` kind (defaults: PaddleOCR 2.x's, as Flow-GRPO ran it).

    Attributes:
        det_model_path: ONNX text detector; default the wheel's ``ch_PP-OCRv4_det_infer.onnx``.
        rec_model_path: ONNX text recogniser; default the wheel's ``ch_PP-OCRv4_rec_infer.onnx``
            (Chinese + English characters; its dictionary is inside the ONNX file).
        rec_keys_path: the recogniser's character dictionary, for models that do not embed it.
        device: ``cpu`` or ``cuda`` (``cuda`` needs ``onnxruntime-gpu``).
        num_threads: ONNX Runtime intra-op threads per model; 0 = ONNX Runtime's default.
        det_limit_side_len, det_limit_type: the detector input is resized so that its
            ``max`` (or ``min``) side is at most (at least) this, rounded to multiples of 32.
        det_thresh: probability-map binarisation threshold (PaddleOCR ``det_db_thresh``).
        det_box_thresh: a box's mean probability to keep it (``det_db_box_thresh``).
        det_unclip_ratio: how far boxes are grown before cropping (``det_db_unclip_ratio``).
        det_use_dilation: dilate the binary map before finding boxes.
        text_score: recognised lines with a lower confidence are dropped (``drop_score``).
    """

    det_model_path: str | None = None
    rec_model_path: str | None = None
    rec_keys_path: str | None = None
    device: str = "cpu"
    num_threads: int = 0
    det_limit_side_len: int = 960
    det_limit_type: str = "max"
    det_thresh: float = 0.3
    det_box_thresh: float = 0.6
    det_unclip_ratio: float = 1.5
    det_use_dilation: bool = False
    text_score: float = 0.5

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise OptionError("device", f"must be 'cpu' or 'cuda', got {self.device!r}")
        if self.num_threads < 0:
            raise OptionError("num_threads", f"must be >= 0, got {self.num_threads}")
        if self.det_limit_side_len < 32:
            raise OptionError("det_limit_side_len", f"must be >= 32, got {self.det_limit_side_len}")
        if self.det_limit_type not in ("max", "min"):
            raise OptionError(
                "det_limit_type", f"must be 'max' or 'min', got {self.det_limit_type!r}"
            )
        for key in ("det_thresh", "det_box_thresh", "text_score"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise OptionError(key, f"must be in [0, 1], got {value}")
        if self.det_unclip_ratio <= 0:
            raise OptionError("det_unclip_ratio", f"must be > 0, got {self.det_unclip_ratio}")


def _package_dir(reward_name: str) -> Path:
    """The installed ``rapidocr_onnxruntime`` folder, found without importing it."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise missing_extra_error(reward_name, "ocr", EXTRA, "rapidocr-onnxruntime")
    return Path(next(iter(spec.submodule_search_locations)))


class OcrReward(Reward):
    """Flow-GRPO's OCR reward: ``score`` in [0, 1] and the capped ``edit_distance``."""

    kind = "ocr"
    modality = "image"
    description = (
        "OCR text accuracy (Flow-GRPO): 1 - min(1, Levenshtein(recognised, quoted text) / len)"
    )
    requires_prompt = True
    warmup_prompt = 'a sign that says "hello"'

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(OcrOptions, options, reward_name=name)
        package_dir = _package_dir(name)
        self.model_paths: dict[str, Path] = {}
        for key in ("det_model_path", "rec_model_path", "rec_keys_path"):
            value = getattr(self.config, key)
            if value is None:
                if key not in _WHEEL_MODELS:
                    continue
                path = package_dir / _WHEEL_MODELS[key]
            else:
                path = option_path(name, key, value)
            what = f"reward {name!r}: OCR model file (option {key!r})"
            require_file(path, what=what, expected=_EXPECTED[key], docs_section=DOCS_SECTION)
            self.model_paths[key] = path
        identity = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if f.name not in ("device", "num_threads") and not f.name.endswith("_path")
        }
        identity["rapidocr"] = importlib.metadata.version("rapidocr-onnxruntime")
        self._version = version_string(
            self.kind, {k: file_digest(p) for k, p in self.model_paths.items()}, identity
        )
        self._engine: Any = None

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("score", "edit_distance")

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Builds the PP-OCR pipeline (ONNX Runtime sessions for detection and recognition)."""
        try:
            import onnxruntime
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as err:
            raise missing_extra_error(self.name, self.kind, EXTRA, err.name or _PACKAGE) from err
        cuda = self.config.device == "cuda"
        if cuda and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise RewardConfigError(
                f"reward {self.name!r}: option 'device': 'cuda' but ONNX Runtime has no CUDA "
                f"provider (install onnxruntime-gpu instead of onnxruntime)"
            )
        threads = self.config.num_threads or -1
        settings: dict[str, Any] = {
            "intra_op_num_threads": threads,
            "inter_op_num_threads": threads,
            "text_score": self.config.text_score,
            "det_use_cuda": cuda,
            "rec_use_cuda": cuda,
            "det_model_path": str(self.model_paths["det_model_path"]),
            "rec_model_path": str(self.model_paths["rec_model_path"]),
            "det_limit_side_len": self.config.det_limit_side_len,
            "det_limit_type": self.config.det_limit_type,
            "det_thresh": self.config.det_thresh,
            "det_box_thresh": self.config.det_box_thresh,
            "det_unclip_ratio": self.config.det_unclip_ratio,
            "det_donot_use_dilation": not self.config.det_use_dilation,
        }
        if "rec_keys_path" in self.model_paths:
            settings["rec_keys_path"] = str(self.model_paths["rec_keys_path"])
        try:
            self._engine = RapidOCR(**settings)
        except Exception as err:  # noqa: BLE001 - any failure means an unusable model file
            raise RewardConfigError(
                f"reward {self.name!r}: the OCR models could not be loaded ({err}); check "
                f"{', '.join(f'{k}={p}' for k, p in self.model_paths.items())} "
                f"(see docs/rewards.md, section {DOCS_SECTION!r})"
            ) from err

    def recognize(self, image: np.ndarray) -> str:
        """The text PP-OCR reads in ``uint8 [H, W, 3]`` RGB: its lines joined in reading order."""
        if self._engine is None:
            self.load()
        # PP-OCR's models take OpenCV's BGR order. (Flow-GRPO hands PaddleOCR RGB arrays,
        # which it reads as BGR: identical for grey text, slightly different for colour.)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        lines, _ = self._engine(bgr, use_cls=False)
        return "".join(line[1] for line in lines or ())

    def validate_sample(self, index: int, prompt: str, media: np.ndarray, metadata: Any) -> None:
        if ocr_target(prompt) is None:
            raise SampleError(
                index,
                "prompt",
                "needs the text to render between double quotes, e.g. 'a sign that says \"OPEN\"'"
                f", got {prompt[:80]!r}",
            )

    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``score`` in [0, 1] and ``edit_distance`` (capped at the target length), ``(N,)``."""
        scores, distances = [], []
        for index, (image, prompt) in enumerate(zip(batch.media, batch.prompts, strict=True)):
            target = ocr_target(prompt)
            if target is None:  # the server validated already; direct callers get the same error
                self.validate_sample(index, prompt, image, None)
            assert target is not None
            match = ocr_match(self.recognize(image), target)
            scores.append(match.reward)
            distances.append(match.distance)
        return {
            "score": np.asarray(scores, np.float32),
            "edit_distance": np.asarray(distances, np.float32),
        }
