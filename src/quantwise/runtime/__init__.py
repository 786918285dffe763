"""Running quantized models: text generation for causal LMs (generate.py)."""

from quantwise.runtime.generate import Generation, generate, load_tokenizer

__all__ = ["Generation", "generate", "load_tokenizer"]
