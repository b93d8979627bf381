"""The predictor's state update; ``holt_update_`` dispatches (see :mod:`prr.ops.backend`)."""

from .. import backend
from . import reference
from .reference import holt_predict, holt_step, normalize_scores


def holt_update_(level, trend, known, scores, num_blocks, alpha, beta, gamma, pred=None):
    if backend.use_triton(level) and all(isinstance(x, float) for x in (alpha, beta, gamma)):
        reference.check_holt_inputs(level, trend, known, scores, num_blocks, pred)
        from . import triton as kernels

        return kernels.holt_update_(level, trend, known, scores, num_blocks, alpha, beta, gamma, pred)
    return reference.holt_update_(level, trend, known, scores, num_blocks, alpha, beta, gamma, pred)


holt_update_.__doc__ = reference.holt_update_.__doc__

__all__ = ["holt_predict", "holt_step", "holt_update_", "normalize_scores"]
