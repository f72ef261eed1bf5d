import os
import sys

# Triton reads TRITON_INTERPRET when it is imported, and `import lightning` imports triton:
# set it before any test module loads so the kernel tests run on CPU tensors (set it to 0
# yourself on a GPU machine to test the compiled kernels).
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/_dist.py, also for spawned workers


import pytest  # noqa: E402


@pytest.fixture
def registry():
    """Selector names registered (or overridden) by a test are restored afterwards."""
    from lightning_gaussk.selection.selectors import _SELECTORS

    before = dict(_SELECTORS)
    yield
    _SELECTORS.clear()
    _SELECTORS.update(before)
