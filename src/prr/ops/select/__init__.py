"""Selection and set operations on selections. ``select_blocks`` dispatches (see :mod:`prr.ops.backend`)."""

import torch

from .. import backend
from . import reference
from .reference import check_budget, selection_contains, selection_difference, selection_mask


def select_blocks(scores, num_blocks, top_k, n_sink=1, n_local=2, *, group_max=None, out=None):
    if out is not None:
        _check_out(out, scores, top_k + n_sink + n_local)
    if backend.use_triton(scores):
        reference.check_select_inputs(scores, num_blocks, top_k, n_sink, n_local)
        from . import triton as kernels

        return kernels.select_blocks(scores.float(), num_blocks, top_k, n_sink, n_local, group_max=group_max,
                                     out=out)
    idx, cnt = reference.select_blocks(scores, num_blocks, top_k, n_sink, n_local)
    if out is None:
        return idx, cnt
    out[0].copy_(idx)
    out[1].copy_(cnt)
    return out


def _check_out(out, scores, kmax):
    b, h = scores.shape[:2]
    idx, cnt = out
    if (tuple(idx.shape), tuple(cnt.shape)) != ((b, h, kmax), (b, h)) or idx.dtype != torch.int32 \
            or cnt.dtype != torch.int32 or not idx.is_contiguous() or not cnt.is_contiguous():
        raise ValueError(f"out must be contiguous int32 [{b}, {h}, {kmax}] indices and [{b}, {h}] counts")


def selection_overlap(p_idx, p_cnt, s_idx, s_cnt):
    if backend.use_triton(p_cnt):
        from . import triton as kernels

        return kernels.selection_overlap(p_idx, p_cnt, s_idx, s_cnt)
    return reference.selection_overlap(p_idx, p_cnt, s_idx, s_cnt)


selection_overlap.__doc__ = reference.selection_overlap.__doc__


select_blocks.__doc__ = reference.select_blocks.__doc__ + """
    ``group_max``: the Triton top-K's stage-1 group maxima, written by the scoring kernel
    (``quest_scores(..., group_max_for=(n_sink, n_local))``) for these scores and this selection; ignored by
    the reference. ``out=(indices, counts)``: write the selection there (contiguous int32 of the result's
    shapes)."""

__all__ = ["check_budget", "select_blocks", "selection_contains", "selection_difference", "selection_mask",
           "selection_overlap"]
