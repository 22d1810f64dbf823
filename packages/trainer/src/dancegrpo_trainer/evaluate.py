"""``dancegrpo-eval``: base vs tuned checkpoint on a prompt set, scored by the reward services.

    dancegrpo-eval --config configs/flux_hps_clip.yaml \\
        --tuned runs/flux/checkpoints/step_000300 --prompts hpdv2/ \\
        --rewards eval_rewards.yaml --out runs/flux/eval

Both policies are built from the same trainer config (``policy_factory.build_policy``,
``model.init_checkpoint`` as the base weights unless ``--base`` names others, at the eval
resolution ``eval.height/width`` when set, without CFG under ``train.cfg_free``) and sample
with the config's ``sampling.sampler`` at ``eval.eta`` (``--eta``; 0, the default, is the
deterministic ODE) from the same seeded noise for every (prompt, sample) pair. Frames are scored through ``RewardClient`` by every reward in the list (HPS-v2.1,
CLIP score, VideoAlign VQ/MQ, GenEval, ... — whatever the services host). Writes
``results.json``, ``results.md`` (the paper's table: base, tuned, relative change %) and
``samples_base.png`` / ``samples_tuned.png`` grids (for video, animated ``.gif``).

Prompt sets (``load_prompt_set``):

- ``*.txt``: one prompt per line (blank lines and ``#`` comments skipped);
- ``*.jsonl``: GenEval's ``evaluation_metadata.jsonl`` (``prompt``, ``tag``, ``include``
  with ``class``/``count``/``color``/``position``, optional ``exclude``), or any JSONL with a
  ``prompt`` key; the GenEval spec is sent as sample metadata and results are also
  reported per tag; a ``condition_image`` path (the training data's I2V format, relative
  to the file) conditions image-to-video policies and is sent to the rewards too;
- ``*.json`` or a folder of them: the HPD v2 benchmark format, one JSON list of prompts per
  style file (``anime.json``, ``concept-art.json``, ``paintings.json``, ``photo.json``);
  the style is the tag.

Rewards (``load_reward_specs``): a YAML list of ``{name, target, reward, output}``
(``metadata: true`` sends the GenEval spec), or ``--reward NAME=TARGET/REWARD[:OUTPUT]``.
Either may add the training endpoints' ``token_env`` / ``tls_ca`` / ``tls_cert`` /
``tls_key`` (``--reward hps=rewards:50051/hps,token_env=REWARDS_TOKEN,tls_ca=ca.pem``),
checked the same way (``RewardEndpoint.validate``).

Group-wise rewards (``RewardInfo.scoring_scope`` = group, e.g. ``pairwise_preference``,
read with ``ListRewards``) judge the base and tuned samples of each prompt together: one
group of 2·K per prompt (``group_sizes``), so a tuned policy the judge prefers wins more
than half of its pairs and the base fewer. (Training's held-out eval skips them: there a
policy only meets itself and the win rate always averages ½.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dancegrpo_trainer.data import prompt_record
from dancegrpo_trainer.policies.base import Policy

# ---------------------------------------------------------------------------- prompt sets


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt.

    Attributes:
        prompt: the text.
        tag: a group to report separately (GenEval tag, HPD v2 style), or ``None``.
        metadata: sample metadata for the reward service (``{"geneval": {...}}``) or ``None``.
        condition_image: path of the conditioning image (image-to-video), or ``None``.
    """

    prompt: str
    tag: str | None = None
    metadata: dict[str, Any] | None = None
    condition_image: str | None = None


def _parse_jsonl(path: Path) -> list[EvalPrompt]:
    """GenEval rows (their spec as ``metadata``) or ``{"prompt", "condition_image"}`` rows,
    read like training prompt files (``data.prompt_record``)."""
    prompts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        record = prompt_record(row, path.parent, f"{path}:{lineno}")
        prompts.append(
            EvalPrompt(record.prompt, row.get("tag"), record.metadata, record.condition_image)
        )
    return prompts


def _parse_hpd_style(path: Path) -> list[EvalPrompt]:
    data = json.loads(path.read_text())
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise ValueError(f"{path}: an HPD v2 style file is a JSON list of prompt strings")
    return [EvalPrompt(p, path.stem) for p in data]


