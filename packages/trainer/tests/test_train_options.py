"""Issue 15's small training options: dropping groups whose rewards are all equal, the KL
penalty on the velocity or on the mean, CFG-free training, a separate eval resolution,
and the configured sampler in ``dancegrpo-sample`` / ``dancegrpo-eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dancegrpo_testing.flow_policies import FLOW_KINDS
from dancegrpo_testing.scorers import RednessScorer
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_testing.trainer_runs import records, trainable_state
from dancegrpo_trainer.algorithms.grpo import GRPO
from dancegrpo_trainer.config import ConfigError, ModelConfig, TrainConfig, config_from_dict
from dancegrpo_trainer.core import gaussian_mean_kl, group_advantages, velocity_kl
from dancegrpo_trainer.rollout import sample_rollout, seeded_generators
from dancegrpo_trainer.trainer import Trainer
from dancegrpo_trainer.update import GradNormMonitor, policy_update
from dancegrpo_trainer.weights import ReferencePolicy

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = ["a red square", "a blue square", "a green square"]


def sections(out: Path, **override: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, dict[str, Any]] = {
        "model": {
            "kind": "tiny_flow",
            "options": {"latent_size": 4, "channels": 8, "embed_dim": 16, "num_blocks": 1},
        },
        "rewards": {"endpoints": [{"target": "x:1", "reward": "r"}]},
        "sampling": {
            "num_steps": 4,
            "eta": 0.7,
            "group_size": 4,
            "prompts_per_step": 3,
            "rollout_batch_size": 5,
        },
        "train": {
            "learning_rate": 1e-3,
            "micro_batch_size": 3,
            "timestep_fraction": 0.5,
            "skip_grad_norm_factor": 0,
        },
        "data": {"train_prompts": PROMPTS, "shuffle": False},
        "run": {
            "output_dir": str(out),
            "progress": False,
            "sample_grid_every": 0,
            "max_steps": 2,
            "checkpoint_every": 1,
        },
    }
    for key, values in override.items():
        base[key] = {**base.get(key, {}), **values}
    return base


def run(out: Path, scorer: RednessScorer, steps: int | None = None, **override) -> Trainer:
    trainer = Trainer(config_from_dict(sections(out, **override)), scorer=scorer)
    try:
        if steps is None:
            trainer.train()
        else:
            for _ in range(steps):
                trainer.train_step()
    finally:
        trainer.close()
    return trainer


# ------------------------------------------------------------ dropping constant groups


def _rollout_and_policy():
    from dancegrpo_testing.flow_policies import tiny_flow_policy

    policy = tiny_flow_policy("tiny_flow")
    cond = policy.encode_prompts(PROMPTS).select(torch.arange(3).repeat_interleave(4))
    noise = policy.initial_noise(12, generator=torch.Generator().manual_seed(0))
    rollout = sample_rollout(
        policy,
        cond,
        noise,
        num_steps=4,
        eta=0.7,
        row_generators=seeded_generators(range(12), 0, "drop"),
        chunk_size=5,
        decode=False,
    )
    return policy, rollout


def _gradient(policy, rollout, advantages, keep, pairs: list | None = None, fsdp: bool = False):
    """The update's gradient (lr 0, no clipping), recording (sample, step) pairs trained."""
    cfg = TrainConfig(micro_batch_size=3, timestep_fraction=0.5, max_grad_norm=1e9, fsdp=fsdp)
    module = policy.trainable_module()
    algorithm = GRPO(cfg, policy)
    finals = rollout.latents[:, -1]
    if pairs is not None:
        original = algorithm.loss

        def recording(batch, adv, term):  # noqa: ANN001, ANN202
            for row in batch.latents[:, -1]:
                index = int((finals == row).flatten(1).all(dim=1).nonzero())
                pairs.append((index, term))
            return original(batch, adv, term)

        algorithm.loss = recording
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    result = policy_update(
        policy,
        optimizer,
        rollout,
        advantages,
        cfg=cfg,
        grad_monitor=GradNormMonitor(20, 0),
        keep=keep,
        algorithm=algorithm,
        timestep_generator=lambda k: torch.Generator().manual_seed(1000 + k),
    )
    return [p.grad.clone() for p in module.parameters()], result


