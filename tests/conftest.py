"""Process-wide test setup, loaded before any test module.

Without a CUDA GPU the kernel tests run the Triton code in Triton's interpreter. TRITON_INTERPRET must
be set before anything imports `triton` (sentence-transformers does, indirectly): Triton's language
helpers are bound to compiled or interpreted mode at import time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
