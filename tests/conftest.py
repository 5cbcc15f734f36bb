import os

import pytest
import torch

# Triton kernels run on CUDA where there is a GPU; elsewhere Triton's interpreter runs them on
# CPU tensors (small shapes only). The variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Device of the tensors given to backend="triton" in tests.
TRITON_DEVICE = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
