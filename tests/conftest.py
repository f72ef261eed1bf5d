import os
import sys

# Triton reads TRITON_INTERPRET when it is imported, and `import lightning` imports triton:
# set it before any test module loads so the kernel tests run on CPU tensors (set it to 0
# yourself on a GPU machine to test the compiled kernels).
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/_dist.py, also for spawned workers
