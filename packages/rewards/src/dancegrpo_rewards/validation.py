"""Validation and decoding of one ``ScoreRequest`` into a ``RewardBatch`` (server side).

Everything a request can get wrong is checked here, per request and before it is merged
with others, so a malformed request never reaches (or poisons) a batch. Errors are
``SampleError`` (``samples[i].field: ...``) or ``RequestError`` (request-level fields);
both map to ``INVALID_ARGUMENT``. Wire-format rules come from ``dancegrpo_proto.codec``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dancegrpo_proto import codec
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_rewards.base import Reward, RewardBatch, SampleError
from dancegrpo_rewards.config import RewardSpec
from dancegrpo_rewards.rich_status import field_key

#: Longest accepted prompt, in characters (far above any text encoder's context).
MAX_PROMPT_CHARS = 10_000


class RequestError(ValueError):
    """A request-level field (not a sample) is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


def has_encoded_media(request: pb.ScoreRequest) -> bool:
    """Whether any sample carries PNG/JPEG bytes (decoding those is worth a worker thread)."""
    for sample in request.samples:
        if sample.media.WhichOneof("kind") not in (None, "raw"):
            return True
        if sample.condition_image.WhichOneof("kind") not in (None, "raw"):
            return True
    return False


class RequestDecoder:
    """Checks requests for one hosted reward against its limits and declared needs.

    Args:
        reward, spec: the hosted reward and its config entry (per-sample limits).
        max_decoded_bytes: most bytes of decoded pixels one request may need
            (``server.max_decoded_bytes``); ``None`` = no limit.
    """

    def __init__(
        self, reward: Reward, spec: RewardSpec, *, max_decoded_bytes: int | None = None
    ) -> None:
        self.reward = reward
        self.spec = spec
        self.max_decoded_bytes = max_decoded_bytes

    def decode(self, request: pb.ScoreRequest) -> RewardBatch:
        """Validated, decoded samples of ``request``; raises ``SampleError``/``RequestError``.

        Two passes: every sample is checked from its raw shapes and PNG/JPEG headers and
        the request's total decoded size is bounded before any pixel is decoded.
        """
        n = len(request.samples)
        if n == 0:
            raise RequestError("samples", "a request needs at least one sample")
        limit = self.spec.max_samples_per_request
        if limit and n > limit:
            raise RequestError(
                "samples", f"{n} samples exceed max_samples_per_request={limit} of this reward"
            )
        group_sizes = self.check_group_sizes(request)
        total = sum(self.check_sample(i, sample) for i, sample in enumerate(request.samples))
        if self.max_decoded_bytes is not None and total > self.max_decoded_bytes:
            raise RequestError(
                "samples",
                f"the request decodes to {total} bytes of pixels, above the server's limit "
                f"max_decoded_bytes={self.max_decoded_bytes} (server.max_decoded_bytes); "
                "send fewer or smaller samples per request",
            )
        prompts, media, conditions, metadata = [], [], [], []
        for i, sample in enumerate(request.samples):
            prompt, frames, condition, meta = self._decode_checked(i, sample)
            prompts.append(prompt)
            media.append(frames)
            conditions.append(condition)
            metadata.append(meta)
        return RewardBatch(prompts, media, conditions, metadata, group_sizes)

    def check_group_sizes(self, request: pb.ScoreRequest) -> tuple[int, ...] | None:
        """Checks ``request.group_sizes``; returns them for a group-wise reward (``None``
        for a per-sample reward, which accepts but ignores them).

        Every size is >= 1 and they sum to the sample count; a group-wise reward requires
        them, and each group between its ``min_group_size`` and ``max_batch_size`` (a group
        is scored in one batch, never split).
        """
        reward, n = self.reward, len(request.samples)
        if not request.group_sizes:
            if reward.group_wise:
                raise RequestError(
                    "group_sizes",
                    f"required by group-wise reward {reward.name!r}: the sizes of the "
                    f"request's consecutive groups (e.g. [{n}] for one group of {n})",
                )
            return None
        try:
            sizes = codec.check_group_sizes(n, request.group_sizes)
        except codec.CodecError as exc:
            raise RequestError(exc.field, exc.message) from None
        if not reward.group_wise:
            return None
        limit = self.spec.max_batch_size
        for k, size in enumerate(sizes):
            if size < reward.min_group_size:
                raise RequestError(
                    f"group_sizes[{k}]",
                    f"a group of {size} is below the min_group_size {reward.min_group_size} "
                    f"of reward {reward.name!r}",
                )
            if size > limit:
                raise RequestError(
                    f"group_sizes[{k}]",
                    f"a group of {size} exceeds max_batch_size={limit} of reward "
                    f"{reward.name!r}: a group is scored in one batch (raise the reward's "
                    "max_batch_size or send smaller groups)",
                )
        return tuple(sizes)

    def check_sample(self, index: int, sample: pb.Sample) -> int:
        """Checks one sample without decoding pixels; returns the bytes it decodes to."""
        reward = self.reward
        prompt = sample.prompt
        if reward.requires_prompt and not prompt.strip():
            raise SampleError(index, "prompt", f"required by reward {reward.name!r}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise SampleError(index, "prompt", f"longer than {MAX_PROMPT_CHARS} characters")
        if not sample.HasField("media"):
            raise SampleError(index, "media", "required")
        if not sample.HasField("condition_image") and reward.requires_condition_image:
            raise SampleError(index, "condition_image", f"required by reward {reward.name!r}")
        if not sample.HasField("metadata") and reward.requires_metadata:
            raise SampleError(index, "metadata", f"required by reward {reward.name!r}")
        media = [(sample.media, "media", 4 if reward.modality == "video" else 3)]
        if sample.HasField("condition_image"):
            media.append((sample.condition_image, "condition_image", 3))
        try:
            return sum(
                codec.decoded_nbytes(
                    codec.media_shape(m, field, ndim=ndim, check_shape=self._check_size)
                )
                for m, field, ndim in media
            )
        except codec.CodecError as exc:
            raise SampleError(index, exc.field, exc.message) from None

    def decode_sample(
        self, index: int, sample: pb.Sample
    ) -> tuple[str, np.ndarray, np.ndarray | None, dict[str, Any] | None]:
        """One sample → ``(prompt, frames, condition image or None, metadata or None)``."""
        self.check_sample(index, sample)
        return self._decode_checked(index, sample)

    def _decode_checked(
        self, index: int, sample: pb.Sample
    ) -> tuple[str, np.ndarray, np.ndarray | None, dict[str, Any] | None]:
        # decode_media re-reads every header (cheap) and re-checks it before decoding.
        reward = self.reward
        frames = self._decode_media(index, sample.media, "media", video=reward.modality == "video")
        condition = None
        if sample.HasField("condition_image"):
            condition = self._decode_media(
                index, sample.condition_image, "condition_image", video=False
            )
        metadata = None
        if sample.HasField("metadata"):
            metadata = self._check_metadata(index, sample.metadata)
        reward.validate_sample(index, sample.prompt, frames, metadata)
        return sample.prompt, frames, condition, metadata

    def _decode_media(self, index: int, media: pb.Media, field: str, *, video: bool) -> np.ndarray:
        try:
            return codec.decode_media(
                media, field, ndim=4 if video else 3, check_shape=self._check_size
            )
        except codec.CodecError as exc:
            raise SampleError(index, exc.field, exc.message) from None

    def _check_size(self, shape: tuple[int, ...], field: str) -> None:
        spec = self.spec
        height, width = shape[-3], shape[-2]
        if min(height, width) < spec.min_size:
            raise codec.CodecError(field, f"{height}x{width} is below min_size={spec.min_size}")
        if spec.max_height and height > spec.max_height:
            raise codec.CodecError(field, f"height {height} exceeds max_height={spec.max_height}")
        if spec.max_width and width > spec.max_width:
            raise codec.CodecError(field, f"width {width} exceeds max_width={spec.max_width}")
        if len(shape) == 4 and spec.max_frames and shape[0] > spec.max_frames:
            raise codec.CodecError(field, f"{shape[0]} frames exceed max_frames={spec.max_frames}")

    def _check_metadata(self, index: int, metadata: pb.SampleMetadata) -> dict[str, Any]:
        reward = self.reward
        if metadata.HasField("geneval") and not (
            reward.accepts_geneval or reward.requires_metadata
        ):
            raise SampleError(
                index, "metadata.geneval", f"reward {reward.name!r} takes no GenEval spec"
            )
        for key in metadata.attributes:
            if key not in reward.attribute_keys:
                known = ", ".join(sorted(reward.attribute_keys)) or "none"
                raise SampleError(
                    index,
                    f"metadata.attributes.{field_key(key)}",
                    f"unknown attribute for reward {reward.name!r} (known: {known})",
                )
        return codec.metadata_to_dict(metadata)
