"""FP8 formats and per-tensor scaling (Perez et al. 2023; TransformerEngine's recipe).

    scale  s = 2^(floor(log2(fp8_max / amax)) - margin)
    quantize:   q = cast_fp8(clamp(x * s))        dequantize: q / s
E4M3 (max 448) for weights and activations, E5M2 (max 57344) for gradients. On any device the
cast to torch.float8_e4m3fn / float8_e5m2 is the exact FP8 rounding, so this simulates FP8 exactly.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Format:
    name: str
    dtype: torch.dtype
    max: float


FORMATS = {
    "e4m3": Format("e4m3", torch.float8_e4m3fn, torch.finfo(torch.float8_e4m3fn).max),
    "e5m2": Format("e5m2", torch.float8_e5m2, torch.finfo(torch.float8_e5m2).max),
}
MAX_MARGIN = 16  # a margin beyond this throws away more range than any format has to spare


def get_format(name) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown FP8 format {name!r}: valid are {sorted(FORMATS)}")
    return FORMATS[name]


def scale_from_amax(amax: torch.Tensor, fmt: Format, margin: int = 0) -> torch.Tensor:
    """The power of two that maps amax (> 0, finite) to at most fmt.max, less `margin` bits."""
    return torch.exp2(torch.floor(torch.log2(fmt.max / amax.float())) - margin)


def to_fp8(x: torch.Tensor, scale: torch.Tensor | float, fmt: Format) -> torch.Tensor:
    """cast_fp8(clamp(x * scale)): the FP8 tensor itself. Values beyond fmt.max / scale saturate
    (as TransformerEngine's casts do) instead of turning into NaN."""
    return (x.float() * scale).clamp(-fmt.max, fmt.max).to(fmt.dtype)


def quantize(x: torch.Tensor, scale: torch.Tensor | float, fmt: Format) -> torch.Tensor:
    """x rounded to `fmt` at `scale` and scaled back, in x's dtype: cast(clamp(x s)) / s."""
    return (to_fp8(x, scale, fmt).float() / scale).to(x.dtype)
