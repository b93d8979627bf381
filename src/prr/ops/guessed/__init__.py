"""The guessed top-K (:func:`select_blocks_guessed`): DSA's selection from a predicted threshold, exactly.
Dispatch: see :mod:`prr.ops.backend`."""

from .. import backend
from . import reference
from .reference import HELD, NARROWED, PATHS, SHORT, TOO_HIGH, TOO_LOW, key_to_float, order_key


def select_blocks_guessed(scores, num_blocks, top_k, n_sink=1, n_local=2, *, guess=None, prev=None, guess_k=None,
                          spec_k=None,
                          num_blocks_next=None, group_max=None, out=None, interp=True):
    guess_k = 2 * top_k if guess_k is None else guess_k
    spec_k = top_k if spec_k is None else spec_k
    if backend.use_triton(scores):
        reference.check_guess_inputs(scores, num_blocks, top_k, n_sink, n_local, guess, prev, guess_k, spec_k,
                                     num_blocks_next)
        from . import triton as kernels

        return kernels.select_blocks_guessed(scores.float(), num_blocks, top_k, n_sink, n_local, guess=guess, prev=prev,
                                             guess_k=guess_k, spec_k=spec_k, num_blocks_next=num_blocks_next,
                                             group_max=group_max, out=out, interp=interp)
    res = reference.select_blocks_guessed(scores, num_blocks, top_k, n_sink, n_local, guess=guess, prev=prev,
                                          guess_k=guess_k,
                                          spec_k=spec_k, num_blocks_next=num_blocks_next, interp=interp)
    if out is None:
        return res
    for dst, src in zip(out, res, strict=True):
        if dst is not None:
            dst.copy_(src)
    return tuple(src if dst is None else dst for dst, src in zip(out, res, strict=True))


select_blocks_guessed.__doc__ = reference.select_blocks_guessed.__doc__ + """
    ``group_max``: the full search's stage-1 group maxima written by the scoring kernel (as for
    :func:`prr.select_blocks`; ignored by the reference). ``out``: a 6-tuple of buffers for the six results
    (None entries are allocated); ``prev`` may be ``(out[0], out[1])`` (the previous step's selection, in
    place) and ``guess`` may be ``out[2]``: each row reads them before writing."""

def select_blocks_collected(scores, num_blocks, top_k, n_sink=1, n_local=2, *, tau, collected=None, guess_k=None,
                            cap=None, group_max=None, out=None, reset=True):
    guess_k = 3 * top_k if guess_k is None else guess_k
    if backend.use_triton(scores):
        if collected is None or group_max is None:
            raise ValueError("the Triton collected top-K needs collected=(list, counter) and group_max from the "
                             "scoring kernel (quest_scores / infllm_scores with collect=...)")
        from . import triton as kernels

        cap = collected[0].numel() // max(1, scores.shape[0] * scores.shape[1])
        reference.check_select_inputs(scores, num_blocks, top_k, n_sink, n_local)
        if not top_k <= guess_k <= cap:
            raise ValueError(f"need top_k <= guess_k <= the list's capacity, got {top_k}, {guess_k}, {cap}")
        idx, cnt, st = kernels.select_blocks_collected(scores.float(), num_blocks, top_k, n_sink, n_local, tau=tau,
                                                       collected=collected, guess_k=guess_k, group_max=group_max,
                                                       out=out, reset=reset)
        return idx, cnt, tau, st
    cap = collected[0].shape[-1] if cap is None and collected is not None else cap
    idx, cnt, nxt, st = reference.select_blocks_collected(scores, num_blocks, top_k, n_sink, n_local, tau=tau,
                                                          guess_k=guess_k, cap=cap)
    tau.copy_(nxt)
    return idx, cnt, tau, st


select_blocks_collected.__doc__ = reference.select_blocks_collected.__doc__

__all__ = ["select_blocks_collected", "HELD", "NARROWED", "PATHS", "SHORT", "TOO_HIGH", "TOO_LOW", "key_to_float", "order_key",
           "select_blocks_guessed"]
