"""Helpers for checking kernels against references (used by tests and benchmarks)."""

from hstu.testing.parity import ParityError, assert_parity, attention_parity

__all__ = ["ParityError", "assert_parity", "attention_parity"]
