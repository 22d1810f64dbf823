"""Pure GRPO math: sampling steps with log-probabilities, advantages, losses. No I/O."""

from dancegrpo_trainer.core.advantages import (
    group_advantages,
    group_ids_from_size,
    multi_reward_advantages,
    routed_advantages,
)
from dancegrpo_trainer.core.best_of_n import best_of_n_indices, gather_trajectories
from dancegrpo_trainer.core.ddim import ddim_step
from dancegrpo_trainer.core.dpm_solver import dpm_solver_pp_step
from dancegrpo_trainer.core.gaussian import gaussian_log_prob
from dancegrpo_trainer.core.guard import GuardLossOutput, grpo_guard_loss, regulated_log_ratio
from dancegrpo_trainer.core.losses import (
    GRPOLossOutput,
    gaussian_mean_kl,
    grpo_loss,
    velocity_kl,
)
from dancegrpo_trainer.core.samplers import FLOW_SAMPLERS, flow_step
from dancegrpo_trainer.core.schedules import flow_sigmas, flow_timesteps, shift_sigmas
from dancegrpo_trainer.core.sde import NoiseSchedule, cps_step, flow_sde_step
from dancegrpo_trainer.core.stat_tracker import PerPromptStatTracker
from dancegrpo_trainer.core.step_output import StepOutput
from dancegrpo_trainer.core.timesteps import gather_steps, num_train_timesteps, select_timesteps

__all__ = [
    "FLOW_SAMPLERS",
    "GRPOLossOutput",
    "GuardLossOutput",
    "NoiseSchedule",
    "PerPromptStatTracker",
    "StepOutput",
    "best_of_n_indices",
    "cps_step",
    "ddim_step",
    "dpm_solver_pp_step",
    "flow_sde_step",
    "flow_sigmas",
    "flow_step",
    "flow_timesteps",
    "gather_steps",
    "gather_trajectories",
    "gaussian_log_prob",
    "gaussian_mean_kl",
    "group_advantages",
    "group_ids_from_size",
    "grpo_guard_loss",
    "grpo_loss",
    "multi_reward_advantages",
    "num_train_timesteps",
    "regulated_log_ratio",
    "routed_advantages",
    "select_timesteps",
    "shift_sigmas",
    "velocity_kl",
]
