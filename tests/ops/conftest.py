import pytest


@pytest.fixture
def attention_cuda_env(monkeypatch):
    """What the CUDA attention test files (test_hstu_attention_cuda_*.py, through their pytestmark) run under: every
    output buffer NaN-poisoned before the kernels write it (HSTU_POISON_OUTPUTS=1), and the kernels' own choice."""
    from hstu.ops.hstu_attention import cuda

    monkeypatch.setenv("HSTU_POISON_OUTPUTS", "1")
    # The kernels' own choice (the default KernelVariant), even if the caller's environment sets a user override.
    with cuda.kernel_variant(cuda.KernelVariant()):
        yield
