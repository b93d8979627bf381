"""The device side of programmatic dependent launch (the host side: :func:`prr.ops.backend.pdl_launch`)."""

import triton
import triton.language as tl


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """First statement of every prr kernel: with ``PDL``, wait until the kernels this one depends on have
    finished (nothing is read or written before), then let the next kernel in the stream be scheduled."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