def test_dropped_groups_never_train_and_kept_samples_get_grpos_gradient_and_steps():
    policy, rollout = _rollout_and_policy()
    rewards = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.4, 0.4, 0.4, 0.4, 0.2, 0.7, 0.1, 0.0])
    advantages = group_advantages(rewards, group_size=4)
    assert torch.equal(advantages[4:8], torch.zeros(4))  # the constant group: exactly 0
    keep = torch.tensor([True] * 4 + [False] * 4 + [True] * 4)
    full_pairs: list = []
    drop_pairs: list = []
    full, _ = _gradient(policy, rollout, advantages, None, full_pairs)
    dropped, result = _gradient(policy, rollout, advantages, keep, drop_pairs)
    # Same micro-batches and steps for every kept sample; the dropped ones never run.
    assert sorted(drop_pairs) == sorted(p for p in full_pairs if keep[p[0]])
    assert {i for i, _ in full_pairs} == set(range(12))
    # GRPO gives the zero-advantage group zero gradient, so dropping it rescales GRPO's
    # gradient from a mean over 12 samples to a mean over the 8 kept ones.
    for a, b in zip(dropped, full, strict=True):
        torch.testing.assert_close(a, b * 12 / 8, rtol=1e-5, atol=1e-9)
    assert max(float(g.abs().max()) for g in full) > 0
    assert result.metrics["skipped"] == 0.0


def test_under_fsdp_a_micro_batch_left_out_whole_still_runs_with_zero_weight():
    # Sharded passes are collectives: a rank must run every global micro-batch, even one
    # whose rows it all drops, or it would desynchronise from a rank that keeps some.
    policy, rollout = _rollout_and_policy()
    rewards = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.4, 0.4, 0.4, 0.4, 0.2, 0.7, 0.1, 0.0])
    advantages = group_advantages(rewards, group_size=4)
    keep = torch.tensor([True] * 3 + [False] * 3 + [True] * 6)  # micro-batch 1: rows 3-5
    plain_pairs: list = []
    fsdp_pairs: list = []
    plain, _ = _gradient(policy, rollout, advantages, keep, plain_pairs)
    sharded, result = _gradient(policy, rollout, advantages, keep, fsdp_pairs, fsdp=True)
    assert all(torch.equal(a, b) for a, b in zip(sharded, plain, strict=True))
    assert {i for i, _ in plain_pairs} == {0, 1, 2, 6, 7, 8, 9, 10, 11}
    extra = [p for p in fsdp_pairs if p not in plain_pairs]
    assert extra and {i for i, _ in extra} == {3}  # one row of micro-batch 1, each term
    assert sorted(t for _, t in extra) == sorted({t for i, t in fsdp_pairs if i in (3, 4, 5)})
    assert result.metrics["skipped"] == 0.0


def test_keeping_every_group_is_bit_identical_to_grpo():
    policy, rollout = _rollout_and_policy()
    advantages = torch.linspace(-1, 1, 12)
    full, _ = _gradient(policy, rollout, advantages, None)
    kept, _ = _gradient(policy, rollout, advantages, torch.ones(12, dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(full, kept, strict=True))


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "wait_for_all"])
def test_trainer_drops_constant_groups_logs_the_share_and_resumes_exactly(tmp_path, pipelined):
    train = {"drop_constant_groups": True, "pipeline_update": pipelined}
    full = run(tmp_path / "full", RednessScorer(("blue",)), train=train)
    rows = records(tmp_path / "full")
    assert [r["groups_dropped_frac"] for r in rows] == [pytest.approx(1 / 3)] * 2
    assert all(r["skipped"] == 0 and r["grad_norm"] > 0 for r in rows)
    half = run(tmp_path / "resumed", RednessScorer(("blue",)), run={"max_steps": 1}, train=train)
    assert half.step == 1
    resumed = run(tmp_path / "resumed", RednessScorer(("blue",)), train=train)
    for k, v in trainable_state(resumed).items():
        assert torch.equal(v, trainable_state(full)[k]), k


