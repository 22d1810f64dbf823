"""Real-size GPU measurement of one reward replica: the ``hps`` kind (open_clip ViT-H-14,
random weights saved in HPS's checkpoint format) scoring 720×720 uint8 images through
``HPSReward.score`` — the exact in-process path the server's batcher calls, including
hpsv2's preprocessing and the per-prompt text-feature cache.

    PYTHONPATH=packages/rewards/src python benchmarks/gpu_hps_throughput.py --out hps.json

Prints images/s per batch size for bf16 and fp32 weights. Together with the policy-side
numbers of ``gpu_flux_real_size.py`` this sizes reward replicas per policy GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_random_hps_checkpoint(arch: str, path: Path) -> None:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_hps_throughput.json")
    parser.add_argument("--arch", default="ViT-H-14")
    parser.add_argument("--resolution", type=int, default=720)
    parser.add_argument("--batches", type=int, nargs="+", default=[12, 64])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    from dancegrpo_rewards.base import RewardBatch
    from dancegrpo_rewards.kinds.hps import HPSReward

    results: dict[str, object] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "arch": args.arch,
        "resolution": args.resolution,
    }
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "hps_random.pt"
        t0 = time.perf_counter()
        write_random_hps_checkpoint(args.arch, ckpt)
        results["checkpoint_write_s"] = round(time.perf_counter() - t0, 1)
        for dtype in args.dtypes:
            reward = HPSReward(
                "hps",
                {"checkpoint": str(ckpt), "arch": args.arch, "device": args.device, "dtype": dtype},
            )
            t0 = time.perf_counter()
            reward.load()
            results[f"load_s_{dtype}"] = round(time.perf_counter() - t0, 1)
            for n in args.batches:
                images = list(
                    rng.integers(0, 256, (n, args.resolution, args.resolution, 3), dtype=np.uint8)
                )
                # GRPO groups: every prompt repeats G=12 times, so the text cache hits.
                prompts = [f"prompt {i // 12}" for i in range(n)]
                batch = RewardBatch(prompts, images, [None] * n, [None] * n)
                reward.score(batch)  # warm-up (kernels, text cache)
                times = []
                for _ in range(5):
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    scores = reward.score(batch)["score"]
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                assert scores.shape == (n,) and np.isfinite(scores).all()
                best = float(np.median(times))
                results[f"{dtype}_batch{n}_s"] = round(best, 4)
                results[f"{dtype}_batch{n}_images_per_s"] = round(n / best, 1)
                print(json.dumps({k: v for k, v in results.items() if dtype in k}), flush=True)
            del reward
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
