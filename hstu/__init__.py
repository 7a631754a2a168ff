"""hstu: fast training stack for HSTU generative recommenders (fused CUDA kernels, TorchRec + Megatron-core)."""

__version__ = "0.1.0"