def test_pipelined_and_wait_for_all_drop_alike(tmp_path):
    a = run(tmp_path / "a", RednessScorer(("blue",)), train={"drop_constant_groups": True})
    b = run(
        tmp_path / "b",
        RednessScorer(("blue",)),
        train={"drop_constant_groups": True, "pipeline_update": False},
    )
    for k, v in trainable_state(a).items():
        torch.testing.assert_close(v, trainable_state(b)[k], rtol=0, atol=1e-5)
    ra, rb = records(tmp_path / "a"), records(tmp_path / "b")
    for x, y in zip(ra, rb, strict=True):
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_best_of_n_selection_drops_alike_in_both_update_paths(tmp_path):
    best = {"best_of_n": {"top_k": 1, "bottom_k": 1}}
    runs = {}
    for pipelined in (True, False):
        out = tmp_path / str(pipelined)
        train = {"drop_constant_groups": True, "pipeline_update": pipelined}
        runs[pipelined] = run(out, RednessScorer(("blue",)), steps=1, rewards=best, train=train)
        (row,) = records(out)
        assert row["groups_dropped_frac"] == pytest.approx(1 / 3) and row["grad_norm"] > 0
    for k, v in trainable_state(runs[True]).items():
        torch.testing.assert_close(v, trainable_state(runs[False])[k], rtol=0, atol=1e-5)


def test_a_step_whose_every_group_is_constant_trains_nothing(tmp_path):
    scorer = RednessScorer(("square",))
    trainer = Trainer(
        config_from_dict(sections(tmp_path, train={"drop_constant_groups": True})), scorer=scorer
    )
    before = trainable_state(trainer)
    record = trainer.train_step()
    trainer.close()
    assert record["groups_dropped_frac"] == 1.0 and record["skipped"] == 1.0
    assert record["grad_norm"] == 0.0 and "loss" not in record
    assert all(torch.equal(v, trainable_state(trainer)[k]) for k, v in before.items())
    assert list(trainer.grad_monitor.history) == []  # no norm recorded for it


def test_drop_needs_group_advantages_and_works_with_fsdp(tmp_path):
    drop = {"drop_constant_groups": True}
    with pytest.raises(ConfigError, match="train.drop_constant_groups: needs rewards.advantage"):
        config_from_dict(sections(tmp_path, train=drop, rewards={"advantage": "per_prompt"}))
    cfg = config_from_dict(sections(tmp_path, train={**drop, "fsdp": True, "micro_batch_size": 4}))
    assert cfg.train.fsdp and cfg.train.drop_constant_groups


# ------------------------------------------------------------------------- KL penalty


def test_velocity_kl_of_a_hand_computed_case():
    v = torch.tensor([[1.0, 2.0], [0.5, -0.5]])
    ref = torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    torch.testing.assert_close(velocity_kl(v, ref), torch.tensor([2.5, 0.5]))


@pytest.mark.parametrize("kl_type", ["mean", "velocity"])
def test_kl_is_zero_at_the_reference_and_measures_what_kl_type_says(kl_type):
    from dancegrpo_testing.flow_policies import tiny_flow_policy

    policy = tiny_flow_policy("tiny_flow")
    cfg = TrainConfig(kl_coef=0.5, kl_type=kl_type)
    module = policy.trainable_module()
    algo = GRPO(cfg, policy, reference=ReferencePolicy(module, lora=False))
    cond = policy.encode_prompts(PROMPTS[:2])
    noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(0))
    rollout = sample_rollout(policy, cond, noise, num_steps=3, eta=0.7, chunk_size=2)
    i = 1
    step = algo.step_kwargs(rollout, i)
    x, t = rollout.latents[:, i], rollout.schedule.timesteps[i]
    out = policy.denoise_step(x, i, rollout.schedule, cond, **step)
    assert torch.equal(algo.kl(out, rollout, i, step), torch.zeros(2))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = policy.denoise_step(x, i, rollout.schedule, cond, **step)
    kl = algo.kl(out, rollout, i, step)
    with torch.no_grad():
        v = policy.predict(x, t, cond)
        with algo.reference.active():
            v_ref = policy.predict(x, t, cond)
            ref = policy.denoise_step(x, i, rollout.schedule, cond, **step)
    direct = (
        velocity_kl(v, v_ref)
        if kl_type == "velocity"
        else gaussian_mean_kl(out.mean, ref.mean, out.std)
    )
    torch.testing.assert_close(kl, direct, rtol=1e-6, atol=0)
    assert (kl > 0).all()
    # The two are one quantity on the DanceGRPO SDE: μ = x − Δ·[β·v + g²x/(2σ)] with
    # β = 1 + g²(1−σ)/(2σ), so ‖Δμ‖²/(2s²) = Δ·β²/(2g²)·‖Δv‖² (s² = g²Δ).
    sigma, sigma_next = (float(s) for s in rollout.schedule.sigmas[i : i + 2])
    g, delta = 0.7, sigma - sigma_next
    beta = 1 + g**2 * (1 - sigma) / (2 * sigma)
    mean_kl = gaussian_mean_kl(out.mean, ref.mean, out.std).detach()
    torch.testing.assert_close(
        mean_kl, delta * beta**2 / (2 * g**2) * velocity_kl(v, v_ref), rtol=1e-4, atol=0
    )
    # The gradient reaches the trained velocity only (the reference runs without grad).
    module.zero_grad(set_to_none=True)
    kl.sum().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in module.parameters())
    assert all(not t.requires_grad for t in algo.reference.frozen)


