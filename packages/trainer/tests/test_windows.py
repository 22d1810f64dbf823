"""SDE windows (full, Flow-GRPO-Fast, MixGRPO, MixGRPO-Flash), branching and the flow
samplers through the rollout and the trainer, on every flow policy kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_trainer.config import ConfigError, WindowConfig, config_from_dict
from dancegrpo_trainer.core.dpm_solver import dpm_solver_pp_step
from dancegrpo_trainer.policies.tiny_flow import TinyFlowPolicy
from dancegrpo_trainer.rollout import RolloutPlan, sample_rollout, seeded_generators
from dancegrpo_trainer.windows import mixgrpo_start, rollout_plan, window_bounds, window_starts

PROMPTS = ["a red square", "a blue square", "a green square"]


def _tiny() -> TinyFlowPolicy:
    torch.manual_seed(0)
    return TinyFlowPolicy(8, 8, latent_size=4, channels=8, embed_dim=16, num_blocks=1)


# ---------------------------------------------------------------- window bookkeeping


def test_progressive_window_slides_by_stride_every_n_steps_and_rolls_back():
    w = WindowConfig(kind="mixgrpo", size=2, iters_per_move=3, stride=2)
    starts = [window_bounds(w, 8, step=s, seed=0)[0] for s in range(14)]
    # positions 0, 2, 4, 6 (max_start = 8 − 2), 3 steps each, then back to 0.
    assert starts == [0, 0, 0, 2, 2, 2, 4, 4, 4, 6, 6, 6, 0, 0]
    clipped = WindowConfig(kind="mixgrpo", size=2, iters_per_move=1, roll_back=False)
    assert [window_bounds(clipped, 5, step=s, seed=0)[0] for s in range(6)] == [0, 1, 2, 3, 3, 3]
    assert window_bounds(w, 8, step=5, seed=0) == (2, 4)


def test_decay_dwell_shrinks_linearly_towards_max_start():
    w = WindowConfig(
        kind="mixgrpo", size=1, schedule="decay", iters_per_move=4, min_iters_per_move=1
    )
    # max_start = 3: dwell(k) = max(1, int(4·(1 − k/3) + k/3)) = 4, 3, 2, 1.
    starts = [mixgrpo_start(w, s, 3, seed=0) for s in range(11)]
    assert starts == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 0]


def test_random_and_fast_windows_are_pure_functions_of_seed_and_step():
    fast = WindowConfig(kind="fast", size=2, span=[1, 6])
    draws = [window_bounds(fast, 8, step=s, seed=3) for s in range(40)]
    assert draws == [window_bounds(fast, 8, step=s, seed=3) for s in range(40)]
    assert {a for a, _ in draws} == {1, 2, 3, 4} and all(b - a == 2 for a, b in draws)
    assert draws != [window_bounds(fast, 8, step=s, seed=4) for s in range(40)]
    rand = WindowConfig(kind="mixgrpo", size=3, schedule="random")
    starts = {window_bounds(rand, 6, step=s, seed=0)[0] for s in range(60)}
    assert starts == {0, 1, 2, 3}
    assert window_bounds(WindowConfig(), 7, step=9, seed=0) == (0, 7)


@pytest.mark.parametrize(
    "window",
    [
        WindowConfig(kind="fast", size=2, span=[1, 6]),
        WindowConfig(kind="mixgrpo", size=2, iters_per_move=3, stride=2),
        WindowConfig(kind="mixgrpo", size=2, iters_per_move=1, stride=4, roll_back=False),
        WindowConfig(kind="mixgrpo", size=1, schedule="decay", iters_per_move=4),
        WindowConfig(kind="mixgrpo", size=3, schedule="random"),
        WindowConfig(),
    ],
)
def test_window_starts_are_every_start_a_run_draws(window):
    drawn = {window_bounds(window, 8, step=s, seed=0, skip_last=True)[0] for s in range(300)}
    assert drawn == set(window_starts(window, 8, skip_last=True))


def _sections(**sampling) -> dict:
    return {
        "model": {"kind": "tiny_flow"},
        "rewards": {"endpoints": [{"target": "x:1", "reward": "r"}]},
        "sampling": {"num_steps": 6, "group_size": 2, **sampling},
        "data": {"train_prompts": ["a"]},
    }


@pytest.mark.parametrize(
    ("sampling", "model", "message"),
    [
        ({"window": {"kind": "fast", "size": 7}}, {}, r"sampling.window.size: must be in \[1, 6\]"),
        ({"window": {"kind": "fast", "span": [2, 3], "size": 2}}, {}, "sampling.window.span"),
        (
            {"window": {"kind": "mixgrpo", "branch": True}, "shared_noise": False},
            {},
            "shared_noise",
        ),
        ({"window": {"kind": "mixgrpo", "schedule": "random", "flash": True}}, {}, "progressive"),
        ({"window": {"kind": "fast", "flash": True}}, {}, "needs kind mixgrpo"),
        ({"window": {"flash": True}}, {}, "needs kind fast or mixgrpo"),
        ({"sampler": "cps", "eta": 1.2}, {}, r"sampling.eta: must be in \(0, 1\]"),
        ({"sampler": "ddim"}, {}, "ddim is Stable Diffusion's sampler"),
        ({"sampler": "cps"}, {"kind": "stable_diffusion", "path": "x"}, "samples with DDIM-eta"),
        ({"window": {"kind": "fast"}}, {"kind": "stable_diffusion", "path": "x"}, "rectified-flow"),
        ({}, {"options": {"noise_schedule": "flow_grpo"}}, "moved to sampling.sampler"),
    ],
)
def test_nonsensical_combinations_fail_naming_the_field(sampling, model, message):
    sections = _sections(**sampling)
    sections["model"].update(model)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(sections)


def test_unknown_algorithm_fails_naming_the_choices():
    sections = _sections()
    sections["train"] = {"algorithm": "ppo"}
    with pytest.raises(
        ConfigError,
        match=r"train.algorithm: must be one of \[.*'grpo', 'grpo_guard'.*'nft'.*\], got 'ppo'",
    ):
        config_from_dict(sections)


# ---------------------------------------------------------------- rollouts


def _plan(policy, **window):
    sampling = config_from_dict(_sections(window=window)).sampling
    return rollout_plan(policy, sampling, step=0, seed=0)


def test_window_rollout_is_ode_outside_and_records_only_the_window():
    policy = _tiny()
    cond = policy.encode_prompts(PROMPTS[:2]).select([0, 0, 1, 1])
    noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(0))
    noise = noise.repeat_interleave(2, dim=0)
    plan = RolloutPlan(policy.schedule(6), torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool))
    gens = seeded_generators(range(4), 1)
    r = sample_rollout(
        policy, cond, noise, plan=plan, eta=0.7, row_generators=gens, chunk_size=4, keep=("noise",)
    )
    assert r.recorded_steps == [2, 3]
    assert (r.log_probs[:, [2, 3]] != 0).all() and (r.log_probs[:, [0, 1, 4, 5]] == 0).all()
    assert (r.noise[:, [0, 1, 4, 5]] == 0).all() and (r.noise[:, [2, 3]] != 0).all()
    # Before the window a group is still identical (shared noise, ODE); after it, not.
    assert torch.equal(r.latents[0, 2], r.latents[1, 2])
    assert not torch.equal(r.latents[0, 4], r.latents[1, 4])
    # Branching computes the prefix once per group: same trajectories.
    branched = sample_rollout(
        policy,
        cond,
        noise,
        plan=RolloutPlan(plan.schedule, plan.stochastic, branch_at=2),
        eta=0.7,
        row_generators=seeded_generators(range(4), 1),
        chunk_size=4,
        group_size=2,
    )
    torch.testing.assert_close(branched.latents, r.latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(branched.log_probs, r.log_probs, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="same noise"):
        sample_rollout(
            policy,
            cond,
            torch.randn_like(noise),
            plan=branched_plan(plan),
            eta=0.7,
            generator=torch.Generator(),
            chunk_size=4,
            group_size=2,
        )


def branched_plan(plan: RolloutPlan) -> RolloutPlan:
    return RolloutPlan(plan.schedule, plan.stochastic, branch_at=2)


def test_flash_tail_runs_dpm_solver_on_the_compressed_schedule():
    policy = _tiny()
    plan = _plan(policy, kind="mixgrpo", size=2, flash=True, flash_compress_ratio=0.8)
    assert plan.dpm_from == 2 and plan.schedule.num_steps == 2 + 3  # 5 → max(2, int(5·0.8)) − 1
    assert plan.stochastic.tolist() == [True, True, False, False, False]
    cond = policy.encode_prompts(PROMPTS[:1])
    noise = policy.initial_noise(1, generator=torch.Generator().manual_seed(0))
    r = sample_rollout(
        policy, cond, noise, plan=plan, eta=0.7, generator=torch.Generator(), chunk_size=1
    )
    sig = plan.schedule.sigmas
    x, history = r.latents[:, 2], None
    with torch.no_grad():
        for i in range(2, 5):
            x0 = policy.denoise_step(x, i, plan.schedule, cond, eta=0.0).pred_original_sample
            s, sn = float(sig[i]), float(sig[i + 1])
            if history is None or i == 4:
                x = dpm_solver_pp_step(x, x0, s, sn)
            else:
                x = dpm_solver_pp_step(x, x0, s, sn, prev_x0=history[0], prev_sigma=history[1])
            history = (x0, s)
            assert torch.equal(x, r.latents[:, i + 1])
    assert (r.log_probs[:, 2:] == 0).all()


def _policies():
    from dancegrpo_testing.diffusion_models import TINY_T5_MAX_LENGTH, tiny_flux_pipeline
    from dancegrpo_testing.video_models import (
        TINY_LLAMA_MAX_LENGTH,
        tiny_hunyuan_video_pipeline,
        tiny_skyreels_i2v_pipeline,
    )
    from dancegrpo_trainer.policies.flux import FluxConfig, FluxPolicy
    from dancegrpo_trainer.policies.hunyuan_video import HunyuanVideoConfig, HunyuanVideoPolicy
    from dancegrpo_trainer.policies.skyreels_i2v import SkyReelsI2VConfig, SkyReelsI2VPolicy

    flux = FluxPolicy.from_pipeline(
        tiny_flux_pipeline(),
        FluxConfig(resolution=16, device="cpu", max_sequence_length=TINY_T5_MAX_LENGTH),
        copy=True,
    )
    skyreels = SkyReelsI2VPolicy.from_pipeline(
        tiny_skyreels_i2v_pipeline(),
        SkyReelsI2VConfig(
            resolution=16,
            num_frames=5,
            device="cpu",
            max_sequence_length=16,
            crop_start=None,
            true_cfg_scale=3.0,
        ),
        copy=True,
    )
    hunyuan = HunyuanVideoPolicy.from_pipeline(
        tiny_hunyuan_video_pipeline(),
        HunyuanVideoConfig(
            resolution=16,
            num_frames=5,
            device="cpu",
            max_sequence_length=TINY_LLAMA_MAX_LENGTH,
            crop_start=None,
        ),
        copy=True,
    )
    return {
        "tiny_flow": _tiny(),
        "flux": flux,
        "hunyuan_video": hunyuan,
        "skyreels_i2v": skyreels,
        **_wan_policies(),
    }


def _wan_policies() -> dict:
    """Wan2.2 A14B T2V and I2V: two experts, the shift read from the checkpoint (12 and 5;
    with 5, the window of the flash test below crosses the expert boundary)."""
    from dancegrpo_testing.wan_models import (
        TINY_WAN_MAX_LENGTH,
        tiny_wan22_i2v_pipeline,
        tiny_wan22_t2v_pipeline,
    )
    from dancegrpo_trainer.policies.wan import WanConfig, WanPolicy
    from dancegrpo_trainer.policies.wan_i2v import WanI2VPolicy

    config = WanConfig(
        resolution=32, num_frames=5, device="cpu", max_sequence_length=TINY_WAN_MAX_LENGTH
    )
    return {
        "wan22_t2v": WanPolicy.from_pipeline(tiny_wan22_t2v_pipeline(), config, copy=True),
        "wan22_i2v": WanI2VPolicy.from_pipeline(tiny_wan22_i2v_pipeline(), config, copy=True),
    }


@pytest.fixture(scope="module")
def policies():
    return _policies()


@pytest.mark.parametrize("sampler", ["dancegrpo", "flow_grpo", "cps"])
@pytest.mark.parametrize(
    "which", ["tiny_flow", "flux", "hunyuan_video", "skyreels_i2v", "wan22_t2v", "wan22_i2v"]
)
def test_every_flow_policy_samples_every_sampler_in_a_flash_window_with_ratio_one(
    policies, which, sampler
):
    policy = policies[which]
    images = (
        torch.randint(0, 255, (1, 20, 24, 3), dtype=torch.uint8)
        if which in ("skyreels_i2v", "wan22_i2v")
        else None
    )
    cond = policy.encode_prompts(PROMPTS[:1], images).select([0, 0])
    noise = policy.initial_noise(1, generator=torch.Generator().manual_seed(0))
    noise = noise.repeat_interleave(2, dim=0)
    sampling = config_from_dict(
        _sections(
            sampler=sampler,
            num_steps=5,
            window={"kind": "mixgrpo", "size": 2, "flash": True, "branch": True},
        )
    ).sampling
    plan = rollout_plan(policy, sampling, step=25, seed=0)  # start 1: a 1-step prefix
    assert plan.branch_at == 1 and plan.dpm_from == 3 and plan.sampler == sampler
    r = sample_rollout(
        policy,
        cond,
        noise,
        plan=plan,
        eta=0.8,
        generator=torch.Generator().manual_seed(1),
        chunk_size=2,
        group_size=2,
        decode=False,
    )
    assert r.recorded_steps == [1, 2] and torch.isfinite(r.latents).all()
    if which == "wan22_i2v":  # one window step per expert
        assert policy.expert_indices(r.schedule.timesteps[[1, 2]]).tolist() == [0, 1]
    with torch.no_grad():
        for i in r.recorded_steps:
            out = policy.denoise_step(
                r.latents[:, i],
                i,
                r.schedule,
                cond,
                eta=0.8,
                prev_sample=r.latents[:, i + 1],
                sampler=sampler,
            )
            torch.testing.assert_close(out.log_prob, r.log_probs[:, i], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- the trainer


class _Scorer:
    def submit(self, frames, prompts, condition_images=None, metadata=None):  # noqa: ANN001
        import concurrent.futures

        import numpy as np

        from dancegrpo_trainer.scoring import Scores

        x = np.asarray(frames, dtype=np.float32)
        score = (x[..., 0].mean(axis=(1, 2)) - x[..., 2].mean(axis=(1, 2))) / 255.0
        f: concurrent.futures.Future = concurrent.futures.Future()
        f.set_result(Scores({"r/score": score}, {"r/score": score}))
        return f

    def close(self) -> None:
        pass


def _trainer(tmp_path: Path, *overrides: str, out: str = "run"):
    from dancegrpo_trainer.config import load_config
    from dancegrpo_trainer.trainer import Trainer

    root = Path(__file__).resolve().parents[3]
    cfg = load_config(
        root / "configs/demo_grpo.yaml",
        [
            "rewards.endpoints.0.target=x:1",
            "rewards.endpoints.0.reward=r",
            f"run.output_dir={tmp_path / out}",
            "run.progress=false",
            "run.sample_grid_every=0",
            "data.eval_prompts=[]",
            "sampling.prompts_per_step=2",
            "sampling.group_size=2",
            "sampling.num_steps=6",
            "sampling.rollout_batch_size=4",
            "train.micro_batch_size=2",
            "model.options.channels=8",
            "model.options.embed_dim=16",
            "model.options.num_blocks=1",
            "run.checkpoint_every=1",
            "run.keep_checkpoints=4",
            *overrides,
        ],
    )
    return Trainer(cfg, scorer=_Scorer())


@pytest.mark.parametrize(
    "window",
    [
        "sampling.window={kind: fast, size: 2, branch: true}",
        "sampling.window={kind: mixgrpo, size: 2, iters_per_move: 1, flash: true}",
        "sampling.sampler=cps",
    ],
    ids=["fast-branch", "mixgrpo-flash", "cps"],
)
def test_trainer_trains_only_the_window_and_resumes_exactly(tmp_path, window, monkeypatch):
    from dancegrpo_trainer.algorithms.grpo import GRPO

    trained: list[list[int]] = []
    original = GRPO.terms
    monkeypatch.setattr(
        GRPO, "terms", lambda self, r, g: trained.append(original(self, r, g)) or trained[-1]
    )
    full = _trainer(tmp_path, window, "run.max_steps=3", out="full")
    full.train()
    full.close()
    half = _trainer(tmp_path, window, "run.max_steps=2", out="resumed")
    half.train()
    half.close()
    resumed = _trainer(tmp_path, window, "run.max_steps=3", out="resumed")
    assert resumed.step == 2
    resumed.train()
    resumed.close()
    a = full.policy.trainable_module().state_dict()
    b = resumed.policy.trainable_module().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if "window" in window:
        cfg = full.cfg
        for index, terms in enumerate(trained[:6]):  # 2 micro-batches per step
            step = index // 2
            start, stop = window_bounds(cfg.sampling.window, 6, step=step, seed=cfg.run.seed)
            assert terms == list(range(start, stop))
    else:
        assert all(len(t) == 3 for t in trained)  # timestep_fraction 0.5 of 6
