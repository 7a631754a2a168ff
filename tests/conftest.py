import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# HSTU_HYPOTHESIS_PROFILE=ci (set by .ci/run): every property test draws the same examples on every run, so CI is
# reproducible; local runs keep hypothesis's random exploration.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
_hypothesis_settings.load_profile(os.environ.get("HSTU_HYPOTHESIS_PROFILE", "default"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