def test_velocity_kl_trains_and_stable_diffusion_refuses_it(tmp_path):
    run(tmp_path, RednessScorer(), train={"kl_coef": 0.1, "kl_type": "velocity"})
    rows = records(tmp_path)
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # step 1 is at the reference
    with pytest.raises(ConfigError, match="train.kl_type: velocity compares"):
        config_from_dict(
            sections(
                tmp_path,
                model={"kind": "stable_diffusion", "path": "x", "options": {}},
                train={"kl_type": "velocity"},
            )
        )
    with pytest.raises(ConfigError, match="train.kl_type: must be one of"):
        config_from_dict(sections(tmp_path, train={"kl_type": "x-based"}))


# --------------------------------------------------------------------------- CFG-free


def _forward_batches(policy: Any, seen: list[tuple[str, int]]) -> None:
    """Records ``(denoiser name, batch rows)`` of every denoiser forward (Wan2.2 A14B: both
    experts)."""
    for name in ("unet", "transformer", "transformer_2"):
        module = getattr(policy, name, None)
        if module is None:
            continue

        def hook(mod, args, kwargs, name=name):  # noqa: ANN001, ANN202
            states = kwargs.get("hidden_states", args[0] if args else None)
            seen.append((name, int(states.shape[0])))

        module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def cfg_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dancegrpo_testing import diffusion_models as dm
    from dancegrpo_testing import qwen_image_models as qm
    from dancegrpo_testing import video_models as vm
    from dancegrpo_testing import wan_models as wm

    root = tmp_path_factory.mktemp("cfg")
    builds = {
        "sd3": dm.tiny_sd3_pipeline,
        "stable_diffusion": dm.tiny_stable_diffusion_pipeline,
        "skyreels_i2v": vm.tiny_skyreels_i2v_pipeline,
        "qwen_image": qm.tiny_qwen_image_pipeline,
        "qwen_image_edit": qm.tiny_qwen_image_edit_pipeline,
        "qwen_image_edit_plus": lambda: qm.tiny_qwen_image_edit_pipeline(plus=True),
        "wan_t2v": wm.tiny_wan22_t2v_pipeline,  # A14B: two experts, two guidance scales
        "wan_i2v": wm.tiny_wan_i2v_pipeline,
        "wan_ti2v": wm.tiny_wan22_ti2v_pipeline,
    }
    return {kind: dm.save_pipeline(build(), root / kind) for kind, build in builds.items()}


