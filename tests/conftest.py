"""Test setup: kernels run through Triton's interpreter on the CPU, and any fallback to torch raises.

Both variables must be set before triton is imported, so they are set here, at collection time.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RNN_TRITON_STRICT", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# On a GPU, compare float32 at full precision: no TF32 in cuDNN (the reference) or in our kernels,
# which follow the same flag.
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def seed(request):
    """A fresh seed per test run, printed in the test's name on failure so a failure can be replayed
    with RNN_TRITON_SEED=<seed>."""
    value = int(os.environ.get("RNN_TRITON_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(value)
    return value


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` first: with one worker per core (pytest-xdist), a long test collected last
    would run alone at the end while the other core idles."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
