"""The CUDA emulation of tests/cuda_emu (the test tool that runs csrc/cuda on the host): that it reports each
defect it claims to catch, that its source rewriting is right, and that the real kernels give the same
results under every scheduling order it can take."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastsearch
from fastsearch import _backend

pytestmark = pytest.mark.skipif(_backend._cuda_emulation is None,
                                reason="FASTSEARCH_CUDA_EMU=0: the CUDA emulation is not loaded")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cuda_emu"))
import emulation  # noqa: E402  (tests/cuda_emu; importing it loads nothing)


def run(name: str, threads: int = 64) -> torch.Tensor:
    return torch.ops.fs_emu_defects.run(name, torch.arange(threads, dtype=torch.float32))


# -- planted defects: each is reported (a launch error naming the source line) or shows in the result ----------

@pytest.mark.parametrize(("name", "threads", "message"), [
    ("early_exit", 40,
     r"__syncthreads at defects.cu:\d+ reached by 40 of 64 threads: .* thread \(40, 0, 0\) had exited"),
    ("divergent_barrier", 64, r"divergent __syncthreads: .* at defects.cu:\d+, .* at defects.cu:\d+"),
    ("shuffle_outside_mask", 64, r"__shfl_sync at defects.cu:\d+ .* reads lane 20, which is not in the mask"),
    ("divergent_shuffle", 64, r"__shfl_xor_sync at defects.cu:\d+ .* mask names lane 16, which has exited"),
    ("divergent_shuffle", 24, r"__shfl_xor_sync at defects.cu:\d+ .* mask names lane (16|24)"),
    ("mismatched_masks", 64, r"warp collectives disagree: .*__shfl_down_sync \(defects.cu:\d+, mask 4294967295\)"),
    ("wrong_block_size", 32, r"cub::BlockReduce for 64 threads used by a block of 32 at defects.cu:\d+"),
    ("caller_outside_mask", 64, r"mask of __shfl_sync leaves out the calling lane \d+ at defects.cu:\d+"),
    ("shuffle_against_barrier", 32,
     r"deadlock: .* waits at __shfl_sync \(defects.cu:\d+\) while .* waits at __syncthreads \(defects.cu:\d+\)"),
    ("too_many_threads", 64, r"invalid launch configuration: grid \(1, 1, 1\), block \(2048, 1, 1\)"),
    ("dynamic_shared_memory", 64, r"the CUDA emulation has no dynamic shared memory"),
])
def test_defect_is_reported(name, threads, message):
    with pytest.raises(RuntimeError, match=message):
        run(name, threads)
    # the error was consumed: the next launch is unaffected
    assert torch.equal(run("warp_sum")[:2], torch.tensor([496.0, 496.0]))


def test_correct_twins_are_right():
    values = torch.arange(64, dtype=torch.float32)
    assert torch.equal(run("early_exit"), torch.roll(values, -1))
    warp_sums = values.view(2, 32).sum(1).repeat_interleave(32)
    assert torch.equal(run("warp_sum"), warp_sums)
    assert run("temp_storage_reuse")[:2].tolist() == [2016.0, 126.0]
    assert torch.equal(run("reverse"), values.flip(0))
    assert run("wrong_block_size")[0].item() == 2016.0


@pytest.mark.parametrize("order", ["shuffle", "reverse"])
def test_ordering_defects_show_in_results(monkeypatch, order):
    """Defects that only a wrong result can show: a TempStorage reused without a barrier, a read of another
    thread's write with no barrier between, a shared variable never set, BlockReduce's result read outside
    thread 0. Under any order but the one that happens to hide them (forward, for the first two)."""
    monkeypatch.setenv("FASTSEARCH_CUDA_EMU_ORDER", order)
    values = torch.arange(64, dtype=torch.float32)
    assert run("temp_storage_reuse_without_barrier")[0].item() != 2016.0
    assert not torch.equal(run("reverse_without_barrier"), values.flip(0))
    assert run("uninitialised_shared")[0].isnan()
    everywhere = run("reduce_result_everywhere")
    assert everywhere[0].item() == 2016.0 and not (everywhere[1:] == 2016.0).any()


def test_order_variable_is_checked(monkeypatch):
    monkeypatch.setenv("FASTSEARCH_CUDA_EMU_ORDER", "forward")
    assert torch.equal(run("reverse"), torch.arange(64, dtype=torch.float32).flip(0))


# -- source rewriting ---------------------------------------------------------------------------------------------

def test_launches_are_rewritten():
    text = ("  step_kernel<Op, T, kMode><<<blocks_for(n, 4), kThreads, 0, stream>>>(\n      op, arrays, n);\n"
            "  ess_kernel<T>\n      <<<grid, 256, 0, stream>>>(weights, layout, ess(3));\n"
            "  empty<<<1, 32>>>();\n")
    out = emulation.rewrite_launches(text)
    assert "<<<" not in out and ">>>" not in out
    flat = "".join(out.split())
    assert ("::fs_emu::launch(::fs_emu::config(blocks_for(n,4),kThreads,0,stream),step_kernel<Op,T,kMode>,"
            "op,arrays,n);") in flat
    assert "::fs_emu::launch(::fs_emu::config(grid,256,0,stream),ess_kernel<T>,weights,layout,ess(3));" in flat
    assert "::fs_emu::launch(::fs_emu::config(1,32),empty);" in flat
    assert out.count("\n") == text.count("\n")  # later lines keep their numbers


def test_shared_declarations_are_rewritten():
    text = ("  __shared__ typename Reduce::TempStorage temp;\n"
            "  __shared__ float pair[2][3];\n"
            "  __shared__ union {\n    float a;\n    int b[4];\n  } scratch;  // a comment: __shared__\n")
    out = emulation.rewrite(text, 7)
    assert "auto& temp = ::fs_emu::shared_var<typename Reduce::TempStorage, 7002>();" in out
    assert "auto& pair = ::fs_emu::shared_var<float[2][3], 7003>();" in out
    assert "union FsEmuShared7001 {" in out and "auto& scratch = ::fs_emu::shared_var<FsEmuShared7001, 7001>();" in out
    assert "__shared__" not in out
    assert out.count("\n") == text.count("\n")


def test_unknown_shared_form_is_refused():
    with pytest.raises(emulation.RewriteError, match="line 2"):
        emulation.rewrite("int a;\n__shared__ float x = 0;\n", 1)
    with pytest.raises(emulation.RewriteError, match="unbalanced"):
        emulation.rewrite_launches("k<<<1, 2>>>(a, (b);")


# -- the real kernels do not depend on the order threads and blocks run in --------------------------------------

def _results() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 700, generator=g)
    offsets = torch.tensor([0, 3, 3, 2500, 2600, 5000])
    flat = torch.randn(5000, generator=g)
    keys = torch.randint(0, 9, (5000,), generator=g)
    hidden = torch.randn(40, 24, generator=g)
    out = [*fastsearch.segmented_topk(scores, 9, backend="cuda"),
           *fastsearch.segmented_topk(flat, 4, offsets=offsets, backend="cuda"),
           *fastsearch.beam_prune(flat, 4, offsets=offsets, dedup_keys=keys % 5, refill_to=3, backend="cuda"),
           fastsearch.resample(flat, 33, offsets=torch.tensor([0, 3, 2500, 2600, 5000]), method="residual", seed=4,
                               backend="cuda"),
           fastsearch.effective_sample_size(flat, offsets=offsets, backend="cuda"),
           fastsearch.vote(keys, flat, offsets=offsets, method="weighted", backend="cuda"),
           fastsearch.vote(keys, offsets=offsets, backend="cuda"),
           fastsearch.randn((3, 1001), seed=5, backend="cuda"),
           fastsearch.zo_neighbors(torch.randn(2, 300, generator=g), 3, cos_sim=0.9, seed=1, backend="cuda"),
           *fastsearch.prm_scores(hidden, torch.arange(0, 40, 2), torch.randn(2, 24, generator=g),
                                  offsets=torch.tensor([0, 4, 4, 11, 20]), method="min", empty=-1.0,
                                  backend="cuda")]
    return out


def test_kernels_agree_under_every_order(monkeypatch):
    monkeypatch.setenv("FASTSEARCH_CUDA_EMU_ORDER", "forward")
    expected = _results()
    for order, seed in (("reverse", "0"), ("shuffle", "1"), ("shuffle", "2")):
        monkeypatch.setenv("FASTSEARCH_CUDA_EMU_ORDER", order)
        monkeypatch.setenv("FASTSEARCH_CUDA_EMU_SEED", seed)
        for got, want in zip(_results(), expected, strict=True):
            assert torch.equal(got, want), (order, seed)


def test_emulation_is_the_cuda_backend_on_cpu_tensors():
    assert _backend.resolve("cuda", torch.device("cpu"), "segmented_topk") == "cuda_emulated"
    assert os.path.exists(emulation.BUILD)


def test_scoring_kernels_on_an_h100s_grid():
    """The scoring kernels size their grids by the SM count (cached once per process): the suite runs them with
    the emulation's 3 SMs; here a fresh process gives them an H100's 132, so that most teams find no work."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_score.py", "-k", "cpu-cuda"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "FASTSEARCH_CUDA_EMU_SMS": "132"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


