"""What every reward kind's tests check, written once; each test file calls these with its
own reward, media and tolerances.

- ``batch_of``: a ``RewardBatch`` of media with (optional) prompts, condition images and
  metadata;
- ``assert_batch_invariant``: scoring a batch equals scoring its samples one at a time
  (the contract of ``Reward.score``), for every output;
- ``served_reward``: a real ``dancegrpo-rewards serve`` process hosting one or more
  rewards (checked to list exactly the config's rewards and kinds), and a client to it;
- ``assert_serves_like_local``: through that server, ``ListRewards`` shows the local
  reward's kind, version and outputs, and ``Score`` equals the local ``score``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dancegrpo_proto.client import RewardClient
from dancegrpo_rewards.base import Reward, RewardBatch
from dancegrpo_testing.servers import running_reward_server


def batch_of(
    media: Sequence[np.ndarray],
    prompts: Sequence[str] | None = None,
    condition_images: Sequence[np.ndarray | None] | None = None,
    metadata: Sequence[Mapping[str, Any] | None] | None = None,
) -> RewardBatch:
    """One sample per ``media`` item; absent fields are ``""`` prompts and ``None``s."""
    n = len(media)
    return RewardBatch(
        list(prompts) if prompts is not None else [""] * n,
        media,
        list(condition_images) if condition_images is not None else [None] * n,
        list(metadata) if metadata is not None else [None] * n,
    )


def assert_batch_invariant(
    reward: Reward,
    batch: RewardBatch,
    *,
    atol: float | Mapping[str, float],
    rtol: float = 0.0,
) -> dict[str, np.ndarray]:
    """``reward.score(batch)`` equals the samples scored one at a time, output by output,
    to ``atol`` (one for all outputs, or one per output name). Returns the batch's scores."""
    together = reward.score(batch)
    alone = [reward.score(batch.select([i])) for i in range(len(batch))]
    for name in reward.output_names:
        tolerance = atol[name] if isinstance(atol, Mapping) else atol
        np.testing.assert_allclose(
            together[name],
            np.concatenate([scores[name] for scores in alone]),
            atol=tolerance,
            rtol=rtol,
            err_msg=name,
        )
    return together


@contextlib.contextmanager
def served_reward(config: Mapping[str, Any], **server_options: Any) -> Iterator[RewardClient]:
    """A client to a real reward server running ``config`` (``running_reward_server``'s
    keyword options pass through) until the block exits. On entry, asserts that the server
    lists exactly ``config``'s rewards, each under the kind the config names."""
    with (
        running_reward_server(config, **server_options) as (target, _, _),
        RewardClient(target) as client,
    ):
        listed = {info.name: info.kind for info in client.list_rewards()}
        assert listed == {name: spec["kind"] for name, spec in config["rewards"].items()}
        yield client


def assert_serves_like_local(
    client: RewardClient,
    name: str,
    local: Reward,
    batch: RewardBatch,
    *,
    atol: float,
    rtol: float = 0.0,
) -> dict[str, np.ndarray]:
    """The server behind ``client`` lists reward ``name`` with ``local``'s kind, version and
    output names, and scores ``batch`` (its media as images or videos by ``local``'s
    modality, prompts, and condition images / metadata where given) as ``local.score``
    does, to ``atol`` / ``rtol``. Returns the served scores."""
    info = {listed.name: listed for listed in client.list_rewards()}[name]
    assert (info.kind, info.version) == (local.kind, local.version)
    assert tuple(info.output_names) == tuple(local.output_names)
    media = "videos" if local.modality == "video" else "images"
    request: dict[str, Any] = {media: list(batch.media), "prompts": list(batch.prompts)}
    if any(image is not None for image in batch.condition_images):
        request["condition_images"] = list(batch.condition_images)
    if any(meta is not None for meta in batch.metadata):
        request["metadata"] = list(batch.metadata)
    remote = client.score(name, **request)
    expected = local.score(batch)
    assert set(remote) == set(local.output_names)
    for output in local.output_names:
        np.testing.assert_allclose(
            remote[output], expected[output], atol=atol, rtol=rtol, err_msg=f"{name}.{output}"
        )
    return remote
