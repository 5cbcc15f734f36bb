"""ranking_metrics when memory runs out or a worker thread cannot be started.

Each case runs the call in a child process under an address-space limit (``RLIMIT_AS``) set just
above what the child already uses, so that an abort of the interpreter fails the test instead of
ending pytest. The limits are sized from the child's thread stack size, which the parent sets
(``RLIMIT_STACK``, read by glibc when the child starts), and glibc keeps one malloc arena
(``MALLOC_ARENA_MAX=1``: a new thread's arena would reserve 64 MiB of address space or not,
depending on the timing).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sort_fast.metrics import ranking_metrics

resource = pytest.importorskip("resource")  # POSIX only

MIB = 1 << 20
THREAD_STACK = 8 * MIB
# what the sorting path keeps per candidate of the group it sorts (csrc/ranking.cpp, Scratch)
SCRATCH_BYTES_PER_CANDIDATE = 41
SLACK = 12 * MIB  # the interpreter's own allocations during the call

CHILD = r"""
import json, resource, sys
import numpy as np
from sort_fast.metrics import ranking_metrics

data, headroom, num_threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
scores, relevant, offsets = (np.load(f"{data}/{name}.npy")
                             for name in ("scores", "relevant", "offsets"))
with open("/proc/self/status") as f:
    vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm_size + headroom, resource.RLIM_INFINITY))
try:
    result = ranking_metrics(scores, relevant, offsets, num_threads=num_threads)
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
else:
    print(json.dumps({"result": result}))
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux",
                                reason="needs Linux (RLIMIT_AS, /proc)")


def _limit_stack() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    resource.setrlimit(resource.RLIMIT_STACK, (THREAD_STACK, hard))


def run_limited(tmp_path: Path, scores, relevant, offsets, headroom: int, num_threads: int):
    """The child's JSON answer (``{"result": ...}`` or ``{"error": ..., "message": ...}``);
    fails the test if the child dies (an abort: return code -6)."""
    for name, a in (("scores", scores), ("relevant", relevant), ("offsets", offsets)):
        np.save(tmp_path / f"{name}.npy", a)
    # cwd: tmp_path, so that the child imports the installed package, not a copy in the cwd
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(headroom),
                            str(num_threads)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path, preexec_fn=_limit_stack,
                           env={**os.environ, "MALLOC_ARENA_MAX": "1"})
    assert child.returncode == 0, (
        f"the child died with return code {child.returncode} (-6: abort)\n{child.stderr[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def groups(num_groups: int, big: int = 0, seed: int = 0):
    """``num_groups`` groups of 9 float64 scores, and first a group of ``big`` candidates."""
    rng = np.random.default_rng(seed)
    sizes = np.full(num_groups + (big > 0), 9, np.int64)
    if big:
        sizes[0] = big
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    scores = rng.uniform(-1, 1, int(offsets[-1]))
    relevant = rng.random(scores.size) < 0.3
    relevant[offsets[:-1]] = True
    return scores, relevant, offsets


def test_a_thread_that_cannot_be_started_leaves_its_work_to_the_others(tmp_path):
    # Room for one more thread stack but not two: four threads asked for, five blocks of work.
    # It used to abort (std::system_error with a started thread still joinable).
    data = groups(5 * 2048)
    got = run_limited(tmp_path, *data, headroom=THREAD_STACK + 4 * MIB, num_threads=4)
    assert got == {"result": ranking_metrics(*data)}


def test_only_the_thread_that_sorts_a_large_group_allocates_for_it(tmp_path):
    # One group of 2M candidates, then two blocks of small groups; room for its scratch space
    # once. Every thread used to allocate it, whatever it ranked: the second allocation failed
    # in a worker thread and aborted the interpreter.
    big = 2_000_000
    data = groups(2 * 2048, big=big)
    headroom = big * SCRATCH_BYTES_PER_CANDIDATE + 2 * THREAD_STACK + SLACK
    assert headroom < 2 * big * SCRATCH_BYTES_PER_CANDIDATE  # not twice
    got = run_limited(tmp_path, *data, headroom=headroom, num_threads=2)
    assert got == {"result": ranking_metrics(*data)}


@pytest.mark.parametrize("num_threads", [1, 2])
def test_out_of_memory_in_a_worker_thread_raises_memory_error(tmp_path, num_threads):
    # Not even one group's scratch space fits: a MemoryError naming the group size, where a
    # worker thread used to abort the interpreter.
    big = 2_000_000
    data = groups(2 * 2048, big=big)
    headroom = 2 * THREAD_STACK + SLACK
    assert headroom < big * 24  # the sorting buffer alone (24 bytes per candidate) cannot fit
    got = run_limited(tmp_path, *data, headroom=headroom, num_threads=num_threads)
    assert got["error"] == "MemoryError"
    assert f"largest group, {big} candidates" in got["message"]