def load_prompt_set(path: str | Path, max_per_tag: int | None = None) -> list[EvalPrompt]:
    """Reads a ``.txt``, GenEval ``.jsonl``, HPD v2 ``.json`` file or a folder of ``.json``.

    ``max_per_tag`` keeps the first prompts of each tag (``None``: all).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise ValueError(f"{path}: no *.json (HPD v2 style files) in this folder")
        prompts = [p for f in files for p in _parse_hpd_style(f)]
    elif not path.is_file():
        raise FileNotFoundError(f"prompt set {path} does not exist")
    elif path.suffix == ".jsonl":
        prompts = _parse_jsonl(path)
    elif path.suffix == ".json":
        prompts = _parse_hpd_style(path)
    else:
        lines = [line.strip() for line in path.read_text().splitlines()]
        prompts = [EvalPrompt(line) for line in lines if line and not line.startswith("#")]
    if max_per_tag is not None:
        seen: dict[str | None, int] = {}
        kept = []
        for p in prompts:
            seen[p.tag] = seen.get(p.tag, 0) + 1
            if seen[p.tag] <= max_per_tag:
                kept.append(p)
        prompts = kept
    if not prompts:
        raise ValueError(f"{path} contains no prompts")
    return prompts


# ---------------------------------------------------------------------------- rewards


SECURITY_KEYS = ("token_env", "tls_ca", "tls_cert", "tls_key")


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One metric: ``output`` of ``reward`` at ``target``, reported as ``name``.

    ``token_env`` / ``tls_ca`` / ``tls_cert`` / ``tls_key`` connect like a training
    endpoint (``config.RewardEndpoint``): a bearer token from that env variable, TLS/mTLS.
    """

    name: str
    target: str
    reward: str
    output: str = "score"
    metadata: bool = False
    token_env: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def endpoint(self, where: str = "reward") -> Any:
        """The equivalent training ``RewardEndpoint``, type-checked and validated like one
        (raises ``ConfigError``, a ``ValueError``, naming ``where.<key>``)."""
        from dancegrpo_trainer.config import RewardEndpoint, from_dict

        fields = {"target": self.target, "reward": self.reward, "output": self.output}
        fields.update({k: getattr(self, k) for k in SECURITY_KEYS if getattr(self, k) is not None})
        endpoint = from_dict(RewardEndpoint, fields, where)
        endpoint.validate(where)
        return endpoint


_OPTION = re.compile(r",(?=(?:" + "|".join(SECURITY_KEYS) + r")=)")


def parse_reward_arg(text: str) -> RewardSpec:
    """``NAME=TARGET/REWARD[:OUTPUT][,token_env=VAR][,tls_ca=PEM][,tls_cert=PEM,tls_key=PEM]``
    (e.g. ``hps=localhost:50051/hps:score``)."""
    name, sep, rest = text.partition("=")
    head, *options = _OPTION.split(rest)
    target, sep2, reward_output = head.rpartition("/")
    if not (sep and sep2 and name and target and reward_output):
        raise ValueError(
            f"--reward {text!r}: expected NAME=TARGET/REWARD[:OUTPUT][,token_env=VAR]"
            "[,tls_ca=PEM][,tls_cert=PEM,tls_key=PEM]"
        )
    reward, _, output = reward_output.partition(":")
    security = dict(option.split("=", 1) for option in options)
    if len(security) != len(options):
        raise ValueError(f"--reward {text!r}: an option is given twice")
    spec = RewardSpec(name, target, reward, output or "score", **security)
    spec.endpoint(f"--reward {name}")
    return spec


