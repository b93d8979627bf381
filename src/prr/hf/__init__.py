"""prr inside a transformers causal LM (Llama, Qwen2, Mistral, GLM, GLM-4): decode with prr's paged cache and
dense, DSA or PRR attention.

    import prr.hf
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    out = prr.hf.generate(model, ids, prr.hf.PrrSettings(method="prr", budget=2048), max_new_tokens=64)
    # or: prr.hf.enable(model, settings); model.generate(ids, max_new_tokens=64)

On a GPU :func:`generate` runs the decode steps through prr's engine over the model's own tensors (one CUDA
graph per step: :mod:`prr.hf.fast`); what only transformers' ``generate`` offers falls back to it, over a
:class:`PrrCache` and prr's attention registered in transformers (:mod:`prr.hf.attention`).

Needs ``transformers`` (the ``hf`` extra).
"""

from .attention import cache_kwarg, cached_generate, enable, prr_attention, register
from .cache import FAMILIES, PrrCache, PrrLayer
from .decoder import HFDecoder, problems
from .fast import PrrFallbackWarning, engine, generate, last_stats, patch_generate, stream, unpad
from .fuse import fuse_projections
from .settings import METHODS, PrrSettings

__all__ = ["FAMILIES", "METHODS", "HFDecoder", "PrrCache", "PrrFallbackWarning", "PrrLayer", "PrrSettings",
           "cache_kwarg", "cached_generate", "enable", "engine", "fuse_projections", "generate", "last_stats",
           "patch_generate",
           "problems", "prr_attention", "register", "stream", "unpad"]
