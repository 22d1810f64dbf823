"""Builders for tiny random-weight models and offline tokenizers, shared by every test
suite and benchmark in the repository (one place, so tests stay small and consistent).

Submodules, each importing its heavy dependencies only when used:

- ``tokenizers``: an exact CLIP BPE tokenizer (Hugging Face ``CLIPTokenizer``) written
  from open_clip's bundled vocabulary — no hub access.
"""
