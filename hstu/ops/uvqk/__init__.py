"""LayerNorm(x) -> UVQK projection (+bias) -> SiLU, the HSTU layer's input side, as one op (issue 22)."""

from hstu.ops.uvqk.op import uvqk_projection
from hstu.ops.uvqk.reference import split_uvqk, uvqk_projection_reference

__all__ = ["split_uvqk", "uvqk_projection", "uvqk_projection_reference"]
