"""dancegrpo-rewards: reward models served as dynamic-batching gRPC scoring services."""

from dancegrpo_rewards.base import Reward, RewardBatch, RewardConfigError, SampleError

__version__ = "0.1.0"

__all__ = ["Reward", "RewardBatch", "RewardConfigError", "SampleError", "__version__"]
