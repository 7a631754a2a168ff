from hstu.ops.hstu_attention.op import check_attention_indices, hstu_attention
from hstu.ops.hstu_attention.rab_tables import RelativeBiasTables
from hstu.ops.hstu_attention.reference import attention_mask, hstu_attention_reference

__all__ = ["RelativeBiasTables", "attention_mask", "check_attention_indices", "hstu_attention", "hstu_attention_reference"]
