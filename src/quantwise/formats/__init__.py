"""Checkpoint formats read and written beside quantwise's own folder: Hugging Face safetensors
shards (shards.py, checked before trusted, read one tensor at a time) and random-weight
Llama-architecture folders for tests and benchmarks (synthetic.py, no download)."""
