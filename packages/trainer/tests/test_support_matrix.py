"""The support matrix (issues 15, 16, 17): every policy adapter × every training algorithm
through the real :class:`Trainer`, and every combination that makes no sense refused at
``load_config`` time with an error that starts with the field to change.

One real train step per case: a tiny random-weight policy (``dancegrpo_testing.
flow_policies``; Stable Diffusion from ``diffusion_models``), an in-process scorer (red
minus blue, constant for the prompt "a still blue dog"), 2 prompts × G = 2, 3 sampling
steps, rollout chunks = micro-batches = one prompt group, so every recompute runs on exactly
the rows the rollout sampled together and the on-policy ratio is 1 to the bit.

Covering design (the full cross product is 13 flow policies × 2 ratio algorithms × 3
samplers × 5 windows × LoRA/full = 780 steps; this runs 106):

- every flow policy (the 12 ``FLOW_KINDS`` and Wan2.2 T2V-A14B, two experts) runs
  ``grpo`` and ``grpo_guard`` with each of the 3 samplers (6 cases: the algorithm × sampler
  pairs in full). Case ``r`` (0–5) of the ``k``-th policy takes window ``WINDOWS[(r + k) %
  5]``, LoRA when ``r + k`` is odd, and the extra ``EXTRAS[(r + k) % 3]`` (plain, KL on the
  step means, KL on the velocity). So each policy trains under all 5 windows (full, fast,
  fast with branching, MixGRPO, MixGRPO-Flash) and each algorithm with LoRA and full
  fine-tune; across the 13 policies every (algorithm, sampler, window) triple occurs;
- every flow policy runs ``nft`` with LoRA and with full fine-tune (its rollouts are ODE
  rollouts: sampler and window do not apply), CFG-free on the adapters with CFG (NFT
  refuses true CFG), KL on the velocity with full fine-tune, dropping constant groups
  with LoRA; full-window ratio cases drop constant groups too;
- Stable Diffusion (DDIM-η, the only sampler and window it takes, ``grpo`` only) runs LoRA
  and full fine-tune.

Windows train with ``skip_last_timestep`` (3 steps: windows of 1 or 2 of the first two
steps, sliding or drawn anew each train step); the full window trains ``timestep_fraction``
0.67 of all 3 steps. Wan2.2 A14B with one expert trained has a test of its own.

Each case checks: finite loss and gradient norm; the trainable parameters moved and
nothing else did (every parameter and buffer of every module of the policy: text
encoders, VAE, the frozen base under LoRA); with a ratio, ``ratio_min = ratio_max = 1``,
no clipping, ``approx_kl = 0`` (and GRPO-Guard's mean shift 0) on the first, on-policy
update; the KL penalty exactly 0 at the reference; the trained steps are the SDE window's;
``groups_dropped_frac`` is 0.5 where constant groups are dropped.

Save → resume (``@slow``, one policy per adapter family × algorithm, ``RESUMED``): two
steps in one run equal one step, a checkpoint, and a resumed second step, bit for bit
(trainable weights, NFT's old policy, the logged step record).

Multi-rank (2 gloo ranks = 1 process) and FSDP are not repeated here: they are tested on
tiny_flow (``grpo``, ``grpo_guard``, ``nft``: test_trainer_distributed.py,
test_trainer_fsdp.py, test_train_options_distributed.py, test_algorithm_nft.py) and on
Wan2.2 A14B (test_trainer_wan_distributed.py), all marked slow.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dancegrpo_testing.flow_policies import (
    FLOW_KINDS,
    IMAGE_KINDS,
    TWO_EXPERT_WAN,
    tiny_flow_policy,
)
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_trainer.config import (
    CFG_WEIGHT_OPTIONS,
    PIXEL_MULTIPLES,
    ConfigError,
    config_from_dict,
)
from dancegrpo_trainer.policy_factory import cfg_weights
from dancegrpo_trainer.scoring import Scores
from dancegrpo_trainer.trainer import Trainer
from dancegrpo_trainer.windows import window_bounds

NUM_STEPS = 3
SAMPLERS = ("dancegrpo", "flow_grpo", "cps")
#: ``sampling.window`` per name (3 steps; windows train with ``skip_last_timestep``, so
#: they hold 1 or 2 of the first 2 steps and CPS's deterministic last step is never one).
WINDOWS: dict[str, dict[str, Any]] = {
    "full": {},
    "fast": {"kind": "fast", "size": 1},
    "fast_branch": {"kind": "fast", "size": 1, "span": [1, 2], "branch": True},
    "mixgrpo": {"kind": "mixgrpo", "size": 2},
    "mixgrpo_flash": {"kind": "mixgrpo", "size": 1, "iters_per_move": 1, "flash": True},
}
EXTRAS = ("plain", "kl_mean", "kl_velocity")
#: Every flow policy: ``FLOW_KINDS`` plus Wan2.2 T2V-A14B (``model.kind`` wan_t2v).
POLICIES = (*FLOW_KINDS, TWO_EXPERT_WAN)
FAMILIES = {
    "tiny": ("tiny_flow",),
    "flux": ("flux", "flux_kontext"),
    "sd3": ("sd3",),
    "hunyuan_video": ("hunyuan_video", "skyreels_i2v"),
    "qwen_image": ("qwen_image", "qwen_image_edit", "qwen_image_edit_plus"),
    "wan": ("wan_t2v", "wan_i2v", "wan_ti2v", TWO_EXPERT_WAN),
    "stable_diffusion": ("stable_diffusion",),
}
VIDEO = ("hunyuan_video", "skyreels_i2v", "wan_t2v", "wan_i2v", "wan_ti2v", TWO_EXPERT_WAN)
PROMPTS = ["a red cat", "a still blue dog"]  # "still": every sample scores 0.5


@dataclasses.dataclass(frozen=True)
class Case:
    """One train step of the matrix."""

    policy: str  # a POLICIES name or "stable_diffusion"
    algorithm: str
    sampler: str | None = None  # None: the policy's default (NFT: does not apply)
    window: str = "full"
    lora: bool = False
    extra: str = "plain"
    drop: bool = False

    @property
    def kind(self) -> str:
        return "wan_t2v" if self.policy == TWO_EXPERT_WAN else self.policy

    @property
    def cfg_free(self) -> bool:
        return self.algorithm == "nft" and self.kind in CFG_WEIGHT_OPTIONS

    @property
    def id(self) -> str:
        parts = [self.policy, self.algorithm, self.sampler or "", self.window]
        parts += ["lora" if self.lora else "full", self.extra if self.extra != "plain" else ""]
        parts += ["drop" if self.drop else "", "cfg_free" if self.cfg_free else ""]
        return "-".join(p for p in parts if p)


def matrix_cases() -> list[Case]:
    """The covering design of the module docstring."""
    names = list(WINDOWS)
    cases = []
    for k, policy in enumerate(POLICIES):
        for r in range(6):
            window = names[(r + k) % len(names)]
            cases.append(
                Case(
                    policy,
                    ("grpo", "grpo_guard")[r // 3],
                    SAMPLERS[r % 3],
                    window,
                    lora=(r + k) % 2 == 1,
                    extra=EXTRAS[(r + k) % 3],
                    drop=window == "full",
                )
            )
        cases.append(Case(policy, "nft", extra="kl_velocity"))
        cases.append(Case(policy, "nft", lora=True, drop=True))
    cases.append(Case("stable_diffusion", "grpo", extra="kl_mean"))
    cases.append(Case("stable_diffusion", "grpo", lora=True, drop=True))
    return cases


CASES = matrix_cases()
#: Save → resume: one policy per adapter family × algorithm (the family's members take
#: turns). Each runs the matrix case of that policy and algorithm whose window moves
#: between steps where one does, LoRA and full fine-tune alternating down the list.
RESUMED = {
    "grpo": ("tiny_flow", "flux", "sd3", "hunyuan_video", "qwen_image", TWO_EXPERT_WAN),
    "grpo_guard": (
        "tiny_flow",
        "flux_kontext",
        "sd3",
        "skyreels_i2v",
        "qwen_image_edit",
        "wan_i2v",
    ),
    "nft": ("tiny_flow", "flux_kontext", "sd3", "skyreels_i2v", "qwen_image_edit_plus", "wan_ti2v"),
}
MOVING_WINDOWS = ("fast", "fast_branch", "mixgrpo_flash")


def resume_cases() -> list[Case]:
    out = []
    for algorithm, policies in RESUMED.items():
        for i, policy in enumerate(policies):
            own = [c for c in CASES if c.policy == policy and c.algorithm == algorithm]
            own.sort(key=lambda c: (c.window not in MOVING_WINDOWS, c.lora != (i % 2 == 1)))
            out.append(own[0])
    return [*out, Case("stable_diffusion", "grpo", lora=True, drop=True)]


class _Scorer:
    """Redness of the frames (images or videos); a prompt with "still" scores 0.5."""

    def submit(self, frames, prompts, condition_images=None, metadata=None):  # noqa: ANN001
        x = np.asarray(frames, dtype=np.float32) / 255.0
        x = x.reshape(x.shape[0], -1, 3)
        score = (x[..., 0].mean(axis=1) - x[..., 2].mean(axis=1)).astype(np.float32)
        score[["still" in p for p in prompts]] = 0.5
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(Scores({"r/score": score}, {"r/score": score}))
        return future

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def edit_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``.jsonl`` of the prompts, each with a source image (I2V and editing kinds)."""
    root = tmp_path_factory.mktemp("prompts")
    rows = []
    for i, (prompt, rgb) in enumerate(zip(PROMPTS, [(200, 30, 30), (20, 40, 220)], strict=True)):
        Image.new("RGB", (24, 20), rgb).save(root / f"source{i}.png")
        rows.append({"prompt": prompt, "condition_image": f"source{i}.png"})
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _model_section(policy: str) -> dict[str, Any]:
    """``model``: the kind and the geometry and CFG weights the tiny policy is built with
    (``path`` is never read: the trainer gets the policy)."""
    kind = "wan_t2v" if policy == TWO_EXPERT_WAN else policy
    model: dict[str, Any] = {"kind": kind, "path": "tiny", "height": 16, "width": 16}
    if kind == "tiny_flow":
        return {"kind": kind, "height": 8, "width": 8, "options": {"latent_size": 4}}
    if kind == "wan_ti2v":
        model.update(height=32, width=32)
    if policy in VIDEO:
        model["num_frames"] = 5
    if kind in ("sd3", "stable_diffusion"):
        model["guidance_scale"] = 3.0
    elif kind.startswith("wan"):
        model["guidance_scale"] = 5.0
    elif kind in ("skyreels_i2v", "qwen_image", "qwen_image_edit", "qwen_image_edit_plus"):
        model["options"] = {"true_cfg_scale": 3.0}
    return model


