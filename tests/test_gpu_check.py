"""`make gpu-check` without a GPU: its kernel script on every backend that runs here (the CUDA kernels through
the emulation of tests/cuda_emu), and the driver's own steps that need no GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import backends_for

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
import kernel_smoke  # noqa: E402


# triton left out: the same script, a minute under the interpreter, and its kernels are tested on these paths
# in the suite (tests/test_large_groups.py).
@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b in ("cpu", "cuda")])
def test_kernel_smoke_matches_the_reference(backend, capsys):
    status = kernel_smoke.main(["--backend", backend])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count(": ok") == len(list(kernel_smoke.calls("cpu"))), out


def test_kernel_smoke_reports_a_mismatch(monkeypatch, capsys):
    """A kernel that runs but answers wrong fails the script (here: the reference against a shifted copy)."""
    import fastsearch

    everything = kernel_smoke.calls
    monkeypatch.setattr(kernel_smoke, "calls", lambda device: [c for c in everything(device) if c[0] == "randn"])
    real = fastsearch.randn
    monkeypatch.setattr(fastsearch, "randn", lambda *a, backend, **k: real(*a, backend=backend, **k)
                        + (1.0 if backend != "torch" else 0.0))
    assert kernel_smoke.main(["--backend", "cpu"]) == 1
    assert "randn output 0: cpu differs from the reference" in capsys.readouterr().out


def test_gpu_check_without_a_gpu(tmp_path):
    done = subprocess.run([sys.executable, ".ci/gpu_check.py", "--steps", "env,suite,sanitizer,bench",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout[done.stdout.index("gpu-check summary"):]
    assert "env" in summary and "ok" in summary.splitlines()[1]
    for step in ("suite", "sanitizer", "bench"):
        assert any(line.split()[:3] == [step, "not", "run"] for line in summary.splitlines()), summary
