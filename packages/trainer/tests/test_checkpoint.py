"""Checkpoints hold no pickle, round-trip exactly, and fail naming the file when damaged."""

from __future__ import annotations

import json
import logging
import pickle
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from dancegrpo_trainer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dancegrpo_trainer.checkpoint_format import (
    load_optimizer_state,
    load_rng_state,
    save_optimizer_state,
    save_rng_state,
)
from dancegrpo_trainer.checkpoint_integrity import MANIFEST, CheckpointError, sha256_file

ROOT = Path(__file__).resolve().parents[3]


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return module, opt, sched


def _train(module, opt, sched, steps: int) -> None:
    for _ in range(steps):
        loss = module(torch.randn(5, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _saved(tmp_path: Path, step: int = 3) -> tuple[Path, tuple]:
    parts = _parts()
    _train(*parts, steps=step)
    module, opt, sched = parts
    path = save_checkpoint(
        tmp_path,
        step,
        module=module,
        lora=False,
        optimizer=opt,
        scheduler=sched,
        trainer_state={"sampler": {"position": 7}},
    )
    return path, parts


def _load(path: Path):
    module, opt, sched = _parts(seed=1)
    state, _ = load_checkpoint(path, module=module, lora=False, optimizer=opt, scheduler=sched)
    return state, (module, opt, sched)


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        MANIFEST,
        "model.safetensors",
        "optimizer.safetensors",
        "rng_state_0.safetensors",
        "scheduler.json",
        "trainer_state.json",
    ]
    for p in path.iterdir():  # no file starts like a pickle or a torch.save zip archive
        assert p.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x04", b"\x80\x05", b"PK"), p.name
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 3
    assert set(manifest["files"]) == set(names) - {MANIFEST}
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (path / name).stat().st_size, "sha256": sha256_file(path / name)}


def test_resume_restores_module_optimizer_scheduler_exactly(tmp_path: Path) -> None:
    path, (module, opt, sched) = _saved(tmp_path)
    state, (module2, opt2, sched2) = _load(path)
    assert state == {"step": 3, "sampler": {"position": 7}}
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    # Both continue identically: the optimiser moments and step counts came back bit-exact.
    torch.manual_seed(5)
    _train(module, opt, sched, steps=2)
    torch.manual_seed(5)
    _train(module2, opt2, sched2, steps=2)
    for (k, a), b in zip(module.state_dict().items(), module2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_optimizer_state_round_trips_tensors_and_scalars(tmp_path: Path) -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 2: {"n": 4}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "foreach": None, "params": [0, 2]}],
    }
    save_optimizer_state(state, tmp_path / "o.safetensors")
    back = load_optimizer_state(tmp_path / "o.safetensors")
    assert back["param_groups"] == state["param_groups"]
    assert back["state"][2] == {"n": 4}
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert torch.equal(back["state"][0]["step"], state["state"][0]["step"])


def test_rng_states_round_trip_without_pickle(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()
    save_rng_state(tmp_path / "rng.safetensors")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    load_rng_state(tmp_path / "rng.safetensors")
    got = (random.random(), random.gauss(0, 1), np.random.rand(3), torch.rand(3))
    assert got[:2] == expected[:2]
    np.testing.assert_array_equal(got[2], expected[2])
    assert torch.equal(got[3], expected[3])


def test_a_bit_flip_is_detected_naming_the_file(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10  # inside a tensor: safetensors itself would load it silently
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt \(sha256"):
        _load(path)


def test_a_truncated_file_is_detected_naming_the_file(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    target = path / "optimizer.safetensors"
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[: size // 2])
    with pytest.raises(
        CheckpointError, match=rf"optimizer\.safetensors is truncated \({size // 2} of {size}"
    ):
        _load(path)


@pytest.mark.parametrize("name", ["scheduler.json", "rng_state_0.safetensors", MANIFEST])
def test_a_missing_part_is_detected_naming_the_file(tmp_path: Path, name: str) -> None:
    path, _ = _saved(tmp_path)
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', r'[.]')} is missing"):
        _load(path)


def test_a_corrupt_manifest_is_reported(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    (path / MANIFEST).write_text('{"format": "dancegrpo-checkpoint/1", "fil')
    with pytest.raises(CheckpointError, match=rf"{MANIFEST} is corrupt"):
        _load(path)


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_planted_pickles_are_never_executed(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    # The old (pickle) file names, planted beside a valid checkpoint: never opened.
    for name in ("rng_state_0.pt", "optimizer.pt", "scheduler.pt", "trainer_state.pt"):
        (path / name).write_bytes(payload)
    _load(path)
    assert not marker.exists()
    # A pickle in place of a real part is refused by the checksum ...
    (path / "rng_state_0.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="rng_state_0.safetensors"):
        _load(path)
    # ... and, with a manifest forged to match it, by the safetensors parser: never run.
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"]["rng_state_0.safetensors"] = {
        "bytes": len(payload),
        "sha256": sha256_file(path / "rng_state_0.safetensors"),
    }
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(Exception):  # noqa: B017 - any parse error will do; code must not run
        _load(path)
    assert not marker.exists()


def test_unfinished_and_foreign_folders_are_not_checkpoints(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    (tmp_path / "checkpoints" / ".tmp_step_000009").mkdir()
    (tmp_path / "checkpoints" / "step_backup").mkdir()
    assert list_checkpoints(tmp_path) == [path]


# ------------------------------------------------------------------ through the Trainer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(out: Path, *extra: str) -> list[str]:
    return [
        f"rewards.endpoints.0.target=127.0.0.1:{_closed_port()}",  # never called
        f"run.output_dir={out}",
        "run.progress=false",
        "run.sample_grid_every=0",
        "run.max_steps=2",
        "data.eval_prompts=[]",
        *extra,
    ]


def test_a_fresh_start_drops_the_rows_of_an_earlier_attempt(tmp_path: Path) -> None:
    from dancegrpo_trainer.config import load_config
    from dancegrpo_trainer.trainer import Trainer

    stale = [{"step": s, "split": "train", "reward_mean": 0.1} for s in (0, 1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    trainer = Trainer(load_config(ROOT / "configs/demo_grpo.yaml", _overrides(tmp_path)))
    trainer.close()
    assert trainer.step == 0
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_cli_logs_the_resumed_step_and_reports_a_corrupt_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from dancegrpo_trainer.cli import train_main
    from dancegrpo_trainer.config import load_config
    from dancegrpo_trainer.trainer import Trainer

    trainer = Trainer(load_config(ROOT / "configs/demo_grpo.yaml", _overrides(tmp_path)))
    trainer.step = 2
    saved = trainer.save()
    trainer.close()
    # As in a fresh process: the package logger has no level until setup_logging runs.
    logging.getLogger("dancegrpo_trainer").setLevel(logging.NOTSET)
    args = ["--config", str(ROOT / "configs/demo_grpo.yaml"), *_overrides(tmp_path)]
    assert logging.getLogger().level == logging.WARNING
    assert train_main(args) == 0  # resumes at step 2 = max_steps: nothing to train
    assert f"resumed step=2 from={saved}" in caplog.text

    (saved / "scheduler.json").write_text("{}")
    assert train_main(args) == 1
    err = capsys.readouterr().err
    assert f"dancegrpo-train: checkpoint {saved}: scheduler.json" in err