def sections(case: Case, out: Path, prompts: Path, **run: Any) -> dict[str, Any]:
    """The config of ``case`` as nested sections."""
    nft = case.algorithm == "nft"
    sampling: dict[str, Any] = {
        "num_steps": NUM_STEPS,
        "eta": 0.7,
        "group_size": 2,
        "prompts_per_step": 2,
        "rollout_batch_size": 2,
        "shared_noise": not nft,
        "window": WINDOWS[case.window],
    }
    if case.sampler is not None:
        sampling["sampler"] = case.sampler
    train: dict[str, Any] = {
        "algorithm": case.algorithm,
        "learning_rate": 1e-2,
        "weight_decay": 0.0,
        "micro_batch_size": 2,
        "timestep_fraction": 0.67,
        "lora": {"rank": 2} if case.lora else {},
        "cfg_free": case.cfg_free,
        "drop_constant_groups": case.drop,
        "skip_last_timestep": case.window != "full",
    }
    if case.extra != "plain":
        train.update(kl_coef=0.1, kl_type=case.extra.removeprefix("kl_"))
    if nft:
        train["algorithm_options"] = {"decay_rate": 0.3, "decay_max": 0.6}
    image_prompts = case.policy in IMAGE_KINDS
    return {
        "model": _model_section(case.policy),
        "rewards": {"endpoints": [{"target": "x:1", "reward": "r"}]},
        "sampling": sampling,
        "train": train,
        "data": {"train_prompts": str(prompts) if image_prompts else PROMPTS},
        "run": {
            "progress": False,
            "sample_grid_every": 0,
            "output_dir": str(out),
            "max_steps": 1,
            **run,
        },
    }


