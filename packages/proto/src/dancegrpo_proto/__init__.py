"""dancegrpo-proto: the ``dancegrpo.rewards.v1`` gRPC contract and a light numpy client.

Importing this package never imports torch: other teams install it alone to call a
running reward service.
"""

from dancegrpo_proto.v1 import rewards_pb2, rewards_pb2_grpc

__version__ = "0.1.0"
SERVICE_NAME = "dancegrpo.rewards.v1.RewardService"

__all__ = ["SERVICE_NAME", "__version__", "rewards_pb2", "rewards_pb2_grpc"]
