import os

import pytest
import torch

# Triton kernels are exercised on the CPU through Triton's interpreter (small shapes only).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
