"""The examples in examples/ run (as a user would start them) and do what they say."""
import os
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_own_model_example_learns_the_ranking():
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "own_model_sort.py")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first, last = (float(x) for x in done.stdout.split("contrastive loss ")[1].split()[0:3:2])
    assert last < first  # SOrT's contrastive term falls on the training groups
    assert "'mp1'" in done.stdout


def test_llava_example_tunes_adapters_and_saves_them(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "llava_sort.py"), "--steps",
                           "12", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first, last = (float(x) for x in done.stdout.split("contrastive loss ")[1].split()[0:3:2])
    assert last < first  # SOrT's contrastive term falls on the training groups
    assert "'mp1'" in done.stdout
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "hf_model/config.json", "hf_model/model.safetensors"):
        assert (tmp_path / name).is_file(), name
