"""Flow sigma/timestep schedules match diffusers' FlowMatchEulerDiscreteScheduler exactly."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dancegrpo_trainer import flow_sigmas, flow_timesteps, shift_sigmas


def test_shift_formula_on_known_values():
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # s·σ/(1+(s−1)σ) with s = 3: 0, 0.75/1.5, 1.5/2, 3/3
    expected = torch.tensor([0.0, 0.5, 0.75, 1.0])
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), expected)
    torch.testing.assert_close(shift_sigmas(sigmas, 1.0), sigmas)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("num_steps", [1, 4, 16])
def test_flow_sigmas_and_timesteps_match_diffusers(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    base = torch.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist()
    scheduler.set_timesteps(sigmas=base)

    sigmas = flow_sigmas(num_steps, shift)

    assert sigmas.shape == (num_steps + 1,)
    assert sigmas.dtype == torch.float32
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    torch.testing.assert_close(sigmas, scheduler.sigmas)
    torch.testing.assert_close(flow_timesteps(sigmas), scheduler.timesteps)


def test_schedule_arguments_are_validated():
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(4, shift=0.0)
    with pytest.raises(ValueError, match="sigmas"):
        flow_timesteps(torch.tensor([1.0]))
