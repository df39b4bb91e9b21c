"""Checkpoints in and out: Hugging Face directories and hub ids (safetensors, shards, ``.bin``), GGUF files,
tokenizers, and the model folders this library writes (``artifacts``). ``load.load`` is ``rj.load``."""
