"""One matrix for q, k, v (and one for gate, up) in a transformers model, without a second copy.

prr's own model multiplies one fused q/k/v matrix and one gate/up matrix per layer in a decode step (two
matrix-vector products fewer per layer than separate ones, the same bytes read). A transformers checkpoint
keeps them as separate ``nn.Linear`` weights, so :class:`prr.hf.decoder.HFDecoder` runs separate products
unless the tensors lie back to back in one storage: :func:`adjacent` finds that and views them as one matrix.
:func:`fuse_projections` makes it so, moving each group of parameters into one new buffer whose row blocks the
parameters become (``param.data = view``): the old storage is freed, so no memory is added (one group's bytes
once more while it moves). The model computes exactly as before; ``save_pretrained`` sees parameters sharing
a storage (safetensors refuses that: ``.clone()`` them, or reload, before saving).
"""

from __future__ import annotations

import torch


def adjacent(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One view ``[sum of rows, ...]`` over contiguous `tensors` (same dtype, device and trailing shape) that lie
    back to back, in order, in one storage; None otherwise."""
    first = tensors[0]
    base, off = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        same = t.dtype == first.dtype and t.device == first.device and t.shape[1:] == first.shape[1:]
        if not same or not t.is_contiguous() or t.untyped_storage().data_ptr() != base or t.storage_offset() != off:
            return None
        off += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _groups(layer) -> list[list]:
    attn, mlp = layer.self_attn, layer.mlp
    groups = [[attn.q_proj, attn.k_proj, attn.v_proj]]
    if hasattr(mlp, "gate_proj"):  # GLM's gate_up_proj is one matrix already
        groups.append([mlp.gate_proj, mlp.up_proj])
    return groups


@torch.no_grad()
def fuse_projections(model) -> int:
    """Put each layer's q/k/v weights (and biases), and gate/up weights, back to back in one buffer each (see the
    module docstring). Returns how many groups moved (0 when every group already lies so)."""
    moved = 0
    for layer in model.model.layers:
        for mods in _groups(layer):
            for name in ("weight", "bias"):
                ps = [getattr(m, name) for m in mods]
                if any(p is None for p in ps):
                    if not all(p is None for p in ps):
                        raise ValueError(f"{type(mods[0]).__name__}s with and without a {name}: not fused")
                    continue
                if adjacent(ps) is not None:
                    continue
                buf = torch.cat([p.detach() for p in ps])
                for p, view in zip(ps, buf.split([p.shape[0] for p in ps]), strict=True):
                    p.data = view
                moved += 1
    return moved