def load_reward_specs(path: str | Path) -> list[RewardSpec]:
    """A YAML list of ``{name, target, reward, output, metadata}`` mappings, each optionally
    with ``token_env``, ``tls_ca``, ``tls_cert``, ``tls_key``."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty YAML list of reward specs")
    specs = []
    for i, row in enumerate(data):
        try:
            spec = RewardSpec(**row)
        except TypeError as e:
            keys = ", ".join(("name", "target", "reward", "output", "metadata", *SECURITY_KEYS))
            raise ValueError(f"{path}[{i}]: {e} (keys: {keys})") from e
        spec.endpoint(f"{path}[{i}]")
        specs.append(spec)
    return specs


# ---------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(
    policy: Policy,
    prompts: Sequence[EvalPrompt],
    *,
    samples_per_prompt: int,
    num_steps: int,
    seed: int,
    chunk_size: int = 16,
    eta: float = 0.0,
    sampler: str | None = None,
) -> np.ndarray:
    """Samples of every prompt, prompt-major: ``uint8 [P·K, H, W, 3]``, with ``sampler``
    (``None``: the policy's default) at ``eta`` (0: deterministic).

    The initial noise of row ``j`` depends only on ``seed`` and ``j`` (and with ``eta > 0``
    the step noise of each chunk only on ``seed``), so two policies of the same
    architecture start every sample from the same noise.
    """
    from dancegrpo_trainer.rollout import RolloutPlan, sample_rollout

    texts = [p.prompt for p in prompts for _ in range(samples_per_prompt)]
    images = condition_images(prompts, samples_per_prompt)
    noise = policy.initial_noise(len(texts), generator=torch.Generator().manual_seed(seed))
    policy.trainable_module().eval()
    frames = []
    for start in range(0, len(texts), chunk_size):
        rows = texts[start : start + chunk_size]
        rows_images = (
            None if images is None else torch.from_numpy(images[start : start + chunk_size])
        )
        cond = policy.encode_prompts(rows, rows_images)
        out = sample_rollout(
            policy,
            cond,
            noise[start : start + chunk_size],
            plan=RolloutPlan(policy.schedule(num_steps), sampler=sampler),
            eta=eta,
            generator=torch.Generator().manual_seed(seed + 1),
            chunk_size=chunk_size,
        )
        frames.append(out.frames.numpy())
    return np.concatenate(frames)


def condition_images(prompts: Sequence[EvalPrompt], samples_per_prompt: int) -> np.ndarray | None:
    """Prompt-major ``uint8 [P·K, H, W, 3]`` conditioning images (``None`` for text-only)."""
    from dancegrpo_trainer.data import PromptRecord, load_condition_images

    records = [PromptRecord(p.prompt, p.condition_image) for p in prompts]
    images = load_condition_images(records)
    return None if images is None else images.numpy().repeat(samples_per_prompt, axis=0)


def _columns(prompts: Sequence[EvalPrompt], samples_per_prompt: int) -> dict[str, Any]:
    """Prompt-major per-sample ``prompts``, ``metadata`` and ``condition_images`` (or
    ``None``), as ``RewardClient.score`` takes them."""
    return {
        "prompts": [p.prompt for p in prompts for _ in range(samples_per_prompt)],
        "metadata": [p.metadata for p in prompts for _ in range(samples_per_prompt)],
        "condition_images": condition_images(prompts, samples_per_prompt),
    }


def _score(
    client: Any, spec: RewardSpec, frames: np.ndarray, columns: Mapping[str, Any], **extra: Any
) -> np.ndarray:
    """One ``score`` call for ``spec``: float32 ``(N,)`` of its output."""
    kwargs: dict[str, Any] = {"prompts": columns["prompts"], **extra}
    kwargs["videos" if frames.ndim == 5 else "images"] = frames
    if spec.metadata:
        kwargs["metadata"] = columns["metadata"]
    if columns["condition_images"] is not None:
        kwargs["condition_images"] = columns["condition_images"]
    result = client.score(spec.reward, **kwargs)
    if spec.output not in result:
        raise KeyError(
            f"reward {spec.reward!r} at {spec.target} has no output {spec.output!r} "
            f"(it returned {sorted(result)})"
        )
    return np.asarray(result[spec.output], np.float32)


def score_frames(
    frames: np.ndarray,
    prompts: Sequence[EvalPrompt],
    samples_per_prompt: int,
    specs: Sequence[RewardSpec],
    client_for: Callable[[RewardSpec], Any],
) -> dict[str, np.ndarray]:
    """``{metric name: float32 (P·K,)}`` for prompt-major ``frames`` scored by per-sample
    rewards; ``client_for(spec)`` returns the ``RewardClient`` for a spec's target (and
    token/TLS settings)."""
    columns = _columns(prompts, samples_per_prompt)
    return {spec.name: _score(client_for(spec), spec, frames, columns) for spec in specs}


def group_wise_bounds(
    specs: Sequence[RewardSpec], client_for: Callable[[RewardSpec], Any]
) -> dict[str, tuple[int, int]]:
    """``{metric name: (min_group_size, max_group_size)}`` of the specs whose reward is
    group-wise, from each target's ``ListRewards`` (``max`` 0: no limit). Clients without
    ``list_rewards`` (test doubles) and rewards a target does not list count as per-sample
    (scoring the latter fails with ``NOT_FOUND``)."""
    from dancegrpo_proto.v1 import rewards_pb2 as pb

    listed: dict[int, dict[str, Any]] = {}
    found = {}
    for spec in specs:
        client = client_for(spec)
        if not hasattr(client, "list_rewards"):
            continue
        if id(client) not in listed:
            listed[id(client)] = {info.name: info for info in client.list_rewards()}
        info = listed[id(client)].get(spec.reward)
        if info is not None and info.scoring_scope == pb.SCORING_SCOPE_GROUP:
            found[spec.name] = (int(info.min_group_size), int(info.max_group_size))
    return found


def check_joint_group_size(
    bounds: Mapping[str, tuple[int, int]], specs: Sequence[RewardSpec], samples_per_prompt: int
) -> None:
    """Raises ``ValueError`` when a group-wise reward cannot judge the 2·K samples (base
    and tuned) of one prompt in one group."""
    size = 2 * samples_per_prompt
    for spec in specs:
        if spec.name not in bounds:
            continue
        low, high = bounds[spec.name]
        if size < low or (high and size > high):
            raise ValueError(
                f"--samples-per-prompt {samples_per_prompt}: group-wise reward "
                f"{spec.reward!r} at {spec.target} ({spec.name}) judges the base and tuned "
                f"samples of a prompt in one group of {size}, but it accepts groups of "
                f"{low} to {high or 'any number of'} samples"
            )


def score_jointly(
    frames: Mapping[str, np.ndarray],
    prompts: Sequence[EvalPrompt],
    samples_per_prompt: int,
    spec: RewardSpec,
    client: Any,
) -> dict[str, np.ndarray]:
    """``{"base": (P·K,), "tuned": (P·K,)}`` of a group-wise reward that judges the base
    and tuned samples of each prompt in one group of 2·K (base first, then tuned)."""
    base, tuned = frames["base"], frames["tuned"]
    n, k = len(base), samples_per_prompt
    order = np.concatenate(
        [np.r_[p * k : (p + 1) * k, n + p * k : n + (p + 1) * k] for p in range(n // k)]
    )
    columns = _columns(prompts, k)
    joint = {
        "prompts": [columns["prompts"][i % n] for i in order],
        "metadata": [columns["metadata"][i % n] for i in order],
        "condition_images": (
            None if columns["condition_images"] is None else columns["condition_images"][order % n]
        ),
    }
    values = _score(
        client,
        spec,
        np.concatenate([base, tuned])[order],
        joint,
        group_sizes=[2 * k] * (n // k),
    )
    unordered = np.empty_like(values)
    unordered[order] = values
    return {"base": unordered[:n], "tuned": unordered[n:]}


# ---------------------------------------------------------------------------- table


def relative_change(base: float, tuned: float) -> float:
    """``(tuned − base) / |base|`` in percent; NaN when ``base`` is 0."""
    return (tuned - base) / abs(base) * 100.0 if base != 0 else math.nan


def summarise(
    scores: Mapping[str, Mapping[str, np.ndarray]],
    prompts: Sequence[EvalPrompt],
    samples_per_prompt: int,
) -> list[dict[str, Any]]:
    """Rows ``{metric, tag, base, tuned, relative_change_pct, n}``: each metric overall,
    then per tag when the prompt set has tags.

    With tags, "overall" is the mean of the per-tag means, the benchmarks' own convention
    (GenEval's overall score averages its six task scores; HPD v2 averages its four
    styles), so a tag with more prompts does not weigh more. Without tags it is the mean
    over all samples.
    """
    tags = [p.tag for p in prompts for _ in range(samples_per_prompt)]
    tag_masks = [
        (tag, np.asarray([t == tag for t in tags]))
        for tag in dict.fromkeys(tags)
        if tag is not None
    ]
    rows = []
    for metric in scores["base"]:
        per_tag = []
        for tag, mask in tag_masks:
            base = float(scores["base"][metric][mask].mean())
            tuned = float(scores["tuned"][metric][mask].mean())
            per_tag.append(_row(metric, tag, base, tuned, int(mask.sum())))
        if per_tag:
            base = float(np.mean([r["base"] for r in per_tag]))
            tuned = float(np.mean([r["tuned"] for r in per_tag]))
        else:
            base = float(scores["base"][metric].mean())
            tuned = float(scores["tuned"][metric].mean())
        rows.append(_row(metric, None, base, tuned, len(tags)))
        rows.extend(per_tag)
    return rows


def _row(metric: str, tag: str | None, base: float, tuned: float, n: int) -> dict[str, Any]:
    return {
        "metric": metric,
        "tag": tag,
        "base": base,
        "tuned": tuned,
        "relative_change_pct": relative_change(base, tuned),
        "n": n,
    }


def markdown_table(rows: Sequence[Mapping[str, Any]], group_wise: Sequence[str] = ()) -> str:
    """The paper-style table: metric, base, tuned, relative change; a note under it names
    the ``group_wise`` metrics (base and tuned judged against each other)."""
    lines = ["| metric | base | tuned | change |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        name = r["metric"] if r["tag"] is None else f"{r['metric']} [{r['tag']}]"
        change = r["relative_change_pct"]
        shown = "n/a" if math.isnan(change) else f"{change:+.1f}%"
        lines.append(f"| {name} | {r['base']:.4f} | {r['tuned']:.4f} | {shown} |")
    if group_wise:
        lines += [
            "",
            f"Group-wise ({', '.join(group_wise)}): the base and tuned samples of each prompt "
            "were judged in one group, so base and tuned are scored against each other.",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- driver


def evaluate_policies(
    policies: Mapping[str, Policy],
    prompts: Sequence[EvalPrompt],
    specs: Sequence[RewardSpec],
    out_dir: str | Path,
    *,
    samples_per_prompt: int = 1,
    num_steps: int = 16,
    seed: int = 0,
    chunk_size: int = 16,
    client_for: Callable[[RewardSpec], Any] | None = None,
    eta: float = 0.0,
    sampler: str | None = None,
) -> dict[str, Any]:
    """Samples and scores ``policies`` (keys ``base`` and ``tuned``); writes the outputs.

    Returns ``{"rows": [...], "scores": {policy: {metric: list}}, "settings": {...}}``
    (what ``results.json`` holds).
    """
    from dancegrpo_trainer.run_logging import save_samples

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    owned: dict[tuple[str, ...], Any] = {}

    def default_client(spec: RewardSpec) -> Any:
        key = (spec.target, *(str(getattr(spec, k)) for k in SECURITY_KEYS))
        if key not in owned:
            from dancegrpo_trainer.scoring import make_reward_client

            owned[key] = make_reward_client(spec.target, spec.endpoint(f"reward {spec.name}"))
        return owned[key]

    get_client = client_for or default_client
    scores: dict[str, dict[str, np.ndarray]] = {}
    frames_of: dict[str, np.ndarray] = {}
    try:
        bounds = group_wise_bounds(specs, get_client)
        check_joint_group_size(bounds, specs, samples_per_prompt)
        per_sample = [s for s in specs if s.name not in bounds]
        for label in ("base", "tuned"):
            frames = generate(
                policies[label],
                prompts,
                samples_per_prompt=samples_per_prompt,
                num_steps=num_steps,
                seed=seed,
                chunk_size=chunk_size,
                eta=eta,
                sampler=sampler,
            )
            scores[label] = score_frames(
                frames, prompts, samples_per_prompt, per_sample, get_client
            )
            if bounds:
                frames_of[label] = frames
            shown = frames[: 8 * samples_per_prompt]
            save_samples(
                shown,
                out / f"samples_{label}.png",
                ncols=max(samples_per_prompt, 4),
                scale=max(1, 128 // frames.shape[-2]),
            )
        for spec in specs:
            if spec.name in bounds:
                joint = score_jointly(
                    frames_of, prompts, samples_per_prompt, spec, get_client(spec)
                )
                for label, values in joint.items():
                    scores[label][spec.name] = values
    finally:
        for client in owned.values():
            client.close()
    scores = {label: {s.name: scores[label][s.name] for s in specs} for label in scores}
    group_wise = [s.name for s in specs if s.name in bounds]
    rows = summarise(scores, prompts, samples_per_prompt)
    result = {
        "rows": rows,
        "scores": {k: {m: v.tolist() for m, v in s.items()} for k, s in scores.items()},
        "settings": {
            "num_prompts": len(prompts),
            "samples_per_prompt": samples_per_prompt,
            "num_steps": num_steps,
            "seed": seed,
            "eta": eta,
            "sampler": sampler,
            "rewards": [dataclasses.asdict(s) for s in specs],
            "group_wise": group_wise,
        },
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    (out / "results.md").write_text(markdown_table(rows, group_wise))
    return result


def load_weights(policy: Policy, checkpoint: str | Path, lora: Any = None) -> None:
    """Loads trainable-module weights: a ``.safetensors`` file or a trainer checkpoint
    folder (its ``model.safetensors``). LoRA checkpoints (``lora_`` keys) inject adapters
    first with ``lora`` (the config's ``train.lora``); extra tensors (``ema.*``) are ignored."""
    from safetensors.torch import load_file

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    tensors = load_file(str(path))
    module = policy.trainable_module()
    if any("lora_" in k for k in tensors):
        from dancegrpo_trainer.weights import apply_lora

        if lora is None or not lora.enabled:
            raise ValueError(f"{path} holds LoRA weights; set train.lora in the config")
        apply_lora(module, lora, policy.lora_target_modules)
        own = module.state_dict()
        module.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
        return
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}")
    module.load_state_dict({k: tensors[k] for k in own})


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``dancegrpo-eval``."""
    from dancegrpo_trainer.config import load_config
    from dancegrpo_trainer.policy_factory import build_policy

    parser = argparse.ArgumentParser(
        prog="dancegrpo-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the trainer config of the run")
    parser.add_argument("--tuned", required=True, help="tuned weights (.safetensors or folder)")
    parser.add_argument("--base", help="base weights (default: model.init_checkpoint or none)")
    parser.add_argument("--prompts", required=True, help=".txt, GenEval .jsonl, HPD v2 .json/dir")
    parser.add_argument(
        "--rewards", help="YAML list of {name, target, reward, output[, token_env, tls_*]}"
    )
    parser.add_argument(
        "--reward",
        action="append",
        default=[],
        help="NAME=TARGET/REWARD[:OUTPUT][,token_env=VAR][,tls_ca=PEM][,tls_cert=PEM,"
        "tls_key=PEM], repeatable",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--num-steps", type=int, help="default: sampling.num_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eta", type=float, help="sampling noise (default: eval.eta)")
    parser.add_argument("--max-per-tag", type=int)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, list(args.overrides))
    specs = load_reward_specs(args.rewards) if args.rewards else []
    specs += [parse_reward_arg(r) for r in args.reward]
    if not specs:
        parser.error("name at least one reward (--rewards FILE or --reward ...)")
    prompts = load_prompt_set(args.prompts, args.max_per_tag)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    height, width = cfg.eval_size()
    model = dataclasses.replace(cfg.model, height=height, width=width)
    policies = {}
    for label, weights in (("base", args.base), ("tuned", args.tuned)):
        torch.manual_seed(cfg.run.seed)
        policy = build_policy(model, device, cfg_free=cfg.train.cfg_free)
        if cfg.model.init_checkpoint:
            load_weights(policy, cfg.model.init_checkpoint)
        if weights:
            load_weights(policy, weights, cfg.train.lora)
        policies[label] = policy
    result = evaluate_policies(
        policies,
        prompts,
        specs,
        args.out,
        samples_per_prompt=args.samples_per_prompt,
        num_steps=args.num_steps or cfg.sampling.num_steps,
        seed=args.seed,
        chunk_size=args.chunk_size,
        eta=cfg.eval.eta if args.eta is None else args.eta,
        sampler=cfg.sampling.sampler,
    )
    print(markdown_table(result["rows"], result["settings"]["group_wise"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
