"""`make gpu-check`: everything a machine with a CUDA GPU can verify, in one call, with one summary.

On a machine with nothing but the checkout and a Python that has torch (a CUDA build, or a CPU build that
pip can replace: TORCH_SPEC, default "torch"):

1. env        versions of Python, torch, CUDA, Triton; the GPU. A CPU-only torch is replaced first.
2. build      pip install --no-build-isolation --no-deps -e . (the CUDA kernels too, for the GPU's arch).
3. suite      the whole test suite: the cuda and triton backends run compiled on the GPU (the CUDA emulation
              of tests/cuda_emu, which make test runs, is left out).
4. sanitizer  compute-sanitizer memcheck, racecheck and synccheck over .ci/kernel_smoke.py --backend cuda
              (every CUDA kernel once, large-group paths included, each result checked against the reference).
5. triton     the same script on the compiled Triton kernels.
6. bench      fastsearch bench --device cuda into benchmarks/results/<device>.csv (commit that file).

Each step's output goes to <out>/<step>.log; the summary lists each step's status and time. Exit status 0 only
when every step that ran passed. ``--steps`` picks steps (e.g. ``--steps env,build`` to exercise the script on a
machine without a GPU, where the GPU steps are reported as not run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("env", "build", "suite", "sanitizer", "triton", "bench")
GPU_STEPS = {"suite", "sanitizer", "triton", "bench"}  # pointless without a GPU (the suite runs in make test)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _torch_facts() -> dict[str, str]:
    code = ("import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': str(torch.version.cuda), "
            "'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else ''}))")
    done = subprocess.run(_python("-c", code), capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"torch": "", "cuda": "None", "gpu": "", "error": done.stderr[-500:]}
    import json
    return json.loads(done.stdout)


def _run(step: str, command: list[str], out: Path, timeout: float, env: dict | None = None) -> tuple[bool, str]:
    log = out / f"{step}.log"
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        sink.flush()
        try:
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:.0f} s"
        except FileNotFoundError as error:
            return False, str(error)
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    return done.returncode == 0, tail[0][-150:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check-output", help="logs go here")
    parser.add_argument("--torch-spec", default=os.environ.get("TORCH_SPEC", "torch"))
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[tuple[str, str, float, str]] = []
    facts = _torch_facts()

    def record(step, ok, seconds, detail):
        results.append((step, "ok" if ok else "FAILED", seconds, detail))

    has_gpu = bool(facts.get("gpu"))
    for step in steps:
        began = time.perf_counter()
        if step == "env":
            if facts.get("cuda") in ("None", "") and shutil.which("nvidia-smi"):
                # a GPU but a CPU-only torch: replace it (needs the package index)
                ok, detail = _run(step, _python("-m", "pip", "install", "--upgrade", args.torch_spec), args.out, 900)
                facts = _torch_facts()
                has_gpu = bool(facts.get("gpu"))
            triton = subprocess.run(_python("-c", "import triton; print(triton.__version__)"), capture_output=True,
                                    text=True).stdout.strip() or "absent"
            detail = (f"python {sys.version.split()[0]}, torch {facts.get('torch')}, CUDA {facts.get('cuda')}, "
                      f"triton {triton}, GPU: {facts.get('gpu') or 'none'}")
            (args.out / "env.log").write_text(detail + "\n")
            record(step, bool(facts.get("torch")), time.perf_counter() - began, detail)
            continue
        if step in GPU_STEPS and not has_gpu:
            results.append((step, "not run", 0.0, "no CUDA GPU visible to torch"))
            continue
        if step == "build":
            ok, detail = _run(step, _python("-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."),
                              args.out, 900)
        elif step == "suite":
            # The CUDA emulation (tests/cuda_emu) is for machines without a GPU: here the real kernels run.
            ok, detail = _run(step, _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"), args.out, 1800,
                              env={"FASTSEARCH_CUDA_EMU": "0"})
        elif step == "sanitizer":
            sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
            ok, details = True, []
            for tool in ("memcheck", "racecheck", "synccheck"):
                tool_ok, tool_detail = _run(step, [sanitizer, "--tool", tool, "--error-exitcode", "3",
                                                   *_python(".ci/kernel_smoke.py", "--backend", "cuda")],
                                            args.out, 600)
                ok &= tool_ok
                details.append(f"{tool} {'ok' if tool_ok else 'FAILED: ' + tool_detail}")
            detail = "; ".join(details)
        elif step == "triton":
            ok, detail = _run(step, _python(".ci/kernel_smoke.py", "--backend", "triton"), args.out, 600)
        else:  # bench
            ok, detail = _run(step, _python("-m", "fastsearch", "bench", "--device", "cuda", "--dtype",
                                            "float32,float16,bfloat16", "--csv", "auto"), args.out, 900)
        record(step, ok, time.perf_counter() - began, detail)

    width = max(len(step) for step, *_ in results)
    print(f"\ngpu-check summary (logs in {args.out})")
    for step, status, seconds, detail in results:
        print(f"  {step:{width}s}  {status:8s} {seconds:7.1f} s  {detail}")
    return 0 if all(status != "FAILED" for _, status, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