_QWEN = {"prompt_template_encode_start_idx": None, "true_cfg_scale": 4.0}
_WAN = {"num_frames": 5, "guidance_scale": 4.0}
CFG_MODELS = {
    "sd3": {
        "height": 16,
        "width": 16,
        "guidance_scale": 4.5,
        "options": {"max_sequence_length": 16},
    },
    "stable_diffusion": {"height": 16, "width": 16, "guidance_scale": 5.0},
    "skyreels_i2v": {
        "height": 16,
        "width": 16,
        "num_frames": 5,
        "options": {"max_sequence_length": 16, "crop_start": None, "true_cfg_scale": 4.0},
    },
    "qwen_image": {"height": 16, "width": 16, "options": {**_QWEN, "max_sequence_length": 48}},
    "qwen_image_edit": {
        "height": 16,
        "width": 16,
        "options": {**_QWEN, "condition_image_area": 1024},
    },
    "qwen_image_edit_plus": {
        "height": 16,
        "width": 16,
        "options": {**_QWEN, "condition_image_area": 1024, "vl_image_area": 56 * 56},
    },
    # shift 3 on 2 steps: t = 1000 (high-noise expert), 750 (low-noise expert, scale 3).
    "wan_t2v": {
        "height": 16,
        "width": 16,
        **_WAN,
        "options": {"max_sequence_length": 16, "shift": 3.0, "guidance_scale_2": 3.0},
    },
    "wan_i2v": {"height": 16, "width": 16, **_WAN, "options": {"max_sequence_length": 512}},
    "wan_ti2v": {"height": 32, "width": 32, **_WAN, "options": {"max_sequence_length": 16}},
}


@pytest.mark.parametrize("kind", sorted(CFG_MODELS))
def test_cfg_free_runs_one_conditional_forward_per_step(cfg_folders, kind):
    from dancegrpo_testing.flow_policies import IMAGE_KINDS, condition_images
    from dancegrpo_trainer.config import CFG_WEIGHT_OPTIONS
    from dancegrpo_trainer.policy_factory import build_policy

    model = ModelConfig(kind=kind, path=str(cfg_folders[kind]), **CFG_MODELS[kind])
    model.validate()
    images = condition_images(kind, 2) if kind in IMAGE_KINDS else None
    rows = {}
    for cfg_free in (False, True):
        torch.manual_seed(0)
        policy = build_policy(model, torch.device("cpu"), cfg_free=cfg_free)
        weights = [getattr(policy.config, name) for name in CFG_WEIGHT_OPTIONS[kind]]
        weights = [w for w in weights if w is not None]  # Wan's guidance_scale_2 may be unset
        assert all(w == 1.0 for w in weights) if cfg_free else all(w > 1 for w in weights)
        seen: list[tuple[str, int]] = []
        _forward_batches(policy, seen)
        cond = policy.encode_prompts(["a cat", "a dog"], images)
        noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(0))
        sample_rollout(policy, cond, noise, num_steps=2, eta=0.5, chunk_size=2, decode=False)
        rows[cfg_free] = seen
        has_negative = any(k.startswith("negative_") for k in cond.tensors)
        assert has_negative != cfg_free  # no unconditional embeddings are even encoded
    # 2 steps, negatives batched with the prompts, one forward per step without CFG.
    assert [b for _, b in rows[False]] == [4, 4] and [b for _, b in rows[True]] == [2, 2]
    if kind == "wan_t2v":  # both experts' guidance is off
        assert [n for n, _ in rows[True]] == ["transformer", "transformer_2"]


def test_cfg_free_trains_and_adapters_without_cfg_refuse_it(cfg_folders, tmp_path):
    cfg = config_from_dict(
        sections(
            tmp_path,
            model={"kind": "sd3", "path": str(cfg_folders["sd3"]), **CFG_MODELS["sd3"]},
            sampling={"num_steps": 2, "prompts_per_step": 1},
            train={"cfg_free": True},
            run={"max_steps": 1},
        )
    )
    trainer = Trainer(cfg, scorer=RednessScorer())
    seen: list[tuple[str, int]] = []
    _forward_batches(trainer.policy, seen)
    record = trainer.train_step()
    trainer.close()
    assert trainer.policy.config.guidance_scale == 1.0 and not trainer.policy.config.do_cfg
    # A rollout of 4 rows and micro-batches of 3 + 1: never the doubled CFG batch.
    assert record["grad_norm"] > 0 and max(b for _, b in seen) == 4
    for kind in ("flux", "hunyuan_video", "flux_kontext", "tiny_flow"):
        model = {"kind": kind, "path": "x", "options": {}, "num_frames": 5}
        if kind != "hunyuan_video":
            model["num_frames"] = 1
        data = {"train_prompts": str(tmp_path / "edits.jsonl")} if kind == "flux_kontext" else {}
        with pytest.raises(ConfigError, match=f"train.cfg_free: model.kind {kind} has no"):
            config_from_dict(sections(tmp_path, model=model, train={"cfg_free": True}, data=data))


