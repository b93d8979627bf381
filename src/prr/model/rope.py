"""Rotary position embeddings (RoPE): the frequency variants of the Llama family, in one place.

:class:`RopeScaling` says which variant a checkpoint uses; :class:`Rotary` turns it into inverse frequencies and
rotates queries and keys. The model's prefill and decode both go through :meth:`Rotary.apply`, so they cannot
disagree. The variants follow the published definitions as transformers implements them (its
``modeling_rope_utils``), which is what a checkpoint's numbers were trained with:

- ``default``: ``inv_freq_i = theta^(-2i/D)``.
- ``linear``: ``inv_freq / factor`` (position interpolation).
- ``llama3`` (Llama 3.1+): wavelengths longer than ``original_max_position / low_freq_factor`` are divided
  by ``factor``, shorter than ``original_max_position / high_freq_factor`` kept, a smooth ramp between.
- ``yarn``: a ramp between interpolated and extrapolated frequencies over the dimensions whose rotation
  count lies between ``beta_slow`` and ``beta_fast``, and cos/sin multiplied by the attention factor
  (``0.1 ln(factor) + 1`` unless given, or the ``mscale``/``mscale_all_dim`` ratio).
- ``dynamic`` (dynamic NTK): once the sequence is longer than ``max_position``, theta grows with the current
  length ``L``: ``theta (factor L / max_position - (factor - 1))^(D / (D - 2))``. ``L`` is the largest
  position of the call plus one, computed on the device (no host sync). transformers keeps the largest ``L``
  it has seen until a call falls back under ``max_position``; for a prompt followed by its decode steps
  (lengths only grow) the two are the same.

Keys in the cache keep the rotation they were written with (as in transformers): with ``dynamic`` the keys
of a long prompt and of later tokens were rotated with slightly different thetas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """A RoPE variant and its parameters (fields unused by a variant keep their defaults).

    ``original_max_position``: the pre-training context (``llama3``, ``yarn``); ``max_position``: the length
    past which ``dynamic`` starts to scale (the checkpoint's ``max_position_embeddings``)."""

    type: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    max_position: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if self.type == "default":
            return
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"rope factor must be a positive number for rope_type {self.type!r}, got {self.factor!r}")
        need = {"llama3": "original_max_position", "yarn": "original_max_position", "dynamic": "max_position"}
        if self.type in need and not getattr(self, need[self.type]):
            raise ValueError(f"rope_type {self.type!r} needs {need[self.type]}")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"llama3 RoPE needs high_freq_factor ({self.high_freq_factor}) > low_freq_factor "
                             f"({self.low_freq_factor})")

    def cos_sin_scale(self) -> float:
        """The factor cos and sin are multiplied by (YaRN's attention factor; 1 otherwise)."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
        return mscale(self.factor)


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """``[head_dim / 2]`` float64 inverse frequencies of the variant (for ``dynamic``: before any scaling)."""
    d = head_dim
    exponent = torch.arange(0, d, 2, dtype=torch.float64) / d
    inv = 1.0 / theta ** exponent
    s = scaling
    if s.type == "linear":
        inv = inv / s.factor
    elif s.type == "llama3":
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    elif s.type == "yarn":
        def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in the context
            return d * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # as transformers: avoid a zero-width ramp
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
        inv = inv / s.factor * (1 - extrapolate) + inv * extrapolate
    return inv


class Rotary:
    """Rotates ``x [..., T, H, D]`` at positions ``pos [..., T]`` (half-split layout, or adjacent pairs when
    `interleaved`, GGUF's layout). Computes in float32 and returns ``x.dtype``."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None, *,
                 interleaved: bool = False, device=None):
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.head_dim, self.theta = head_dim, float(theta)
        self.scaling = scaling or RopeScaling()
        self.interleaved = interleaved
        self.inv_freq = inverse_frequencies(head_dim, self.theta, self.scaling).float().to(device)
        self.scale = self.scaling.cos_sin_scale()
        self._exponent = (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim).to(device)

    def _dynamic_inv_freq(self, pos: torch.Tensor) -> torch.Tensor:
        s, d = self.scaling, self.head_dim
        length = (pos.max() + 1).double().clamp(min=s.max_position)  # a device scalar: no host sync
        theta = self.theta * (s.factor * length / s.max_position - (s.factor - 1)) ** (d / (d - 2))
        return (1.0 / theta ** self._exponent).float()

    def cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [..., T, D/2]`` float32 at positions ``pos [..., T]`` (scaled by YaRN's factor)."""
        inv = self._dynamic_inv_freq(pos) if self.scaling.type == "dynamic" else self.inv_freq
        ang = pos.float()[..., None] * inv
        cos, sin = ang.cos(), ang.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos, sin

    def apply(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin(pos)
        cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
        xf = x.float()
        if self.interleaved:  # adjacent pairs (2i, 2i+1)
            a, b = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        else:  # half split (i, i + D/2)
            h = xf.shape[-1] // 2
            a, b = xf[..., :h], xf[..., h:]
            out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
        return out.to(x.dtype)
