"""Builders for tiny random-weight models and offline tokenizers, shared by every test
suite and benchmark in the repository (one place, so tests stay small and consistent).

Submodules, each importing its heavy dependencies only when used:

- ``tokenizers``: an exact CLIP BPE tokenizer (Hugging Face ``CLIPTokenizer``) written
  from open_clip's bundled vocabulary — no hub access.
- ``clip_models``: tiny open_clip configs/checkpoints (hpsv2 and bare formats), a tiny
  Hugging Face ``CLIPModel`` folder and a random LAION aesthetic head.
- ``diffusion_models``: tiny SD/FLUX components (UNet, VAE, CLIP, T5 + offline T5
  tokenizer, FluxTransformer) and pipeline builders / save helpers.
- ``images``: tiny encoded test images and a probe of what PIL actually decodes.
- ``servers``: ``running_reward_server(config)`` starts ``dancegrpo-rewards serve`` as a
  real subprocess on an ephemeral loopback port.
"""
