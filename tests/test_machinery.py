"""Import hygiene, backend selection, torch.library integration, the CLI and the benchmark harness."""

import csv
import os
import subprocess
import sys

import pytest
import torch
from helpers import KERNEL_BACKENDS

import fastsearch
from fastsearch import _backend


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, check=False)


def test_import_touches_no_cuda_and_no_triton():
    result = _python("import sys, torch, fastsearch\n"
                     "assert 'triton' not in sys.modules, 'triton imported'\n"
                     "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
                     "print('ok')")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_without_extension_says_so_once_and_falls_back():
    result = _python("import fastsearch, torch\n"
                     "import fastsearch.ops\n"
                     "assert not fastsearch.backends()['cpu']\n"
                     "x = torch.randn(2, 3)\n"
                     "prev, x0 = fastsearch.ddim_step(x, x, 0.5, 0.6)\n"
                     "print(prev.shape)", FASTSEARCH_NO_EXT="1")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("compiled kernels unavailable") == 1
    assert "torch.Size([2, 3])" in result.stdout


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTSEARCH_BACKEND", "torch")
    assert _backend.resolve("auto", torch.device("cpu"), "ddim_step") == "torch"
    monkeypatch.setenv("FASTSEARCH_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastsearch.ddim_step(torch.randn(2, 3), torch.randn(2, 3), 0.5, 0.6)
    monkeypatch.delenv("FASTSEARCH_BACKEND")
    expected = "cpu" if _backend.has_cpu() else "torch"
    assert _backend.resolve("auto", torch.device("cpu"), "ddim_step") == expected


def test_backends_report():
    report = fastsearch.backends()
    assert set(report) == {"torch", "cpu", "cuda", "triton"}
    assert report["torch"] is True
    assert report["cpu"] == _backend.has_cpu()


def _op_cases(device):
    x = torch.randn(3, 2, 5, device=device)
    m = torch.randn(3, 2, 5, device=device)
    per_sample = torch.tensor([0.3, 0.5, 0.7], device=device)
    return {
        "ddim_step": [(x, m, per_sample, 0.0, None, 0.8, 1.0, None, 5, 0, 1.0, True),
                      (x, m, None, 0.2, per_sample, 0.0, 0.0, None, None, 2, None, False)],
        "flow_euler_step": [(x, m, per_sample, 0.0, None, 0.1, None, 4, True)],
        "flow_heun_step": [(x, m, m, per_sample, 0.0, None, 0.1)],
        "renoise": [(x, None, 0.2, per_sample, 0.0, 1, m, None)],
        "randn_fill_": [(torch.empty(7, 3, device=device), 9, 3)],
        "zo_neighbors": [(x, 3, 0.9, 2)],
    }


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["ddim_step", "flow_euler_step", "flow_heun_step", "renoise", "randn_fill_",
                                  "zo_neighbors"])
def test_opcheck(device, backend, name):
    """Schemas, fake implementations and (for Triton) the custom-op wrappers pass torch.library.opcheck."""
    op_name = name if backend in ("cpu", "cuda") else (
        name.rstrip("_") + "_triton" + ("_" if name.endswith("_") else ""))
    op = getattr(torch.ops.fastsearch, op_name).default
    for args in _op_cases(device)[name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["ddim_step", "flow_euler_step", "flow_heun_step", "renoise"])
def test_opcheck_out_variants(device, backend, name):
    """The out= variants: the C++ overloads <name>.out (keyword-only outputs, returned) and the Triton ops
    <name>_triton_out (outputs last, nothing returned)."""
    for args in _op_cases(device)[name]:
        count = 2 if name == "ddim_step" else 1
        outs = [torch.empty_like(args[0]) for _ in range(count)]
        if backend in ("cpu", "cuda"):
            op = getattr(torch.ops.fastsearch, name).out
            names = [arg.name for arg in op._schema.arguments if arg.kwarg_only]
            torch.library.opcheck(op, args, dict(zip(names, outs, strict=True)))
        else:
            torch.library.opcheck(getattr(torch.ops.fastsearch, f"{name}_triton_out").default, (*args, *outs))


@pytest.mark.skipif(not _backend.has_cpu(), reason="compiled CPU kernels not built")
def test_torch_compile_fullgraph():
    def step(x, eps, alpha):
        prev, x0 = fastsearch.ddim_step(x, eps, alpha, 0.9, eta=1.0, seed=3)
        return prev * 2 + x0

    x, eps = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    alpha = torch.tensor([0.1, 0.3, 0.5, 0.7])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, eps, alpha), step(x, eps, alpha))


def test_cli_info():
    result = subprocess.run([sys.executable, "-m", "fastsearch", "info"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "backends" in result.stdout and "torch=yes" in result.stdout


def test_bench_harness_writes_csv(tmp_path):
    from fastsearch import bench

    path = tmp_path / "results.csv"
    lines = []
    rows = bench.run(shape=(2, 3, 4), families=["flow_euler_step"], min_run_time=0.01, csv_path=str(path),
                     echo=lines.append)
    impls = {row["impl"] for row in rows}
    assert {"diffusers", "eager"} <= impls
    with open(path) as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and all(float(row["median_us"]) > 0 for row in written)
    assert any("x diffusers" in line for line in lines)


def test_bench_csv_with_older_columns_is_rewritten(tmp_path):
    from fastsearch import bench

    path = tmp_path / "old.csv"
    path.write_text("date,op,median_us\n2026-01-01,ddim_step,5.0\n")
    bench.write_csv(str(path), [dict.fromkeys(bench.CSV_FIELDS, "x")])
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == bench.CSV_FIELDS
    assert rows[0]["op"] == "ddim_step" and rows[0]["median_us"] == "5.0" and rows[0]["device"] == ""
    assert rows[1]["op"] == "x"
