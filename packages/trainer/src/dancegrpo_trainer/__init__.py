"""dancegrpo-trainer: DanceGRPO for diffusion and rectified-flow visual generators.

The pure GRPO math (:mod:`dancegrpo_trainer.core`) is re-exported here; model adapters, the
training loop and the CLI live in their own subpackages and are imported explicitly.
"""

from dancegrpo_trainer.core import (
    GRPOLossOutput,
    NoiseSchedule,
    PerPromptStatTracker,
    StepOutput,
    best_of_n_indices,
    ddim_step,
    flow_sde_step,
    flow_sigmas,
    flow_timesteps,
    gather_steps,
    gather_trajectories,
    gaussian_log_prob,
    gaussian_mean_kl,
    group_advantages,
    group_ids_from_size,
    grpo_loss,
    multi_reward_advantages,
    num_train_timesteps,
    select_timesteps,
    shift_sigmas,
)

__version__ = "0.1.0"

__all__ = [
    "GRPOLossOutput",
    "NoiseSchedule",
    "PerPromptStatTracker",
    "StepOutput",
    "__version__",
    "best_of_n_indices",
    "ddim_step",
    "flow_sde_step",
    "flow_sigmas",
    "flow_timesteps",
    "gather_steps",
    "gather_trajectories",
    "gaussian_log_prob",
    "gaussian_mean_kl",
    "group_advantages",
    "group_ids_from_size",
    "grpo_loss",
    "multi_reward_advantages",
    "num_train_timesteps",
    "select_timesteps",
    "shift_sigmas",
]
