"""``dancegrpo-eval``: prompt-set parsers, the table's arithmetic, and an end-to-end run of a
tiny base policy vs a perturbed copy against a real weight-free reward server."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dancegrpo_trainer import evaluate as ev
from dancegrpo_trainer.policies.tiny_flow import TinyFlowPolicy


def test_text_prompt_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red square\n\n# comment\n  a blue circle  \n")
    assert ev.load_prompt_set(path) == [
        ev.EvalPrompt("a red square"),
        ev.EvalPrompt("a blue circle"),
    ]


def test_geneval_jsonl_becomes_tagged_prompts_with_metadata(tmp_path):
    rows = [
        {
            "tag": "single_object",
            "include": [{"class": "bench", "count": 1}],
            "prompt": "a photo of a bench",
        },
        {
            "tag": "position",
            "include": [
                {"class": "dog", "count": 1},
                {"class": "cat", "count": 1, "position": ["left of", 0]},
            ],
            "prompt": "a photo of a cat left of a dog",
        },
        {
            "tag": "colors",
            "include": [{"class": "car", "count": 1, "color": "red"}],
            "exclude": [{"class": "car", "count": 2}],
            "prompt": "a photo of a red car",
        },
    ]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts = ev.load_prompt_set(path)
    assert [p.tag for p in prompts] == ["single_object", "position", "colors"]
    spec = prompts[1].metadata["geneval"]
    assert spec["tag"] == "position"
    assert spec["include"][1] == {
        "class_name": "cat",
        "count": 1,
        "position_relation": "left of",
        "position_reference": 0,
    }
    assert prompts[2].metadata["geneval"]["include"][0]["color"] == "red"
    assert prompts[2].metadata["geneval"]["exclude"] == [{"class_name": "car", "count": 2}]


def test_geneval_spec_converts_to_a_valid_wire_message(tmp_path):
    from dancegrpo_proto import codec

    path = tmp_path / "g.jsonl"
    rows = [
        {"tag": "counting", "include": [{"class": "cup", "count": 3}], "prompt": "three cups"},
        {
            "tag": "position",
            "include": [
                {"class": "dog", "count": 1},
                {"class": "cat", "count": 1, "position": ["left of", 0]},
            ],
            "prompt": "a photo of a cat left of a dog",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counting, position = ev.load_prompt_set(path)
    message = codec.metadata_to_proto(counting.metadata)
    assert message.geneval.include[0].class_name == "cup"
    assert message.geneval.include[0].count == 3
    message = codec.metadata_to_proto(position.metadata)
    cat = message.geneval.include[1]
    assert (cat.class_name, cat.position_relation, cat.position_reference) == ("cat", "left of", 0)
    bad = dict(rows[1], include=[{"class": "cat", "count": 1, "position": ["left of", 3]}])
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="malformed GenEval spec"):
        ev.load_prompt_set(path)


def test_hpd_v2_style_files_tag_prompts_by_style(tmp_path):
    (tmp_path / "anime.json").write_text(json.dumps(["a girl", "a robot", "a cat"]))
    (tmp_path / "photo.json").write_text(json.dumps(["a street"]))
    prompts = ev.load_prompt_set(tmp_path, max_per_tag=2)
    assert [(p.prompt, p.tag) for p in prompts] == [
        ("a girl", "anime"),
        ("a robot", "anime"),
        ("a street", "photo"),
    ]
    assert ev.load_prompt_set(tmp_path / "photo.json") == [ev.EvalPrompt("a street", "photo")]


def test_malformed_inputs_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="JSON list"):
        ev.load_prompt_set(bad)
    with pytest.raises(ValueError, match="NAME=TARGET"):
        ev.parse_reward_arg("hps")


def test_reward_specs_from_cli_and_yaml(tmp_path):
    assert ev.parse_reward_arg("hps=localhost:50051/hps:score") == ev.RewardSpec(
        "hps", "localhost:50051", "hps", "score"
    )
    assert ev.parse_reward_arg("vq=dns:///va:50051/videoalign:vq").target == "dns:///va:50051"
    path = tmp_path / "r.yaml"
    path.write_text("- {name: clip, target: 'h:1', reward: clip, output: clip_score}\n")
    assert ev.load_reward_specs(path) == [ev.RewardSpec("clip", "h:1", "clip", "clip_score")]


def test_relative_change_is_signed_percent_of_the_base_magnitude():
    assert ev.relative_change(0.25, 0.30) == pytest.approx(20.0)
    assert ev.relative_change(-2.0, -1.0) == pytest.approx(50.0)
    assert math.isnan(ev.relative_change(0.0, 1.0))


def _tiny_pair(tmp_path):
    torch.manual_seed(0)
    base = TinyFlowPolicy(16, 16, latent_size=4, channels=8, embed_dim=16, num_blocks=1)
    tuned = TinyFlowPolicy(16, 16, latent_size=4, channels=8, embed_dim=16, num_blocks=1)
    state = base.net.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "base.safetensors"))
    perturbed = {k: (v + 0.3 * torch.randn_like(v)).contiguous() for k, v in state.items()}
    save_file(perturbed, str(tmp_path / "tuned.safetensors"))
    ev.load_weights(tuned, tmp_path / "tuned.safetensors")
    return base, tuned


def test_table_matches_direct_client_scoring_against_a_real_server(tmp_path):
    from dancegrpo_proto import RewardClient
    from dancegrpo_testing.servers import running_reward_server

    base, tuned = _tiny_pair(tmp_path)
    prompts = [
        ev.EvalPrompt("a red square", "warm"),
        ev.EvalPrompt("a blue circle", "cool"),
        ev.EvalPrompt("an orange sun", "warm"),
    ]
    config = {
        "rewards": {"color_match": {"kind": "color_match"}, "brightness": {"kind": "brightness"}}
    }
    with running_reward_server(config, metrics=False) as server:
        specs = [
            ev.RewardSpec("color", server.target, "color_match"),
            ev.RewardSpec("bright", server.target, "brightness"),
        ]
        result = ev.evaluate_policies(
            {"base": base, "tuned": tuned},
            prompts,
            specs,
            tmp_path / "out",
            samples_per_prompt=2,
            num_steps=4,
            seed=3,
        )
        with RewardClient(server.target) as client:
            direct = {}
            for label, policy in (("base", base), ("tuned", tuned)):
                frames = ev.generate(policy, prompts, samples_per_prompt=2, num_steps=4, seed=3)
                texts = [p.prompt for p in prompts for _ in range(2)]
                direct[label] = {
                    "color": client.score("color_match", images=frames, prompts=texts)["score"],
                    "bright": client.score("brightness", images=frames, prompts=texts)["score"],
                }
    rows = {(r["metric"], r["tag"]): r for r in result["rows"]}
    warm = np.asarray([True, True, False, False, True, True])
    for metric in ("color", "bright"):
        b, t = direct["base"][metric], direct["tuned"][metric]
        overall = rows[(metric, None)]
        # overall = mean of the per-tag means (GenEval / HPD v2 convention), not of samples
        b_overall = (b[warm].mean() + b[~warm].mean()) / 2
        t_overall = (t[warm].mean() + t[~warm].mean()) / 2
        assert overall["base"] == pytest.approx(float(b_overall), abs=1e-6)
        assert overall["tuned"] == pytest.approx(float(t_overall), abs=1e-6)
        assert overall["relative_change_pct"] == pytest.approx(
            (t_overall - b_overall) / abs(b_overall) * 100, rel=1e-5
        )
        assert overall["n"] == 6
        assert rows[(metric, "warm")]["tuned"] == pytest.approx(float(t[warm].mean()), abs=1e-6)
        assert rows[(metric, "cool")]["n"] == 2
    assert rows[("bright", None)]["base"] != rows[("bright", None)]["tuned"]  # really perturbed
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(
        json.dumps(result["rows"])
    )
    assert "| color | " in (out / "results.md").read_text()
    assert (out / "samples_base.png").is_file() and (out / "samples_tuned.png").is_file()


def test_group_wise_reward_judges_base_and_tuned_of_a_prompt_in_one_group(tmp_path):
    from dancegrpo_proto import RewardClient
    from dancegrpo_testing.servers import running_reward_server

    base, tuned = _tiny_pair(tmp_path)
    prompts = [ev.EvalPrompt("a red square", "warm"), ev.EvalPrompt("a blue circle", "cool")]
    pref = {"judge": {"type": "score", "reward": {"kind": "brightness"}}}
    config = {
        "rewards": {
            "pref": {"kind": "pairwise_preference", "max_batch_size": 8, "options": pref},
            "bright": {"kind": "brightness"},
        }
    }
    k = 2
    with running_reward_server(config, metrics=False) as server:
        specs = [
            ev.RewardSpec("win rate", server.target, "pref", output="win_rate"),
            ev.RewardSpec("bright", server.target, "bright"),
        ]
        result = ev.evaluate_policies(
            {"base": base, "tuned": tuned},
            prompts,
            specs,
            tmp_path / "out",
            samples_per_prompt=k,
            num_steps=4,
            seed=3,
        )
        # Groups larger than the reward's max_group_size (its max_batch_size) are refused
        # before anything is sampled, naming the option to change.
        with pytest.raises(ValueError, match=r"--samples-per-prompt 5: .*one group of 10"):
            ev.evaluate_policies(
                {"base": base, "tuned": tuned}, prompts, specs[:1], tmp_path / "x",
                samples_per_prompt=5, num_steps=4,
            )  # fmt: skip
        with RewardClient(server.target) as client:
            frames = {
                label: ev.generate(policy, prompts, samples_per_prompt=k, num_steps=4, seed=3)
                for label, policy in (("base", base), ("tuned", tuned))
            }
            bright = {
                label: client.score("bright", images=f)["score"] for label, f in frames.items()
            }
    scores = result["scores"]
    np.testing.assert_allclose(scores["base"]["bright"], bright["base"], rtol=1e-6)
    # Each prompt's group is its K base samples then its K tuned samples; a sample's win
    # rate is its share of wins (ties ½) against the other 2K - 1 by brightness.
    for p in range(len(prompts)):
        rows = slice(p * k, (p + 1) * k)
        group = np.concatenate([bright["base"][rows], bright["tuned"][rows]])
        want = [(np.sum(b > group) + 0.5 * (np.sum(b == group) - 1)) / (2 * k - 1) for b in group]
        got = np.concatenate([scores["base"]["win rate"][rows], scores["tuned"]["win rate"][rows]])
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert got.mean() == pytest.approx(0.5)  # base and tuned split the pairs
    assert result["settings"]["group_wise"] == ["win rate"]
    assert list(scores["base"]) == ["win rate", "bright"]  # in the specs' order
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| win rate | " in table and "Group-wise (win rate): the base and tuned" in table


def test_rewards_carry_token_and_tls_settings_validated_like_training(tmp_path, monkeypatch):
    from dancegrpo_trainer.config import ConfigError

    monkeypatch.setenv("EVAL_TOKEN", "t")
    (tmp_path / "ca.pem").write_text("x")
    spec = ev.parse_reward_arg(
        f"h=dns:///a:1,b:2/hps:s,token_env=EVAL_TOKEN,tls_ca={tmp_path}/ca.pem"
    )
    assert (spec.target, spec.reward, spec.output) == ("dns:///a:1,b:2", "hps", "s")
    assert (spec.token_env, spec.tls_ca) == ("EVAL_TOKEN", f"{tmp_path}/ca.pem")
    monkeypatch.delenv("EVAL_TOKEN")
    with pytest.raises(ConfigError, match=r"--reward h\.token_env: environment variable EVAL_T"):
        ev.parse_reward_arg("h=a:1/hps,token_env=EVAL_TOKEN")
    with pytest.raises(ConfigError, match=r"--reward h\.tls_cert: tls_cert and tls_key go"):
        ev.parse_reward_arg(f"h=a:1/hps,tls_cert={tmp_path}/ca.pem")
    path = tmp_path / "r.yaml"
    for row, message in [
        ("{name: c, target: 'h:1', reward: c, tls_ca: /nope.pem}", r"r.yaml\[0\]\.tls_ca: file"),
        ("{name: c, target: 'h:1', reward: c, token_env: 7}", r"r.yaml\[0\]\.token_env: expected"),
        ("{name: c, target: 'h:1', reward: c, token: x}", "token_env, tls_ca"),
    ]:
        path.write_text(f"- {row}\n")
        with pytest.raises(ValueError, match=message):
            ev.load_reward_specs(path)


def test_evaluation_sends_the_bearer_token_to_a_protected_server(tmp_path, monkeypatch):
    from dancegrpo_proto import RewardClient, RewardServiceError
    from dancegrpo_testing.servers import running_reward_server

    base, tuned = _tiny_pair(tmp_path)
    prompts = [ev.EvalPrompt("a red square"), ev.EvalPrompt("a blue circle")]
    config = {
        "server": {"auth": {"token_env": "TEST_REWARD_TOKEN"}},
        "rewards": {"color_match": {"kind": "color_match"}},
    }
    monkeypatch.setenv("EVAL_REWARD_TOKEN", "s3cret")
    run = dict(num_steps=3, seed=1)
    with running_reward_server(config, env={"TEST_REWARD_TOKEN": "s3cret"}, metrics=False) as srv:
        path = tmp_path / "rewards.yaml"
        path.write_text(
            f"- {{name: yaml, target: '{srv.target}', reward: color_match, "
            "token_env: EVAL_REWARD_TOKEN}\n"
        )
        specs = ev.load_reward_specs(path)
        specs.append(
            ev.parse_reward_arg(f"flag={srv.target}/color_match,token_env=EVAL_REWARD_TOKEN")
        )
        policies = {"base": base, "tuned": tuned}
        result = ev.evaluate_policies(policies, prompts, specs, tmp_path / "out", **run)
        with RewardClient(srv.target, token="s3cret") as client:
            frames = ev.generate(tuned, prompts, samples_per_prompt=1, **run)
            texts = [p.prompt for p in prompts]
            direct = client.score("color_match", images=frames, prompts=texts)["score"]
        np.testing.assert_allclose(result["scores"]["tuned"]["yaml"], direct, rtol=1e-6)
        np.testing.assert_allclose(result["scores"]["tuned"]["flag"], direct, rtol=1e-6)
        no_token = [ev.RewardSpec("c", srv.target, "color_match")]
        with pytest.raises(RewardServiceError, match="UNAUTHENTICATED"):
            ev.evaluate_policies(policies, prompts, no_token, tmp_path / "out2", **run)


def test_sampling_is_deterministic():
    torch.manual_seed(0)
    policy = TinyFlowPolicy(16, 16, latent_size=4, channels=8, embed_dim=16, num_blocks=1)
    prompts = [ev.EvalPrompt("a red square")]
    a = ev.generate(policy, prompts, samples_per_prompt=3, num_steps=3, seed=5)
    b = ev.generate(policy, prompts, samples_per_prompt=3, num_steps=3, seed=5)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8


def test_evaluation_connects_like_training_comma_separated_replicas(tmp_path, monkeypatch):
    import dancegrpo_proto

    made = []

    class RecordingClient:
        def __init__(self, targets, **kwargs):
            made.append(targets)

        def score(self, reward, *, prompts, images, **kwargs):
            return {"score": np.zeros(len(images), np.float32)}

        def close(self):
            pass

    monkeypatch.setattr(dancegrpo_proto, "RewardClient", RecordingClient)
    torch.manual_seed(0)
    policy = TinyFlowPolicy(16, 16, latent_size=4, channels=8, embed_dim=16, num_blocks=1)
    spec = ev.RewardSpec("s", "h1:50051, h2:50051", "brightness")
    ev.evaluate_policies(
        {"base": policy, "tuned": policy}, [ev.EvalPrompt("a")], [spec], tmp_path, num_steps=2
    )
    assert made == [["h1:50051", "h2:50051"]]  # one client, one channel per replica


# ---------------------------------------------------------------------------- the CLI, end to end


def _write_yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


#: GenEval prompts in GenEval's own ``evaluation_metadata.jsonl`` format, and the wire form
#: (``SampleMetadata.geneval``) each must arrive as, written out by hand.
GENEVAL_ROWS = [
    (
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"},
        {"tag": "single_object", "include": [{"class_name": "cat", "count": 1}], "exclude": []},
    ),
    (
        {
            "tag": "single_object",
            "include": [{"class": "giraffe", "count": 1}],
            "prompt": "a giraffe",
        },
        {"tag": "single_object", "include": [{"class_name": "giraffe", "count": 1}], "exclude": []},
    ),
    (  # "exactly two": include 2 plus exclude 3, as GenEval's create_prompts.py writes it
        {
            "tag": "counting",
            "include": [{"class": "cat", "count": 2}],
            "exclude": [{"class": "cat", "count": 3}],
            "prompt": "a photo of two cats",
        },
        {
            "tag": "counting",
            "include": [{"class_name": "cat", "count": 2}],
            "exclude": [{"class_name": "cat", "count": 3}],
        },
    ),
    (
        {
            "tag": "counting",
            "include": [{"class": "dining table", "count": 2}],
            "exclude": [{"class": "dining table", "count": 3}],
            "prompt": "a photo of two dining tables",
        },
        {
            "tag": "counting",
            "include": [{"class_name": "dining table", "count": 2}],
            "exclude": [{"class_name": "dining table", "count": 3}],
        },
    ),
    (
        {
            "tag": "colors",
            "include": [{"class": "cat", "count": 1, "color": "yellow"}],
            "prompt": "a photo of a yellow cat",
        },
        {
            "tag": "colors",
            "include": [{"class_name": "cat", "count": 1, "color": "yellow"}],
            "exclude": [],
        },
    ),
    (
        {
            "tag": "colors",
            "include": [{"class": "cat", "count": 1, "color": "red"}],
            "prompt": "a photo of a red cat",
        },
        {
            "tag": "colors",
            "include": [{"class_name": "cat", "count": 1, "color": "red"}],
            "exclude": [],
        },
    ),
    (
        {
            "tag": "position",
            "include": [
                {"class": "cat", "count": 1},
                {"class": "person", "count": 1, "position": ["left of", 0]},
            ],
            "prompt": "a photo of a person left of a cat",
        },
        {
            "tag": "position",
            "include": [
                {"class_name": "cat", "count": 1},
                {
                    "class_name": "person",
                    "count": 1,
                    "position_relation": "left of",
                    "position_reference": 0,
                },
            ],
            "exclude": [],
        },
    ),
]


def test_geneval_table_overall_and_per_tag_against_a_real_server(tmp_path):
    """``dancegrpo-eval`` (``main``) end to end on a GenEval ``evaluation_metadata.jsonl``:
    tiny_flow base/tuned checkpoints, one real server hosting the tiny ``geneval`` reward.

    What it proves: the metadata reaches the service (``geneval`` rejects samples without
    it, and the scores equal direct ``RewardClient`` scoring with hand-written wire specs),
    every per-sample score in ``results.json`` is the service's 0/1 answer for exactly the
    frames the same checkpoints generate, and the table is GenEval's: per-tag fractions
    correct, overall = mean of the per-tag means. The random tiny detector scores every
    detection ~0.008, so thresholds of 0 let its top-k detections through (always full-frame
    boxes, so ``position`` fails; one colour per object, so the yellow/red pair cannot both
    pass): the scores hold both 0s and 1s, and the arithmetic is checked on real values.
    """
    from dancegrpo_proto import RewardClient
    from dancegrpo_testing import geneval_models
    from dancegrpo_testing.servers import running_reward_server

    base, tuned = _tiny_pair(tmp_path)  # writes base.safetensors / tuned.safetensors
    prompts_path = tmp_path / "evaluation_metadata.jsonl"
    prompts_path.write_text("".join(json.dumps(row) + "\n" for row, _ in GENEVAL_ROWS))
    files = geneval_models.write_tiny_geneval_files(tmp_path / "geneval")
    options = {
        "detector_path": str(files.detector),
        "clip_checkpoint": str(files.clip_checkpoint),
        "clip_arch": str(files.clip_config),
        "detector_shortest_edge": 64,
        "detector_longest_edge": 96,
        "threshold": 0.0,
        "counting_threshold": 0.0,
    }
    server_config = {"rewards": {"geneval": {"kind": "geneval", "options": options}}}
    k, steps, seed = 2, 3, 0
    with running_reward_server(server_config, metrics=False, startup_timeout_s=120) as server:
        config = _write_yaml(
            tmp_path / "train.yaml",
            {
                "model": {
                    "kind": "tiny_flow",
                    "options": {"latent_size": 4, "channels": 8, "embed_dim": 16, "num_blocks": 1},
                },
                "rewards": {
                    "endpoints": [
                        {"target": server.target, "reward": "geneval", "output": "correct"}
                    ]
                },
                "data": {"train_prompts": ["unused"]},
            },
        )
        rewards = _write_yaml(
            tmp_path / "rewards.yaml",
            [
                {
                    "name": "GenEval",
                    "target": server.target,
                    "reward": "geneval",
                    "output": "correct",
                    "metadata": True,
                }
            ],
        )
        out = tmp_path / "eval"
        argv = ["--config", str(config), "--prompts", str(prompts_path)]
        argv += ["--base", str(tmp_path / "base.safetensors")]
        argv += ["--tuned", str(tmp_path / "tuned.safetensors"), "--rewards", str(rewards)]
        argv += ["--out", str(out), "--samples-per-prompt", str(k), "--num-steps", str(steps)]
        assert ev.main([*argv, "--seed", str(seed)]) == 0
        texts = [row["prompt"] for row, _ in GENEVAL_ROWS for _ in range(k)]
        metadata = [{"geneval": wire} for _, wire in GENEVAL_ROWS for _ in range(k)]
        prompts = [ev.EvalPrompt(text) for text in texts[::k]]
        direct = {}
        with RewardClient(server.target) as client:
            for label, policy in (("base", base), ("tuned", tuned)):
                frames = ev.generate(
                    policy, prompts, samples_per_prompt=k, num_steps=steps, seed=seed
                )
                direct[label] = client.score(
                    "geneval", images=frames, prompts=texts, metadata=metadata
                )["correct"]

    result = json.loads((out / "results.json").read_text())
    for label in ("base", "tuned"):
        scores = np.asarray(result["scores"][label]["GenEval"])
        assert set(np.unique(scores)) <= {0.0, 1.0}
        np.testing.assert_array_equal(scores, direct[label])
    both = np.concatenate([direct["base"], direct["tuned"]])
    assert 0 < both.sum() < len(both)  # not all-0 or all-1: the means below are real checks
    tags = np.asarray([row["tag"] for row, _ in GENEVAL_ROWS for _ in range(k)])
    rows = {(r["metric"], r["tag"]): r for r in result["rows"]}
    assert [r["tag"] for r in result["rows"]] == [
        None,
        "single_object",
        "counting",
        "colors",
        "position",
    ]
    for tag, n in (("single_object", 4), ("counting", 4), ("colors", 4), ("position", 2)):
        row = rows[("GenEval", tag)]
        assert row["n"] == n
        assert row["base"] == pytest.approx(float(direct["base"][tags == tag].mean()))
        assert row["tuned"] == pytest.approx(float(direct["tuned"][tags == tag].mean()))
    overall = rows[("GenEval", None)]
    assert overall["n"] == len(texts)
    for label in ("base", "tuned"):
        per_tag = [direct[label][tags == t].mean() for t in dict.fromkeys(tags)]
        assert overall[label] == pytest.approx(float(np.mean(per_tag)))
    for row in result["rows"]:  # (tuned - base) / |base| in %; NaN (n/a) for a zero base
        if row["base"] == 0:
            assert math.isnan(row["relative_change_pct"])
        else:
            expected = (row["tuned"] - row["base"]) / abs(row["base"]) * 100
            assert row["relative_change_pct"] == pytest.approx(expected)
    table = (out / "results.md").read_text()
    assert "| GenEval | " in table and "| GenEval [counting] | " in table
    assert (out / "samples_base.png").is_file() and (out / "samples_tuned.png").is_file()
    assert result["settings"]["rewards"][0]["metadata"] is True


def test_videoalign_vq_mq_table_against_a_real_server(tmp_path):
    """``dancegrpo-eval`` (``main``) end to end for video: a tiny HunyuanVideo diffusers
    folder as ``model.path`` (the base: no ``--base``), a perturbed transformer as
    ``--tuned``, a ``.txt`` prompt set, and one real server hosting the tiny ``videoalign``
    reward scored as two metrics (outputs ``vq`` and ``mq``). The table equals direct
    ``RewardClient`` scoring of the same ``[N, T, H, W, 3]`` videos, and the sample grids
    are animated GIFs, one frame per video frame."""
    from PIL import Image

    from dancegrpo_proto import RewardClient
    from dancegrpo_testing import videoalign_models
    from dancegrpo_testing.diffusion_models import save_pipeline
    from dancegrpo_testing.servers import running_reward_server
    from dancegrpo_testing.video_models import TINY_LLAMA_MAX_LENGTH, tiny_hunyuan_video_pipeline
    from dancegrpo_trainer.config import load_config
    from dancegrpo_trainer.policy_factory import build_policy

    pipe = tiny_hunyuan_video_pipeline()
    model_path = save_pipeline(pipe, tmp_path / "hunyuan")
    generator = torch.Generator().manual_seed(0)
    perturbed = {
        k: (v + 0.1 * torch.randn(v.shape, generator=generator)).contiguous()
        for k, v in pipe.transformer.state_dict().items()
    }
    save_file(perturbed, str(tmp_path / "tuned.safetensors"))
    del pipe
    prompts_path = tmp_path / "prompts.txt"
    prompts_path.write_text("a cat jumping on a sofa\n# skipped\na red car\nwaves at sunset\n")
    folder = videoalign_models.write_hf_folder(tmp_path / "videoalign")
    options = {
        "path": str(folder),
        "min_frame_pixels": 28 * 28,
        "max_frame_pixels": 56 * 56 * 2,
        "source_fps": 8.0,
    }
    server_config = {"rewards": {"videoalign": {"kind": "videoalign", "options": options}}}
    steps, seed = 2, 4
    with running_reward_server(server_config, metrics=False, startup_timeout_s=120) as server:
        config = _write_yaml(
            tmp_path / "train.yaml",
            {
                "model": {
                    "kind": "hunyuan_video",
                    "path": str(model_path),
                    "height": 32,
                    "width": 32,
                    "num_frames": 5,
                    "options": {
                        "crop_start": None,
                        "max_sequence_length": TINY_LLAMA_MAX_LENGTH,
                        "shift": 7.0,
                    },
                },
                "rewards": {
                    "endpoints": [{"target": server.target, "reward": "videoalign", "output": "vq"}]
                },
                "data": {"train_prompts": ["unused"]},
            },
        )
        out = tmp_path / "eval"
        argv = ["--config", str(config), "--prompts", str(prompts_path)]
        argv += ["--tuned", str(tmp_path / "tuned.safetensors"), "--out", str(out)]
        argv += ["--reward", f"VideoAlign VQ={server.target}/videoalign:vq"]
        argv += ["--reward", f"VideoAlign MQ={server.target}/videoalign:mq"]
        assert ev.main([*argv, "--num-steps", str(steps), "--seed", str(seed)]) == 0

        # The same policies, built the way the CLI builds them, sampled again.
        cfg = load_config(config)
        prompts = ev.load_prompt_set(prompts_path)
        texts = [p.prompt for p in prompts]
        direct = {}
        with RewardClient(server.target) as client:
            for label in ("base", "tuned"):
                policy = build_policy(cfg.model, torch.device("cpu"))
                if label == "tuned":
                    ev.load_weights(policy, tmp_path / "tuned.safetensors")
                frames = ev.generate(
                    policy, prompts, samples_per_prompt=1, num_steps=steps, seed=seed
                )
                assert frames.shape == (3, 5, 32, 32, 3)
                direct[label] = client.score("videoalign", videos=frames, prompts=texts)

    result = json.loads((out / "results.json").read_text())
    rows = {r["metric"]: r for r in result["rows"]}
    assert [r["metric"] for r in result["rows"]] == ["VideoAlign VQ", "VideoAlign MQ"]
    assert all(r["tag"] is None and r["n"] == 3 for r in result["rows"])
    for metric, output in (("VideoAlign VQ", "vq"), ("VideoAlign MQ", "mq")):
        for label in ("base", "tuned"):
            np.testing.assert_allclose(
                result["scores"][label][metric], direct[label][output], rtol=1e-6
            )
        b, t = float(direct["base"][output].mean()), float(direct["tuned"][output].mean())
        row = rows[metric]
        assert row["base"] == pytest.approx(b, abs=1e-6)
        assert row["tuned"] == pytest.approx(t, abs=1e-6)
        assert row["relative_change_pct"] == pytest.approx((t - b) / abs(b) * 100, rel=1e-5)
    assert any(rows[m]["base"] != rows[m]["tuned"] for m in rows)  # the tuned weights loaded
    table = (out / "results.md").read_text()
    assert "| VideoAlign VQ | " in table and "| VideoAlign MQ | " in table
    for label in ("base", "tuned"):
        with Image.open(out / f"samples_{label}.gif") as gif:
            assert gif.n_frames == 5  # one grid per video frame
            assert gif.size == (4 * (3 * (32 + 2) + 2), 4 * (32 + 2 + 2))  # 3 videos, 4x
    assert not (out / "samples_base.png").exists()


def test_image_to_video_eval_conditions_on_the_jsonl_images(tmp_path):
    """``dancegrpo-eval`` for SkyReels I2V: a JSONL prompt set with ``condition_image``
    paths (the training data's format). The images reach the policy (swapping them changes
    the videos) and the reward service (sent as ``condition_images``); the table equals
    direct scoring of the same videos."""
    from PIL import Image

    from dancegrpo_proto import RewardClient
    from dancegrpo_testing.diffusion_models import save_pipeline
    from dancegrpo_testing.servers import running_reward_server
    from dancegrpo_testing.video_models import TINY_LLAMA_MAX_LENGTH, tiny_skyreels_i2v_pipeline
    from dancegrpo_trainer.config import load_config
    from dancegrpo_trainer.policy_factory import build_policy

    pipe = tiny_skyreels_i2v_pipeline()
    model_path = save_pipeline(pipe, tmp_path / "skyreels")
    # --tuned is required; the same weights keep this test about the conditioning.
    tuned = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    rng = np.random.default_rng(0)
    rows = []
    for i, prompt in enumerate(["a cat turns its head", "a car drives away"]):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"ref{i}.png"
        )
        rows.append({"prompt": prompt, "condition_image": f"ref{i}.png"})
    prompts_path = tmp_path / "i2v.jsonl"
    prompts_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    server_config = {
        "rewards": {"bright": {"kind": "brightness", "options": {"modality": "video"}}}
    }
    steps, seed = 2, 1
    with running_reward_server(server_config, metrics=False) as server:
        config = _write_yaml(
            tmp_path / "train.yaml",
            {
                "model": {
                    "kind": "skyreels_i2v",
                    "path": str(model_path),
                    "height": 32,
                    "width": 32,
                    "num_frames": 5,
                    "options": {
                        "crop_start": None,
                        "max_sequence_length": TINY_LLAMA_MAX_LENGTH,
                        "true_cfg_scale": 1.0,
                    },
                },
                "rewards": {"endpoints": [{"target": server.target, "reward": "bright"}]},
                "data": {"train_prompts": str(prompts_path)},
            },
        )
        out = tmp_path / "eval"
        argv = ["--config", str(config), "--prompts", str(prompts_path), "--out", str(out)]
        argv += ["--tuned", str(tmp_path / "tuned.safetensors")]
        argv += ["--reward", f"brightness={server.target}/bright"]
        assert ev.main([*argv, "--num-steps", str(steps), "--seed", str(seed)]) == 0

        prompts = ev.load_prompt_set(prompts_path)
        assert prompts[1].condition_image == str(tmp_path / "ref1.png")
        policy = build_policy(load_config(config).model, torch.device("cpu"))
        frames = ev.generate(policy, prompts, samples_per_prompt=1, num_steps=steps, seed=seed)
        swapped = [
            dataclasses.replace(p, condition_image=q.condition_image)
            for p, q in zip(prompts, prompts[::-1], strict=True)
        ]
        other = ev.generate(policy, swapped, samples_per_prompt=1, num_steps=steps, seed=seed)
        assert frames.shape == (2, 5, 32, 32, 3) and not np.array_equal(frames, other)
        images = ev.condition_images(prompts, 1)
        with RewardClient(server.target) as client:
            direct = client.score(
                "bright",
                videos=frames,
                prompts=[p.prompt for p in prompts],
                condition_images=images,
            )["score"]
    result = json.loads((out / "results.json").read_text())
    np.testing.assert_allclose(result["scores"]["base"]["brightness"], direct, rtol=1e-6)
    np.testing.assert_allclose(result["scores"]["tuned"]["brightness"], direct, rtol=1e-6)


def test_score_frames_sends_condition_images_and_metadata_per_sample(tmp_path):
    from PIL import Image

    images = [np.full((4, 6, 3), 10 * i, np.uint8) for i in range(2)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"c{i}.png")
    spec = {"tag": "single_object", "include": [{"class_name": "cat", "count": 1}]}
    prompts = [
        ev.EvalPrompt("a", "t", {"geneval": spec}, str(tmp_path / "c0.png")),
        ev.EvalPrompt("b", "t", None, str(tmp_path / "c1.png")),
    ]
    calls = []

    class Recording:
        def score(self, reward, **kwargs):
            calls.append((reward, kwargs))
            return {"score": np.arange(len(kwargs["prompts"]), dtype=np.float32)}

    specs = [ev.RewardSpec("m", "t:1", "r", metadata=True), ev.RewardSpec("n", "t:1", "r")]
    frames = np.zeros((4, 3, 8, 8, 3), np.uint8)
    out = ev.score_frames(frames, prompts, 2, specs, lambda spec: Recording())
    assert sorted(out) == ["m", "n"]
    (_, with_meta), (_, without) = calls
    assert with_meta["prompts"] == ["a", "a", "b", "b"]
    assert with_meta["metadata"] == [{"geneval": spec}] * 2 + [None] * 2
    assert "metadata" not in without
    for kwargs in (with_meta, without):
        sent = kwargs["condition_images"]
        assert sent.shape == (4, 4, 6, 3)
        np.testing.assert_array_equal(sent, np.stack([images[0]] * 2 + [images[1]] * 2))
        assert kwargs["videos"] is frames


@pytest.mark.parametrize("kind", ["wan_t2v", "wan_i2v"])
def test_wan_eval_text_and_image_to_video(tmp_path, kind):
    """``dancegrpo-eval`` for Wan: Wan2.2 T2V-A14B from a ``.txt`` prompt set, its ``--tuned``
    weights (both experts, named ``transformer.*`` / ``transformer_2.*`` as training saves
    them) loaded into the two-expert module; Wan2.1 I2V from JSONL rows with images, which
    reach the policy (swapping them changes the videos). The table equals direct scoring of
    the same ``[N, T, H, W, 3]`` videos."""
    from PIL import Image

    from dancegrpo_proto import RewardClient
    from dancegrpo_testing.diffusion_models import save_pipeline
    from dancegrpo_testing.servers import running_reward_server
    from dancegrpo_testing.wan_models import (
        TINY_WAN_MAX_LENGTH,
        WAN21_I2V_TEXT_LENGTH,
        tiny_wan22_t2v_pipeline,
        tiny_wan_i2v_pipeline,
    )
    from dancegrpo_trainer.config import load_config
    from dancegrpo_trainer.policies.wan import WanExperts
    from dancegrpo_trainer.policy_factory import build_policy

    i2v = kind == "wan_i2v"
    pipe = tiny_wan_i2v_pipeline() if i2v else tiny_wan22_t2v_pipeline()
    model_path = save_pipeline(pipe, tmp_path / "wan")
    module = pipe.transformer if i2v else WanExperts(pipe.transformer, pipe.transformer_2)
    generator = torch.Generator().manual_seed(0)
    scale = 0.0 if i2v else 0.1  # I2V: the same weights, so the test is about the images
    tuned = {
        k: (v + scale * torch.randn(v.shape, generator=generator)).contiguous()
        for k, v in module.state_dict().items()
    }
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    if i2v:
        rng = np.random.default_rng(0)
        rows = []
        for i, prompt in enumerate(["a cat turns its head", "a car drives away"]):
            Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(
                tmp_path / f"ref{i}.png"
            )
            rows.append({"prompt": prompt, "condition_image": f"ref{i}.png"})
        prompts_path = tmp_path / "i2v.jsonl"
        prompts_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        prompts_path = tmp_path / "prompts.txt"
        prompts_path.write_text("a cat jumping on a sofa\na red car\n")
    text_length = WAN21_I2V_TEXT_LENGTH if i2v else TINY_WAN_MAX_LENGTH
    server_config = {
        "rewards": {"bright": {"kind": "brightness", "options": {"modality": "video"}}}
    }
    steps, seed = 2, 3
    with running_reward_server(server_config, metrics=False) as server:
        config = _write_yaml(
            tmp_path / "train.yaml",
            {
                "model": {
                    "kind": kind,
                    "path": str(model_path),
                    "height": 16,
                    "width": 16,
                    "num_frames": 5,
                    "guidance_scale": 4.0,
                    "options": {"max_sequence_length": text_length, "shift": 3.0},
                },
                "rewards": {"endpoints": [{"target": server.target, "reward": "bright"}]},
                "data": {"train_prompts": str(prompts_path)},
            },
        )
        out = tmp_path / "eval"
        argv = ["--config", str(config), "--prompts", str(prompts_path), "--out", str(out)]
        argv += ["--tuned", str(tmp_path / "tuned.safetensors")]
        argv += ["--reward", f"brightness={server.target}/bright"]
        assert ev.main([*argv, "--num-steps", str(steps), "--seed", str(seed)]) == 0

        cfg = load_config(config)
        prompts = ev.load_prompt_set(prompts_path)
        direct = {}
        with RewardClient(server.target) as client:
            for label in ("base", "tuned"):
                policy = build_policy(cfg.model, torch.device("cpu"))
                if label == "tuned":
                    ev.load_weights(policy, tmp_path / "tuned.safetensors")
                frames = ev.generate(
                    policy, prompts, samples_per_prompt=1, num_steps=steps, seed=seed
                )
                assert frames.shape == (2, 5, 16, 16, 3)
                images = ev.condition_images(prompts, 1)
                kwargs = {"condition_images": images} if images is not None else {}
                direct[label] = client.score(
                    "bright", videos=frames, prompts=[p.prompt for p in prompts], **kwargs
                )["score"]
            if i2v:
                swapped = [
                    dataclasses.replace(p, condition_image=q.condition_image)
                    for p, q in zip(prompts, prompts[::-1], strict=True)
                ]
                other = ev.generate(
                    policy, swapped, samples_per_prompt=1, num_steps=steps, seed=seed
                )
                assert not np.array_equal(frames, other)
    result = json.loads((out / "results.json").read_text())
    for label in ("base", "tuned"):
        np.testing.assert_allclose(result["scores"][label]["brightness"], direct[label], rtol=1e-6)
    if not i2v:  # the tuned experts loaded: other videos
        assert not np.allclose(direct["base"], direct["tuned"])
