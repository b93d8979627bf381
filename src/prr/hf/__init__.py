"""prr inside a transformers causal LM (Llama, Qwen2, Mistral): decode with prr's paged cache and dense, DSA or
PRR attention through transformers' own extension points (its attention-function registry and Cache classes).

    import prr.hf
    model = prr.hf.enable(AutoModelForCausalLM.from_pretrained(path))
    out = prr.hf.generate(model, ids, prr.hf.PrrSettings(method="prr", budget=2048), max_new_tokens=64)

Needs ``transformers`` (the ``hf`` extra).
"""

from .attention import cache_kwarg, enable, generate, prr_attention, register
from .cache import FAMILIES, PrrCache, PrrLayer
from .settings import METHODS, PrrSettings

__all__ = ["FAMILIES", "METHODS", "PrrCache", "PrrLayer", "PrrSettings", "cache_kwarg", "enable", "generate",
           "prr_attention", "register"]
