"""The head kernel's ``triton.autotune`` tunes once per product, whatever the batch sizes.

The real autotuner object of ``head_gradcam_kernels`` runs the three products of the closed-form
head Grad-CAM over batches of many row counts; only its benchmark is replaced (by a counter that
prefers the first config), since the interpreter cannot time a kernel."""
import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime import interpreter  # noqa: E402

from sort_fast.ops import head_gradcam_kernels as head_kernels  # noqa: E402

HIDDEN, DIM, ANSWERS = 24, 20, 7


def products(rows, gen, dtype=torch.float16):
    """The forward ``(M * W2[c]) W1``, ``dL/dW1 = (M * W2[c])^T U`` (rows along K) and
    ``(U W1^T) * M`` (rows along M) of one batch of ``rows`` rows, with torch's answers."""
    w2 = torch.randn(ANSWERS, HIDDEN, generator=gen).to(dtype)
    w1 = torch.randn(HIDDEN, DIM, generator=gen).to(dtype)
    mask = (torch.rand(rows, HIDDEN, generator=gen) > 0.5).to(dtype)
    upstream = torch.randn(rows, DIM, generator=gen).to(dtype)
    classes = torch.randint(0, ANSWERS, (rows,), generator=gen)
    v = mask.float() * w2.float()[classes]
    return [((w2, classes, mask, w1, None, False, dtype), v @ w1.float()),
            ((w2, classes, mask, upstream, None, True, dtype), v.t() @ upstream.float()),
            ((upstream, None, None, w1.t(), mask, False, torch.float32),
             (upstream.float() @ w1.float().t()) * mask.float())]


def count_tunings(row_counts, monkeypatch):
    tuner = head_kernels._gather_mm_tuned
    benchmarked = []

    def bench(kernel_call, quantiles):
        benchmarked.append(kernel_call)  # nothing is timed
        return [float(len(benchmarked) % len(tuner.configs))] * 3

    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setitem(tuner.__dict__, "do_bench", bench)  # a cached_property: set per object
    gen = torch.Generator().manual_seed(0)
    for rows in row_counts:
        for args, want in products(rows, gen):
            launch, out = head_kernels.gather_mm_launch(*args, tuned=True)
            launch.run()
            torch.testing.assert_close(out.float(), want, rtol=2e-3, atol=2e-3)
    assert len(benchmarked) == len(tuner.cache) * len(tuner.configs)
    return len(tuner.cache)


def test_tunings_do_not_depend_on_the_batch_row_counts(monkeypatch):
    if not isinstance(head_kernels._gather_mm_kernel.fn, interpreter.InterpretedFunction):
        pytest.skip("needs the Triton interpreter (a GPU would really benchmark)")
    one_size = count_tunings([9], monkeypatch)
    many_sizes = count_tunings([9, 5, 13, 17, 30, 9], monkeypatch)
    assert one_size == many_sizes == 3  # one tuning per product


def test_key_names_only_kernel_arguments_that_are_widths():
    """Every key is a kernel argument, and none of them is a row count (``M``, ``K``)."""
    names = head_kernels._gather_mm_tuned.arg_names
    assert set(head_kernels.TUNING_KEY) <= set(names)
    assert not {"M", "K"} & set(head_kernels.TUNING_KEY)
