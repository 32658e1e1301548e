import importlib.util
import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter where no GPU exists. It must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/vllm runs in its own environment with vLLM installed (`make vllm-test`); elsewhere it is not collected.
# A spec without an origin is the namespace package that the folder tests/vllm itself looks like.
_vllm = importlib.util.find_spec("vllm")
collect_ignore_glob = [] if _vllm is not None and _vllm.origin is not None else ["vllm/*"]


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
