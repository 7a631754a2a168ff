"""Cached (incremental) HSTU attention: new rows attend to cached keys/values plus themselves (M-FALCON scoring,
appends to a user's history). See ``op.py`` for the dispatcher and ``reference.py`` for the math and masks."""

from hstu.ops.cached_attention.op import cached_hstu_attention
from hstu.ops.cached_attention.reference import cached_attention_mask, cached_attention_reference, gather_pages

__all__ = ["cached_attention_mask", "cached_attention_reference", "cached_hstu_attention", "gather_pages"]
