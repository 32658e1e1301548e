import importlib.util
import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter where no GPU exists. It must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/vllm and tests/ray run in their own environments, with vLLM (`make vllm-test`) or Ray (`make ray-test`)
# installed; elsewhere they are not collected. A spec without an origin is the namespace package that the folder
# tests/vllm (tests/ray) itself looks like.


def _installed(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None


# The CUDA kernels run here too: compiled for the host against an emulation of the CUDA execution model
# (tests/cuda_emu), they take the "cuda" backend's place on CPU tensors (helpers.backends_for). Built on first
# use (about half a minute), cached under build/cuda_emu. FASTSEARCH_CUDA_EMU=0 leaves them out.
if os.environ.get("FASTSEARCH_CUDA_EMU", "1") != "0":
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emu"))
    import emulation

    emulation.load()

collect_ignore_glob = [f"{name}/*" for name in ("vllm", "ray") if not _installed(name)]


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