# -- AddressSanitizer: the CUDA kernels never read or write past a tensor ----------------------------------------

def _asan_run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **emulation.asan_environment()})


@pytest.mark.parametrize(("kernel", "report"), [("read_past_end", "READ of size 4"),
                                                 ("shared_past_end", "WRITE of size 4")])
def test_out_of_bounds_access_is_reported_under_asan(kernel, report):
    """The planted reads and writes one past a tensor or a shared array: AddressSanitizer names the access and
    the kernel (the first run builds build/cuda_emu_asan, which the others reuse)."""
    code = ("import sys; sys.path.insert(0, 'tests/cuda_emu'); import emulation, torch; emulation.load(); "
            "x = torch.arange(64.0); print(torch.ops.fs_emu_defects.run('warp_sum', x)[0].item()); "
            f"torch.ops.fs_emu_defects.run('{kernel}', x)")
    done = _asan_run("-c", code, timeout=900)
    assert done.stdout.startswith("496.0"), done.stdout + done.stderr[-3000:]  # a correct kernel runs clean
    assert done.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
    assert report in done.stderr and kernel in done.stderr, done.stderr[-3000:]


def test_cuda_cases_run_clean_under_asan():
    """Every cuda-backend case of the suite (1200, hostile offsets and large groups included) under
    AddressSanitizer: an access past any tensor aborts the run."""
    done = _asan_run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-k", "cpu-cuda", timeout=1800)
    tail = done.stdout[-3000:] + done.stderr[-5000:]
    assert done.returncode == 0, tail
    assert "AddressSanitizer" not in done.stderr, tail
    assert " passed" in done.stdout and " failed" not in done.stdout, tail
