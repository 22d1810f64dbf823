"""The ``RewardService`` servicer: decode → dynamic batcher → response, with error mapping."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from collections.abc import Mapping

import grpc

from dancegrpo_proto import codec
from dancegrpo_proto.v1 import rewards_pb2 as pb
from dancegrpo_proto.v1 import rewards_pb2_grpc
from dancegrpo_rewards import __version__
from dancegrpo_rewards.base import Reward, RewardBatch, SampleError
from dancegrpo_rewards.batching import DynamicBatcher
from dancegrpo_rewards.config import RewardSpec
from dancegrpo_rewards.rich_status import ScoreError, abort, echo, invalid_argument
from dancegrpo_rewards.validation import RequestDecoder, RequestError, has_encoded_media

log = logging.getLogger("dancegrpo_rewards.service")

#: ``RetryInfo`` delay suggested while a reward is still loading.
LOADING_RETRY_S = 1.0

_MODALITY = {"image": pb.MODALITY_IMAGE, "video": pb.MODALITY_VIDEO}


@dataclasses.dataclass
class HostedReward:
    """A reward as the server hosts it: config, instance, request decoder and batcher."""

    spec: RewardSpec
    reward: Reward
    decoder: RequestDecoder
    batcher: DynamicBatcher | None = None  # set once loaded and warmed up

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    def info(self, max_message_bytes: int) -> pb.RewardInfo:
        """The reward's ``RewardInfo`` for ``ListRewards``."""
        spec, reward = self.spec, self.reward
        return pb.RewardInfo(
            name=spec.name,
            kind=spec.kind,
            version=reward.version,
            modality=_MODALITY.get(reward.modality, pb.MODALITY_UNSPECIFIED),
            output_names=list(reward.output_names),
            limits=pb.InputLimits(
                max_samples_per_request=spec.max_samples_per_request,
                max_height=spec.max_height,
                max_width=spec.max_width,
                max_frames=spec.max_frames if reward.modality == "video" else 0,
                max_request_bytes=max_message_bytes,
                min_size=spec.min_size,
            ),
            description=reward.description,
            requires_prompt=reward.requires_prompt,
            requires_condition_image=reward.requires_condition_image,
            requires_metadata=reward.requires_metadata,
            max_batch_size=spec.max_batch_size,
            scoring_scope=pb.SCORING_SCOPE_GROUP if reward.group_wise else pb.SCORING_SCOPE_SAMPLE,
            min_group_size=reward.min_group_size if reward.group_wise else 0,
            max_group_size=spec.max_batch_size if reward.group_wise else 0,
        )


class RewardServicer(rewards_pb2_grpc.RewardServiceServicer):
    """Serves ``Score`` and ``ListRewards`` for the hosted rewards.

    Raw media is decoded inline (a zero-copy view); requests carrying PNG/JPEG are decoded
    on ``decode_pool`` so the event loop keeps accepting calls.
    """

    def __init__(
        self,
        hosted: Mapping[str, HostedReward],
        *,
        max_message_bytes: int,
        decode_pool: concurrent.futures.Executor,
    ) -> None:
        self._hosted = dict(hosted)
        self._max_message_bytes = max_message_bytes
        self._decode_pool = decode_pool

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext):
        try:
            outputs, version = await self._score(request, context)
        except ScoreError as exc:
            await abort(context, exc)
        return pb.ScoreResponse(
            outputs=codec.outputs_to_proto(outputs),
            reward_version=version,
            request_id=request.request_id,
        )

    async def _score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext):
        hosted = self._hosted.get(request.reward)
        if hosted is None:
            known = ", ".join(sorted(self._hosted))
            raise ScoreError(
                grpc.StatusCode.NOT_FOUND,
                f"reward: unknown reward {echo(request.reward)}; this server hosts: {known}",
                resource=request.reward,
            )
        batcher = hosted.batcher
        if batcher is None:
            raise ScoreError(
                grpc.StatusCode.UNAVAILABLE,
                f"reward {request.reward!r} is still loading",
                retry_after_s=LOADING_RETRY_S,
            )
        with batcher.arriving():  # a batch about to start waits for this request
            batch = await self._decode(hosted, request)
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        deadline = None if remaining is None else loop.time() + remaining
        outputs = await batcher.submit(batch, deadline)
        return outputs, hosted.reward.version

    async def _decode(self, hosted: HostedReward, request: pb.ScoreRequest) -> RewardBatch:
        try:
            if has_encoded_media(request):
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._decode_pool, hosted.decoder.decode, request)
            return hosted.decoder.decode(request)
        except SampleError as exc:
            raise invalid_argument(f"samples[{exc.index}].{exc.field}", exc.description) from None
        except RequestError as exc:
            raise invalid_argument(exc.field, exc.description) from None
        except Exception as exc:  # a reward's validate_sample hook raised something else
            log.exception("reward %s: validating a request raised", request.reward)
            raise ScoreError(
                grpc.StatusCode.INTERNAL,
                f"reward {request.reward!r} failed validating the request: "
                f"{type(exc).__name__}: {exc}"[:1000],
            ) from None

    async def ListRewards(self, request: pb.ListRewardsRequest, context: grpc.aio.ServicerContext):
        infos = [self._hosted[name].info(self._max_message_bytes) for name in sorted(self._hosted)]
        return pb.ListRewardsResponse(rewards=infos, server_version=__version__)