# -------------------------------------------------------------------- eval resolution


@pytest.fixture(scope="module")
def flow_policies():
    from dancegrpo_testing.flow_policies import FLOW_KINDS, tiny_flow_policy

    return {kind: tiny_flow_policy(kind) for kind in FLOW_KINDS}


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_every_flow_policy_samples_at_another_resolution_with_the_same_modules(flow_policies, kind):
    from dancegrpo_testing.flow_policies import condition_images
    from dancegrpo_trainer.config import PIXEL_MULTIPLES

    policy = flow_policies[kind]
    h, w = policy.height, policy.width
    other = policy.at_resolution(2 * h, w)
    assert policy.at_resolution(h, w) is policy
    assert other.trainable_module() is policy.trainable_module()
    assert (policy.height, policy.width) == (h, w)  # the original is untouched
    cond = other.encode_prompts(["a cat"], condition_images(kind, 1))
    noise = other.initial_noise(1, generator=torch.Generator().manual_seed(0))
    r = sample_rollout(other, cond, noise, num_steps=2, eta=0.5, chunk_size=1)
    assert r.frames.shape[-3:] == (2 * h, w, 3)
    if kind != "tiny_flow":  # its latent grid is fixed (latent_size 4), decoded larger
        assert policy.initial_noise(1).shape != noise.shape
    # The eval-size check of the config (PIXEL_MULTIPLES) is the adapter's own geometry:
    # one multiple more fits, half of one does not (Wan2.2 TI2V-5B: 32, its VAE is 16x).
    multiple = PIXEL_MULTIPLES.get(kind, 4)  # tiny_flow: latent_size 4
    assert policy.at_resolution(h + multiple, w).height == h + multiple
    with pytest.raises(ValueError, match="multiple|divide"):
        policy.at_resolution(h + multiple // 2, w)


def test_stable_diffusion_samples_at_another_resolution(cfg_folders):
    from dancegrpo_trainer.policy_factory import build_policy

    model = ModelConfig(kind="stable_diffusion", path=str(cfg_folders["stable_diffusion"]))
    policy = build_policy(model, torch.device("cpu"))
    other = policy.at_resolution(32, 24)
    cond = other.encode_prompts(["a cat"])
    noise = other.initial_noise(1, generator=torch.Generator().manual_seed(0))
    r = sample_rollout(other, cond, noise, num_steps=2, eta=0.5, chunk_size=1)
    assert r.frames.shape == (1, 32, 24, 3) and other.unet is policy.unet
    with pytest.raises(ValueError, match="multiples of 8"):
        policy.at_resolution(30, 24)


def test_trainer_evaluates_at_the_eval_resolution(tmp_path):
    scorer = RednessScorer()
    trainer = Trainer(
        config_from_dict(
            sections(
                tmp_path,
                eval={"height": 32, "width": 24, "samples_per_prompt": 1},
                data={"eval_prompts": ["a red square"]},
                run={"max_steps": 1},
            )
        ),
        scorer=scorer,
    )
    trainer.train()
    trainer.close()
    train_shapes = {s[1:] for s in scorer.shapes if s[0] != 1}
    eval_shapes = {s[1:] for s in scorer.shapes if s[0] == 1}
    assert train_shapes == {(16, 16, 3)} and eval_shapes == {(32, 24, 3)}
    assert trainer.eval_policy.trainable_module() is trainer.policy.trainable_module()


@pytest.mark.parametrize(
    ("model", "eval_size", "message"),
    [
        ({"kind": "flux", "path": "x"}, {"height": 40}, "eval.height: must be a multiple of 16"),
        ({"kind": "sd3", "path": "x"}, {"width": 24}, "eval.width: must be a multiple of 16"),
        ({"kind": "stable_diffusion", "path": "x"}, {"width": 20}, "eval.width: .* of 8"),
        ({"kind": "qwen_image", "path": "x"}, {"height": 24}, "eval.height: .* of 16"),
        (
            {"kind": "wan_t2v", "path": "x", "num_frames": 5},
            {"width": 40},
            "eval.width: must be a multiple of 16",
        ),
        (
            {"kind": "wan_ti2v", "path": "x", "num_frames": 5, "height": 32, "width": 32},
            {"height": 48},
            "eval.height: must be a multiple of 32 for model.kind wan_ti2v",
        ),
        (
            {"kind": "tiny_flow", "options": {"latent_size": 4}},
            {"height": 18},
            "eval.height: must be a multiple of 4",
        ),
        ({"kind": "tiny_flow", "options": {}}, {"height": 0}, "eval.height: must be >= 1"),
    ],
)
def test_eval_resolution_is_checked_against_the_adapter_geometry(
    tmp_path, model, eval_size, message
):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(sections(tmp_path, model=model, eval=eval_size))


# ------------------------------------------------------- dancegrpo-sample / dancegrpo-eval


def _spy_rollouts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, float]]:
    import dancegrpo_trainer.rollout as rollout_module

    seen: list[tuple[str | None, float]] = []
    original = rollout_module.sample_rollout

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        plan = kwargs.get("plan")
        seen.append((plan.sampler if plan is not None else None, kwargs["eta"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(rollout_module, "sample_rollout", spy)
    return seen


def test_sample_cli_samples_with_the_configured_sampler(tmp_path, monkeypatch):
    import dancegrpo_trainer.scoring as scoring
    from dancegrpo_trainer.cli import sample_main

    class FakeScorer(RednessScorer):
        def __init__(self, endpoints, **kwargs) -> None:  # noqa: ANN001, ANN003
            super().__init__(label=endpoints[0].label)

    monkeypatch.setattr(scoring, "RewardScorer", FakeScorer)
    seen = _spy_rollouts(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red image\n")
    scores = {}
    for sampler in ("cps", "dancegrpo"):
        torch.manual_seed(0)  # same tiny weights for both samplers
        out = tmp_path / sampler
        argv = ["--config", str(ROOT / "configs/demo_grpo.yaml"), "--prompts", str(prompts)]
        argv += ["--out", str(out), "--n", "3", "sampling.num_steps=3", "sampling.eta=0.9"]
        assert sample_main([*argv, f"sampling.sampler={sampler}"]) == 0
        scores[sampler] = json.loads((out / "results.json").read_text())[0]["scores"]
    assert seen == [("cps", 0.9), ("dancegrpo", 0.9)]
    assert scores["cps"] != scores["dancegrpo"]  # same noise, another step rule


def test_eval_cli_uses_sampler_eta_resolution_and_cfg_settings_of_the_config(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import dancegrpo_proto
    import dancegrpo_trainer.evaluate as ev

    shapes: list[tuple[int, ...]] = []

    class RecordingClient:
        def __init__(self, targets, **kwargs) -> None:  # noqa: ANN001
            pass

        def score(self, reward, *, prompts, images, **kwargs):  # noqa: ANN001
            shapes.append(images.shape)
            return {"score": images[..., 0].mean(axis=(1, 2)).astype(np.float32)}

        def close(self) -> None:
            pass

    monkeypatch.setattr(dancegrpo_proto, "RewardClient", RecordingClient)
    seen = _spy_rollouts(monkeypatch)
    torch.manual_seed(0)
    from dancegrpo_trainer.config import load_config
    from dancegrpo_trainer.policy_factory import build_policy

    cfg = load_config(ROOT / "configs/demo_grpo.yaml")
    tuned = tmp_path / "tuned.safetensors"
    save_file(build_policy(cfg.model, torch.device("cpu")).trainable_module().state_dict(), tuned)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    argv = ["--config", str(ROOT / "configs/demo_grpo.yaml"), "--tuned", str(tuned)]
    argv += ["--prompts", str(prompts), "--reward", "c=x:1/color_match", "--out", str(tmp_path)]
    overrides = ["sampling.sampler=flow_grpo", "eval.eta=0.4", "eval.height=32", "eval.width=8"]
    assert ev.main([*argv, "--num-steps", "2", *overrides]) == 0
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    assert (settings["sampler"], settings["eta"]) == ("flow_grpo", 0.4)
    assert seen == [("flow_grpo", 0.4)] * 2  # base and tuned
    assert {s[1:] for s in shapes} == {(32, 8, 3)}
    seen.clear()
    assert ev.main([*argv, "--num-steps", "2", "--eta", "0", *overrides]) == 0
    assert seen == [("flow_grpo", 0.0)] * 2
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["eta"] == 0.0
