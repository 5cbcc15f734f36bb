"""Offsets that meet a row stride are int64 in every kernel, so ``rows * width`` may pass 2^31
(T * D >= 2^31 elements is reached at T ~ 430k rows of the Pythia width 5000).

A buffer that big cannot be allocated for a test, so the test watches the generated address
arithmetic instead: under the Triton interpreter every ``pointer + offset`` of a kernel is an
``addptr`` call; the first one applied to a row-strided buffer's base pointer must add int64
offsets (an int32 ``row * stride`` has already wrapped around by then)."""
import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime import interpreter  # noqa: E402

from sort_fast.ops import contrastive_loss_kernels as loss_kernels  # noqa: E402
from sort_fast.ops import head_gradcam_kernels as head_kernels  # noqa: E402


@pytest.fixture
def base_offsets(monkeypatch):
    """``{base address: set of numpy dtypes of the offsets added to it}``: the offsets of the
    first ``addptr`` on each kernel argument's pointer (not on pointers an ``addptr`` made)."""
    if not isinstance(loss_kernels._gradcam_cosine_bwd_kernel.fn, interpreter.InterpretedFunction):
        pytest.skip("needs the Triton interpreter")
    builder = interpreter.interpreter_builder
    seen, derived = {}, []  # derived: pointer handles made by addptr (kept alive: ids stay unique)

    def made_by_addptr(handle):
        return any(handle is d for d in derived)

    def create_addptr(ptr, offset):
        addresses = np.unique(ptr.data)
        if addresses.size == 1 and not made_by_addptr(ptr):
            seen.setdefault(int(addresses[0]), set()).add(offset.data.dtype)
        out = original["create_addptr"](ptr, offset)
        derived.append(out)
        return out

    def passing_on(name, position):
        """A builder method whose ``position``-th argument is the tensor it reshapes."""
        def reshape(*args):
            out = original[name](*args)
            if made_by_addptr(args[position]):
                derived.append(out)
            return out
        return reshape

    reshapes = {"create_broadcast": 0, "create_expand_dims": 0, "create_splat": 1}
    original = {name: getattr(builder, name) for name in ("create_addptr", *reshapes)}
    monkeypatch.setattr(builder, "create_addptr", create_addptr)
    for name, position in reshapes.items():
        monkeypatch.setattr(builder, name, passing_on(name, position))
    return seen


def assert_int64_offsets(seen, buffers):
    for name, t in buffers.items():
        kinds = seen.get(t.data_ptr())
        assert kinds, f"{name} was never addressed from its base pointer"
        assert kinds == {np.dtype(np.int64)}, f"{name}: offsets {kinds}"


def test_head_products_index_rows_with_int64(base_offsets):
    """The three products of the closed-form head Grad-CAM: ``(M * W2[c]) W1``,
    ``(M * W2[c])^T U`` (rows along K) and ``(U W1^T) * M``, against torch."""
    gen = torch.Generator().manual_seed(0)
    rows, hidden, dim, answers = 21, 24, 20, 7
    dtype = torch.float16
    w2 = torch.randn(answers, hidden, generator=gen).to(dtype)
    w1 = torch.randn(hidden, dim, generator=gen).to(dtype)
    mask = (torch.rand(rows, hidden, generator=gen) > 0.5).to(dtype)
    upstream = torch.randn(rows, dim, generator=gen).to(dtype)
    classes = torch.randint(0, answers, (rows,), generator=gen)
    products = (
        ((w2, classes, mask, w1, None, False, torch.float32),
         (mask.float() * w2.float()[classes]) @ w1.float()),
        ((w2, classes, mask, upstream, None, True, torch.float32),
         (mask.float() * w2.float()[classes]).t() @ upstream.float()),
        ((upstream, None, None, w1.t(), mask, False, torch.float32),
         (upstream.float() @ w1.float().t()) * mask.float()),
    )
    for args, want in products:
        base_offsets.clear()
        launch, out = head_kernels.gather_mm_launch(*args, tuned=False)
        launch.run()
        torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
        a, _, amask, b, scale = args[:5]
        buffers = dict(a=a, b=b, out=out)
        buffers.update({k: v for k, v in (("amask", amask), ("scale", scale)) if v is not None})
        assert_int64_offsets(base_offsets, buffers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_kernels_index_rows_with_int64(base_offsets, dtype):
    gen = torch.Generator().manual_seed(1)
    offsets, num_sub = torch.tensor([0, 5, 9, 16]), torch.tensor([2, 1, 3])
    grad = torch.randn(16, 300, generator=gen, dtype=dtype)  # two column chunks
    act = torch.randn(16, 300, generator=gen, dtype=dtype)
    launches, (cos, norm, weight, _) = loss_kernels.forward_launches(
        grad, act, offsets, num_sub, 0.1, 1e-8, True)
    for launch in launches:
        launch.run()
    dot, sq, exps = (launches[0].args[k] for k in ("dot_ptr", "sq_ptr", "exp_ptr"))
    (launch,), (dgrad, dact) = loss_kernels.backward_launches(grad, act, offsets, cos, norm,
                                                              weight, None, 1e-8)
    launch.run()
    assert torch.isfinite(dgrad).all() and dgrad.abs().sum() > 0
    assert_int64_offsets(base_offsets, dict(grad=grad, act=act, dot=dot, sq=sq, exps=exps,
                                            dgrad=dgrad, dact=dact))
