"""A small Llama-family decoder on the prr KV cache, its weights and tokenizer, and the generation engine."""

from .config import MODEL_PRESETS, ModelConfig
from .llama import Llama
from .weights import bundled_gguf_path, load_model

__all__ = ["MODEL_PRESETS", "Llama", "ModelConfig", "bundled_gguf_path", "load_model"]
