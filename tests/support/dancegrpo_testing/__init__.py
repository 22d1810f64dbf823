"""Builders for tiny random-weight models and offline tokenizers, shared by every test
suite and benchmark in the repository (one place, so tests stay small and consistent).

Submodules, each importing its heavy dependencies only when used:

- ``tokenizers``: an exact CLIP BPE tokenizer (Hugging Face ``CLIPTokenizer``) written
  from open_clip's bundled vocabulary — no hub access.
- ``clip_models``: tiny open_clip configs/checkpoints (hpsv2 and bare formats), a tiny
  Hugging Face ``CLIPModel`` folder and a random LAION aesthetic head.
- ``diffusion_models``: tiny SD/FLUX components (UNet, VAE, CLIP, T5 + offline T5
  tokenizer, FluxTransformer), FLUX.1-Kontext and SD3.5 (MMDiT-X transformer, three text
  encoders) pipelines, and save helpers.
- ``dinov2_models``: a tiny DINOv2 folder (hub layout) for ``image_similarity``.
- ``video_models``: a tiny HunyuanVideo pipeline (3-D transformer, video VAE, Llama + offline
  byte-level BPE tokenizer, CLIP); save it with ``diffusion_models.save_pipeline``.
- ``wan_models``: tiny Wan2.1 T2V/I2V, Wan2.2 T2V/I2V-A14B (two experts) and TI2V-5B
  pipelines (UMT5 + offline T5 tokenizer, Wan VAEs, CLIP vision for Wan2.1 I2V).
- ``geneval_models``: a tiny Mask2Former COCO folder (hub layout) + colour CLIP for ``geneval``.
- ``videoalign_models``: a tiny Qwen2-VL VideoAlign model (offline BPE tokenizer with the
  reward tokens, ``rm_head``) as an HF folder, and a VideoReward release (peft LoRA).
- ``policy_checks``: the guarantees every policy adapter's tests check (η = 0 parity with
  its pipeline, on-policy ratio exactly 1, where gradients land, LoRA, gradient
  checkpointing, embedding cache, ``from_pipeline`` leaving modules as they were).
- ``reward_checks``: what every reward kind's tests check (a batch scores as its samples
  one at a time; a real server lists and scores a reward as the local one does).
- ``scorers``: ``RednessScorer``, the in-process stand-in for a reward service that the
  trainer tests hand to ``Trainer``.
- ``trainer_runs``: what trainer tests inspect of a run (``trainable_state``,
  ``RecordingTrainer`` for the Trainer the CLI builds, ``records`` of ``metrics.jsonl``).
- ``torch_threads``: ``one_torch_thread``, the autouse fixture a module imports to run on
  one intra-op thread.
- ``images``: tiny encoded test images and a probe of what PIL actually decodes.
- ``servers``: ``running_reward_server(config)`` starts ``dancegrpo-rewards serve`` as a
  real subprocess on an ephemeral loopback port.
"""
