"""Kernel scalar parameters as a GPU passes them.

On a GPU, Triton's launcher passes a float kernel argument as a parameter of the type its JIT
gives it: the parameter's annotation (``x: tl.float64``), else fp32, so an unannotated Python
float is rounded to float32. The interpreter passes the Python float through unrounded, so a
CPU run cannot see that rounding. The ``gpu_scalar_params`` fixture makes the interpreter pass
every float argument as a scalar of the JIT's type (the float64 kernel tests of
``test_contrastive_loss.py`` run under it)."""
import inspect

import numpy as np
import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.jit import KernelParam, mangle_type  # noqa: E402

_SCALAR_TYPES = {"fp32": (np.float32, tl.float32), "fp64": (np.float64, tl.float64)}


def gpu_scalar_type(param: inspect.Parameter, value: float) -> str:
    """The type Triton's JIT gives a float argument on a GPU: its annotation, else ``fp32``."""
    return KernelParam(0, param, False, False).annotation_type or mangle_type(value)


def _as_gpu_scalar(param: inspect.Parameter, value):
    if not isinstance(value, float) or "constexpr" in KernelParam(0, param, False,
                                                                  False).annotation:
        return value
    np_type, tl_type = _SCALAR_TYPES[gpu_scalar_type(param, value)]
    return tl.tensor(interpreter.TensorHandle(np.array([value], dtype=np_type), tl_type), tl_type)


@pytest.fixture
def gpu_scalar_params(monkeypatch):
    """Float kernel arguments reach interpreted kernels as the scalars a GPU would get."""
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        args = [_as_gpu_scalar(p, a) for p, a in zip(params.values(), args)]
        kwargs = {k: _as_gpu_scalar(params[k], v) if k in params else v
                  for k, v in kwargs.items()}
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)


@triton.jit
def _store_scalars(out_ptr, plain, wide: tl.float64):
    tl.store(out_ptr, plain + tl.zeros([], tl.float64))
    tl.store(out_ptr + 1, wide + tl.zeros([], tl.float64))


def test_fixture_rounds_unannotated_floats_like_a_gpu(gpu_scalar_params):
    torch = pytest.importorskip("torch")
    if not isinstance(_store_scalars, interpreter.InterpretedFunction):
        pytest.skip("needs the Triton interpreter")
    out = torch.zeros(2, dtype=torch.float64)
    _store_scalars[(1,)](out, 0.3, 0.3)
    assert out[0].item() == float(np.float32(0.3)) != 0.3  # an fp32 parameter
    assert out[1].item() == 0.3  # annotated tl.float64: exact


def test_without_the_fixture_the_interpreter_passes_doubles():
    torch = pytest.importorskip("torch")
    if not isinstance(_store_scalars, interpreter.InterpretedFunction):
        pytest.skip("needs the Triton interpreter")
    out = torch.zeros(2, dtype=torch.float64)
    _store_scalars[(1,)](out, 0.3, 0.3)
    assert out.tolist() == [0.3, 0.3]  # why the fixture is needed