def build_policy(case: Case) -> Any:
    """The tiny policy of ``case``, its CFG weights at 1 under ``train.cfg_free`` (as
    ``policy_factory.build_policy`` sets them)."""
    if case.policy == "stable_diffusion":
        from dancegrpo_testing.diffusion_models import tiny_stable_diffusion_pipeline
        from dancegrpo_trainer.policies.stable_diffusion import (
            StableDiffusionConfig,
            StableDiffusionPolicy,
        )

        config = StableDiffusionConfig(resolution=16, device="cpu", guidance_scale=3.0)
        return StableDiffusionPolicy.from_pipeline(
            tiny_stable_diffusion_pipeline(), config, copy=True
        )
    off = dict.fromkeys(CFG_WEIGHT_OPTIONS[case.kind], 1.0) if case.cfg_free else {}
    return tiny_flow_policy(case.policy, **off)


def _trainer(case: Case, out: Path, prompts: Path, **run: Any) -> Trainer:
    cfg = config_from_dict(sections(case, out, prompts, **run))
    return Trainer(cfg, policy=build_policy(case), scorer=_Scorer())


def _tensors(policy: Any) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of every module the policy holds (denoiser(s), text
    encoders, VAE, ...), each once (Wan2.2's experts are reachable two ways), by name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for owner, value in vars(policy).items():
        if not isinstance(value, torch.nn.Module):
            continue
        for name, t in [*value.named_parameters(), *value.named_buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                out[f"{owner}.{name}"] = t
    return out


def _state(policy: Any) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in _tensors(policy).items()}


def _trainable_names(trainer: Trainer) -> set[str]:
    module = trainer.policy.trainable_module()
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    return {name for name, t in _tensors(trainer.policy).items() if id(t) in trained}


def _spy_terms(trainer: Trainer) -> list[tuple[list[int], list[int]]]:
    """``(recorded steps, terms)`` of every micro-batch the update trains."""
    seen: list[tuple[list[int], list[int]]] = []
    terms = trainer.algorithm.terms

    def spy(rollout, generator):  # noqa: ANN001, ANN202
        out = terms(rollout, generator)
        seen.append((list(rollout.recorded_steps), list(out)))
        return out

    trainer.algorithm.terms = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_one_trainer_step(case: Case, tmp_path: Path, edit_prompts: Path) -> None:
    trainer = _trainer(case, tmp_path / "run", edit_prompts)
    # The policy is the one the config describes: its CFG weights are the config's.
    for field, weight in cfg_weights(trainer.cfg.model, cfg_free=case.cfg_free).items():
        assert getattr(trainer.policy.config, field.rsplit(".", 1)[-1]) == weight, field
    trainable = _trainable_names(trainer)
    if case.lora:
        assert trainable and all("lora_" in n for n in trainable)
    before = _state(trainer.policy)
    seen = _spy_terms(trainer)
    try:
        record = trainer.train_step()
    finally:
        trainer.close()
    after = _state(trainer.policy)

    assert math.isfinite(record["loss"]) and math.isfinite(record["policy_loss"])
    assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert record["skipped"] == 0
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and moved <= trainable, sorted(moved - trainable)[:5]
    if case.lora:  # LoRA's B starts at 0: a step that trains moves it
        assert any("lora_B" in n for n in moved)
    if case.extra != "plain":
        assert record["kl"] == 0.0  # the first update is at the reference
    if case.drop:
        assert record["groups_dropped_frac"] == 0.5

    if case.algorithm == "nft":
        assert "ratio_min" not in record and record["old_deviate"] == 0.0  # old = live
        return
    assert record["ratio_min"] == 1.0 and record["ratio_max"] == 1.0
    assert record["clip_fraction"] == 0.0 and record["approx_kl"] == 0.0
    if case.algorithm == "grpo_guard":
        assert record["mean_shift"] == 0.0
    if case.policy == "stable_diffusion":
        return
    cfg = trainer.cfg
    start, stop = window_bounds(
        cfg.sampling.window,
        NUM_STEPS,
        step=0,
        seed=cfg.run.seed,
        skip_last=cfg.train.skip_last_timestep,
    )
    assert seen
    for recorded, terms in seen:
        assert recorded == list(range(start, stop))
        assert terms and set(terms) <= set(recorded)


def _train_records(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


TIMINGS = ("sample_s", "reward_wait_s", "train_s")
RESUME_CASES = resume_cases()


@pytest.mark.slow
@pytest.mark.parametrize("case", RESUME_CASES, ids=[c.id for c in RESUME_CASES])
def test_save_resume_gives_the_bit_identical_next_step(
    case: Case, tmp_path: Path, edit_prompts: Path
) -> None:
    straight = _trainer(case, tmp_path / "straight", edit_prompts, max_steps=2, checkpoint_every=1)
    straight.train()
    straight.close()
    checkpoint = tmp_path / "straight/checkpoints/step_000001"
    resumed = _trainer(
        case, tmp_path / "resumed", edit_prompts, max_steps=2, resume=str(checkpoint)
    )
    assert resumed.step == 1
    resumed.train()
    resumed.close()

    a, b = _state(straight.policy), _state(resumed.policy)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for key, value in straight.algorithm.state_dict().items():
        assert torch.equal(value, resumed.algorithm.state_dict()[key]), key
    (two,) = [r for r in _train_records(tmp_path / "straight") if r["step"] == 2]
    (again,) = _train_records(tmp_path / "resumed")
    assert {k: v for k, v in two.items() if k not in TIMINGS} == {
        k: v for k, v in again.items() if k not in TIMINGS
    }


# ------------------------------------------------------------------ invalid combinations


def _invalid(policy: str, *, algorithm: str = "grpo", **changes: Any) -> dict[str, Any]:
    """Sections of a valid ``policy`` × ``algorithm`` case with ``section.key`` changes."""
    case = Case(policy, algorithm)
    data = sections(case, Path("unused"), Path("edits.jsonl"))
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value
    return data


CFG_KINDS = sorted(set(CFG_WEIGHT_OPTIONS) - {"stable_diffusion"})
#: ``(id, sections, field)``: the config that must fail, and the field its error names first.
INVALID = [
    *[
        (f"stable_diffusion-{s}", _invalid("stable_diffusion", sampling__sampler=s), "sampling.sampler")
        for s in SAMPLERS
    ],
    *[
        (f"stable_diffusion-{w}", _invalid("stable_diffusion", sampling__window=WINDOWS[w]), "sampling.window.kind")
        for w in ("fast", "mixgrpo")
    ],
    ("stable_diffusion-grpo_guard", _invalid("stable_diffusion", algorithm="grpo_guard"), "train.algorithm"),
    ("stable_diffusion-nft", _invalid("stable_diffusion", algorithm="nft"), "model.kind"),
    ("stable_diffusion-kl_velocity", _invalid("stable_diffusion", train__kl_type="velocity"), "train.kl_type"),
    ("stable_diffusion-eta_above_1", _invalid("stable_diffusion", sampling__eta=1.2), "sampling.eta"),
    ("stable_diffusion-eval_eta_above_1", _invalid("stable_diffusion", eval__eta=1.5), "eval.eta"),
    *[(f"{p}-ddim", _invalid(p, sampling__sampler="ddim"), "sampling.sampler") for p in POLICIES],
    ("cps-eta_above_1", _invalid("flux", sampling__sampler="cps", sampling__eta=1.2), "sampling.eta"),
    ("cps-eval_eta_above_1", _invalid("flux", sampling__sampler="cps", eval__eta=1.5), "eval.eta"),
    *[
        (f"cps-{w}-reaching_the_last_step", _invalid("flux", sampling__sampler="cps", sampling__window=WINDOWS[w], train__skip_last_timestep=False), "train.skip_last_timestep")
        for w in ("fast", "mixgrpo_flash")
    ],
    ("branch-without-shared-noise", _invalid("flux", sampling__shared_noise=False, sampling__window=WINDOWS["fast_branch"]), "sampling.window.branch"),
    ("flash-on-fast", _invalid("flux", sampling__window={**WINDOWS["fast"], "flash": True}), "sampling.window.flash"),
    *[
        (f"nft-{w}", _invalid("flux", algorithm="nft", sampling__window=WINDOWS[w]), "sampling.window.kind")
        for w in ("fast", "mixgrpo")
    ],
    ("nft-shared_noise", _invalid("flux", algorithm="nft", sampling__shared_noise=True), "sampling.shared_noise"),
    ("nft-fsdp", _invalid("flux", algorithm="nft", train__fsdp=True), "train.fsdp"),
    # NFT trains CFG-free: true CFG on every adapter that has it, unless train.cfg_free.
    *[
        (
            f"nft-true_cfg-{kind}",
            _invalid(kind, algorithm="nft", train__cfg_free=False),
            "model.guidance_scale" if kind in ("sd3", "wan_t2v", "wan_i2v", "wan_ti2v") else "model.options.true_cfg_scale",
        )
        for kind in CFG_KINDS
    ],
    ("nft-true_cfg-qwen_image-default", _invalid("qwen_image", algorithm="nft", train__cfg_free=False, model__options={}), "model.options.true_cfg_scale"),
    ("nft-true_cfg-wan22_second_expert", _invalid("wan_t2v", algorithm="nft", train__cfg_free=False, model__guidance_scale=1.0, model__options={"guidance_scale_2": 3.0}), "model.options.guidance_scale_2"),
    *[
        (f"{p}-cfg_free", _invalid(p, train__cfg_free=True), "train.cfg_free")
        for p in ("tiny_flow", "flux", "flux_kontext", "hunyuan_video")
    ],
    *[
        (f"{p}-embedding_cache", _invalid(p, data__embedding_cache="cache"), "data.embedding_cache")
        for p in ("qwen_image_edit", "qwen_image_edit_plus")
    ],
    *[
        (f"{p}-text_prompts", _invalid(p, data__train_prompts=PROMPTS), "data.train_prompts")
        for p in ("skyreels_i2v", "flux_kontext", "qwen_image_edit", "qwen_image_edit_plus", "wan_i2v")
    ],
    *[
        (f"{p}-eval_height", _invalid(p, eval__height=PIXEL_MULTIPLES[p] * 3 // 2), "eval.height")
        for p in sorted(PIXEL_MULTIPLES)
    ],
    ("lora-ema", _invalid("flux", train__lora={"rank": 2}, train__ema_decay=0.9), "train.ema_decay"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "field"), [i[1:] for i in INVALID], ids=[i[0] for i in INVALID])
def test_invalid_combination_fails_at_load_naming_the_field(data: dict[str, Any], field: str):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: "):
        config_from_dict(data)


def test_every_valid_case_loads_and_nft_takes_cfg_free_on_every_cfg_adapter():
    for case in CASES:
        config_from_dict(sections(case, Path("unused"), Path("edits.jsonl")))
    assert {c.kind for c in CASES if c.cfg_free} == set(CFG_KINDS)


def test_fsdp_needs_a_distributed_launch(tmp_path: Path, edit_prompts: Path):
    data = sections(Case("tiny_flow", "grpo"), tmp_path, edit_prompts)
    data["train"]["fsdp"] = True
    with pytest.raises(ConfigError, match=r"^train.fsdp: needs a distributed launch"):
        Trainer(config_from_dict(data), policy=build_policy(Case("tiny_flow", "grpo")))


def test_one_expert_of_wan22_trains_alone_and_a_window_off_its_steps_fails_at_start(
    tmp_path: Path, edit_prompts: Path
):
    """Wan2.2 A14B with ``train_experts: low_noise`` (steps 1 and 2 of 3; step 0 is the
    high-noise expert's): a window that can fall on step 0 alone would stop the run at
    that step, so the trainer refuses it at start-up; one kept on steps 1–2 trains the
    low-noise expert and nothing else."""
    case = Case(TWO_EXPERT_WAN, "grpo_guard", "flow_grpo", "fast", lora=True)
    policy = tiny_flow_policy(TWO_EXPERT_WAN, train_experts="low_noise")
    assert policy.step_groups(policy.schedule(NUM_STEPS)) == [[1, 2]]
    data = sections(case, tmp_path / "run", edit_prompts)
    data["model"]["options"] = {"train_experts": "low_noise"}
    with pytest.raises(ConfigError, match=r"^sampling.window: the window can fall on steps \[0\]"):
        Trainer(config_from_dict(data), policy=policy, scorer=_Scorer())
    data["sampling"]["window"] = {"kind": "fast", "size": 1, "span": [1, 2]}
    policy = tiny_flow_policy(TWO_EXPERT_WAN, train_experts="low_noise")
    trainer = Trainer(config_from_dict(data), policy=policy, scorer=_Scorer())
    before = _state(policy)
    record = trainer.train_step()
    trainer.close()
    after = _state(policy)
    assert record["ratio_min"] == record["ratio_max"] == 1.0 and record["grad_norm"] > 0
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.startswith("transformer_2.") and "lora_B" in n for n in moved)


def test_the_design_covers_what_the_docstring_says():
    ratio = [c for c in CASES if c.algorithm != "nft" and c.policy != "stable_diffusion"]
    for policy in POLICIES:
        own = [c for c in ratio if c.policy == policy]
        assert {(c.algorithm, c.sampler) for c in own} == {
            (a, s) for a in ("grpo", "grpo_guard") for s in SAMPLERS
        }
        assert {c.window for c in own} == set(WINDOWS)
        for algorithm in ("grpo", "grpo_guard", "nft"):
            mine = [c for c in CASES if c.policy == policy and c.algorithm == algorithm]
            assert {c.lora for c in mine} == {False, True}
    triples = {(c.algorithm, c.sampler, c.window) for c in ratio}
    assert len(triples) == 2 * len(SAMPLERS) * len(WINDOWS)
    for family, members in FAMILIES.items():
        for algorithm in ("grpo", "grpo_guard", "nft"):
            if family == "stable_diffusion" and algorithm != "grpo":
                continue
            assert any(c.policy in members and c.algorithm == algorithm for c in RESUME_CASES)
