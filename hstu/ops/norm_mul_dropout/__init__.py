"""LayerNorm(x) * u * dropout, the HSTU layer's output-side pointwise step, as one op (issue 22)."""

from hstu.ops.norm_mul_dropout.op import layer_norm_mul_dropout
from hstu.ops.norm_mul_dropout.reference import layer_norm_mul_dropout_reference

__all__ = ["layer_norm_mul_dropout", "layer_norm_mul_dropout_reference"]
