"""dancegrpo-proto: the ``dancegrpo.rewards.v1`` gRPC contract and a light numpy client.

Importing this package never imports torch: other teams install it alone to call a
running reward service (``RewardClient``).
"""

from dancegrpo_proto.v1 import rewards_pb2, rewards_pb2_grpc

__version__ = "0.1.0"
SERVICE_NAME = "dancegrpo.rewards.v1.RewardService"

from dancegrpo_proto.client import RetryPolicy, RewardClient, RewardServiceError  # noqa: E402

__all__ = [
    "SERVICE_NAME",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "__version__",
    "rewards_pb2",
    "rewards_pb2_grpc",
]
