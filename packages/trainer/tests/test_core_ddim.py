"""ddim_step: parity with diffusers' DDIMScheduler.step, exact log-probs, gradients."""

import pytest
import torch
from diffusers import DDIMScheduler

from dancegrpo_trainer import ddim_step

SHAPE = (2, 3, 4, 4)
NUM_STEPS = 5


def _scheduler(**config) -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=1000, **config)
    scheduler.set_timesteps(NUM_STEPS)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_eta_zero_trajectory_equals_diffusers(prediction_type, set_alpha_to_one):
    scheduler = _scheduler(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    g = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(SHAPE, generator=g)
    for t in scheduler.timesteps:
        model_out = torch.randn(SHAPE, generator=g)
        ref = scheduler.step(model_out, int(t), x_ref, eta=0.0)
        out = ddim_step(scheduler, model_out, int(t), x_ours, eta=0.0)
        torch.testing.assert_close(out.prev_sample, ref.prev_sample)
        torch.testing.assert_close(out.pred_original_sample, ref.pred_original_sample)
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
        x_ref, x_ours = ref.prev_sample, out.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_eta_positive_equals_diffusers_with_same_noise(prediction_type, eta):
    scheduler = _scheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(SHAPE, generator=g)
    model_out = torch.randn(SHAPE, generator=g)
    t = int(scheduler.timesteps[1])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))

    ref = scheduler.step(model_out, t, sample, eta=eta, variance_noise=noise)
    out = ddim_step(
        scheduler, model_out, t, sample, eta=eta, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(out.prev_sample, ref.prev_sample)
    # The noise is exactly (prev − mean)/std.
    torch.testing.assert_close((out.prev_sample - out.mean) / out.std, noise)


@pytest.mark.parametrize(
    "config",
    [
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 1.5},
    ],
)
def test_clip_and_threshold_follow_diffusers(config):
    scheduler = _scheduler(**config)
    g = torch.Generator().manual_seed(2)
    sample = 3 * torch.randn(SHAPE, generator=g)
    model_out = torch.randn(SHAPE, generator=g)
    t = int(scheduler.timesteps[2])
    ref = scheduler.step(model_out, t, sample, eta=0.0)
    out = ddim_step(scheduler, model_out, t, sample, eta=0.0)
    torch.testing.assert_close(out.pred_original_sample, ref.pred_original_sample)
    torch.testing.assert_close(out.prev_sample, ref.prev_sample)
    ref_clip = scheduler.step(model_out, t, sample, eta=0.0, use_clipped_model_output=True)
    out_clip = ddim_step(scheduler, model_out, t, sample, eta=0.0, use_clipped_model_output=True)
    torch.testing.assert_close(out_clip.prev_sample, ref_clip.prev_sample)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction):
    scheduler = _scheduler()
    g = torch.Generator().manual_seed(3)
    sample, model_out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    out = ddim_step(
        scheduler,
        model_out,
        int(scheduler.timesteps[0]),
        sample,
        eta=1.0,
        generator=g,
        reduction=reduction,
    )
    elementwise = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample)
    torch.testing.assert_close(out.log_prob, getattr(elementwise, reduction)(dim=(1, 2, 3)))


def test_per_sample_timesteps_equal_rowwise_calls_and_zero_variance_last_step():
    scheduler = _scheduler()  # set_alpha_to_one=True: the last step has σ_t = 0
    g = torch.Generator().manual_seed(4)
    sample, model_out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    timesteps = torch.stack([scheduler.timesteps[0], scheduler.timesteps[-1]])
    out = ddim_step(scheduler, model_out, timesteps, sample, eta=1.0, generator=g)
    for i in range(2):
        row = ddim_step(
            scheduler,
            model_out[i : i + 1],
            int(timesteps[i]),
            sample[i : i + 1],
            eta=1.0,
            prev_sample=out.prev_sample[i : i + 1],
        )
        torch.testing.assert_close(out.mean[i : i + 1], row.mean)
        torch.testing.assert_close(out.log_prob[i : i + 1], row.log_prob)
    assert out.std[1].item() == 0.0 and out.log_prob[1].item() == 0.0
    assert out.std[0].item() > 0.0 and torch.isfinite(out.log_prob).all()


def test_gradient_flows_into_noise_pred_not_given_prev_sample():
    scheduler = _scheduler()
    g = torch.Generator().manual_seed(5)
    sample = torch.randn(SHAPE, generator=g)
    model_out = torch.randn(SHAPE, generator=g).requires_grad_(True)
    stored = torch.randn(SHAPE, generator=g).requires_grad_(True)
    out = ddim_step(
        scheduler, model_out, int(scheduler.timesteps[1]), sample, eta=1.0, prev_sample=stored
    )
    out.log_prob.sum().backward()
    assert stored.grad is None
    assert model_out.grad is not None and model_out.grad.abs().sum() > 0


def test_bf16_sample_keeps_dtype_and_float32_log_prob():
    scheduler = _scheduler()
    g = torch.Generator().manual_seed(6)
    sample = torch.randn(SHAPE, generator=g).bfloat16()
    model_out = torch.randn(SHAPE, generator=g).bfloat16()
    out = ddim_step(scheduler, model_out, int(scheduler.timesteps[0]), sample, eta=1.0, generator=g)
    assert out.prev_sample.dtype == torch.bfloat16 and out.log_prob.dtype == torch.float32
    again = ddim_step(
        scheduler,
        model_out,
        int(scheduler.timesteps[0]),
        sample,
        eta=1.0,
        prev_sample=out.prev_sample,
    )
    assert torch.equal(again.log_prob, out.log_prob)


def test_arguments_are_validated():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step(scheduler, x, 999, x, eta=1.0)
    scheduler.set_timesteps(NUM_STEPS)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(scheduler, x, 801, x, eta=1.5)
    with pytest.raises(ValueError, match="timestep"):
        ddim_step(scheduler, x, 1000, x, eta=1.0)
    with pytest.raises(ValueError, match="prev_sample shape"):
        ddim_step(scheduler, x, 801, x, eta=1.0, prev_sample=torch.zeros(SHAPE[:-1] + (1,)))
