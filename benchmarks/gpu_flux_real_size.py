"""Real-size GPU measurement: one DanceGRPO rollout + LoRA train step on a FLUX.1-dev-sized
transformer (random weights, bf16), the paper's FLUX setting (720 px, 16 steps, η 0.3,
shift 3, timestep_fraction 0.6, clip 1e-4, adv clip 5).

    python benchmarks/gpu_flux_real_size.py --out results.json [--batch 2] [--steps 16]

Measured side by side in one process, on one device:
- rollout with ``flow_sde_step`` (η 0.3) vs the plain Euler ODE loop (diffusers'
  ``FlowMatchEulerDiscreteScheduler.step`` update ``x + (σ' − σ)·v``), same model and batch
  → ``p5_sde_over_ode``;
- one GRPO update (recompute log-probs on the stored trajectory + clipped loss + backward
  on 60% of the steps) vs the raw forward+backward of the same model on the same inputs
  → ``p3_step_over_fwdbwd``;
- peak GPU memory of each phase.
Needs a CUDA GPU with ≥ 40 GB (the weights alone are ~24 GB in bf16). Text encoders and
the VAE are not part of the step (DanceGRPO precomputes embeddings; decode is measured
separately by the adapters), so the prompt embeddings here are random tensors of the
real shapes (T5: 512×4096, CLIP pooled: 768).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dancegrpo_trainer.core import flow_sde_step, flow_sigmas, grpo_loss, select_timesteps

FLUX_DEV_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_flux_real_size.json")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=720)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="override depth (smoke runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast in the update")
    parser.add_argument("--lora-dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    device = torch.device(args.device)
    if device.type == "cuda":
        # torch 2.11's cuDNN attention backward failed on this shape on an H100
        # ("mha_graph.execute ... is_good()", then illegal memory accesses); the flash and
        # memory-efficient SDPA kernels are used instead.
        torch.backends.cuda.enable_cudnn_sdp(False)
    cfg = dict(FLUX_DEV_CONFIG)
    if args.layers:
        cfg.update(num_layers=args.layers, num_single_layers=2 * args.layers)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    b, steps = args.batch, args.steps
    lat = args.resolution // 16  # VAE /8, then 2×2 packing
    tokens = lat * lat
    gen = torch.Generator(device).manual_seed(0)
    prompt = torch.randn(b, args.text_len, 4096, device=device, dtype=torch.bfloat16, generator=gen)
    pooled = torch.randn(b, 768, device=device, dtype=torch.bfloat16, generator=gen)
    txt_ids = torch.zeros(args.text_len, 3, device=device)
    img_ids = image_ids(lat, lat, device)
    guidance = torch.full((b,), 3.5, device=device)
    sigmas = flow_sigmas(steps, shift=3.0).to(device)

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        return model(
            hidden_states=x,
            timestep=sigmas[i].expand(b).to(x.dtype),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=prompt,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    x_init = torch.randn(b, tokens, 64, device=device, dtype=torch.bfloat16, generator=gen)

    @torch.no_grad()
    def rollout_sde():
        x, traj, logps = x_init, [x_init], []
        for i in range(steps):
            out = flow_sde_step(velocity(x, i), x, sigmas[i], sigmas[i + 1], eta=0.3, generator=gen)
            x = out.prev_sample
            traj.append(x)
            logps.append(out.log_prob)
        return torch.stack(traj, 1), torch.stack(logps, 1)

    @torch.no_grad()
    def rollout_ode():
        x = x_init
        for i in range(steps):
            x = (x.float() + (sigmas[i + 1] - sigmas[i]) * velocity(x, i).float()).to(x.dtype)
        return x

    results: dict[str, object] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "params_b": round(n_params / 1e9, 3),
        "build_s": round(build_s, 1),
        "batch": b,
        "steps": steps,
        "resolution": args.resolution,
        "image_tokens": tokens,
        "text_tokens": args.text_len,
    }
    rollout_ode()  # warm-up (kernels, allocator)
    reset_peak()
    reps = 2
    ode_s = sde_s = 0.0
    for _ in range(reps):  # interleaved so clock drift hits both equally
        _, t = timed(rollout_ode)
        ode_s += t / reps
        (traj, old_logp), t = timed(rollout_sde)
        sde_s += t / reps
    results["rollout_ode_s"] = round(ode_s, 3)
    results["rollout_sde_s"] = round(sde_s, 3)
    results["p5_sde_over_ode"] = round(sde_s / ode_s, 4)
    results["rollout_peak_gib"] = peak_gib()
    print(json.dumps(results), flush=True)  # partial results survive a failing train phase

    model.add_adapter(
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(getattr(torch, args.lora_dtype))
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    results["grad_checkpointing"] = args.grad_checkpointing
    results["autocast"] = args.autocast
    results["lora_dtype"] = args.lora_dtype
    model.train()
    lora_params = [p for p in model.parameters() if p.requires_grad]
    results["lora_params_m"] = round(sum(p.numel() for p in lora_params) / 1e6, 2)
    opt = torch.optim.AdamW(lora_params, lr=1e-5)
    advantages = torch.randn(b, device=device)
    chosen = select_timesteps(
        b, steps, timestep_fraction=0.6, generator=torch.Generator().manual_seed(0)
    )
    results["train_timesteps"] = int(chosen.shape[1])

    def grpo_update():
        for j in range(chosen.shape[1]):
            i = int(chosen[0, j])  # one timestep for the whole batch (one model call)
            x, x_next = traj[:, i], traj[:, i + 1]
            with torch.autocast(device.type, torch.bfloat16, enabled=args.autocast):
                v = velocity(x, i)
            out = flow_sde_step(v, x, sigmas[i], sigmas[i + 1], eta=0.3, prev_sample=x_next)
            loss = grpo_loss(out.log_prob, old_logp[:, i], advantages).loss
            (loss / chosen.shape[1]).backward()
        torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def raw_fwd_bwd():
        for j in range(chosen.shape[1]):
            i = int(chosen[0, j])
            with torch.autocast(device.type, torch.bfloat16, enabled=args.autocast):
                v = velocity(traj[:, i], i)
            (v.float().mean() / chosen.shape[1]).backward()
        opt.zero_grad(set_to_none=True)

    raw_fwd_bwd()  # warm-up
    reset_peak()
    raw_s = step_s = 0.0
    for _ in range(reps):
        _, t = timed(raw_fwd_bwd)
        raw_s += t / reps
        _, t = timed(grpo_update)
        step_s += t / reps
    results["train_raw_fwdbwd_s"] = round(raw_s, 3)
    results["train_grpo_step_s"] = round(step_s, 3)
    results["p3_step_over_fwdbwd"] = round(step_s / raw_s, 4)
    results["train_peak_gib"] = peak_gib()
    results["samples_per_s_rollout"] = round(b / sde_s, 3)
    print(json.dumps(results, indent=2))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
