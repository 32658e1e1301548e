"""Compile every Triton kernel of fastsearch for an H100 (sm_90) on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``, how the suite runs the Triton backend on CPU) runs kernels as NumPy:
it forgives what the compiler refuses (unsupported casts, shapes over the compile limits), rounds exactly where
the GPU uses approximate instructions, and knows nothing of registers. This script closes that gap without a
GPU:

1. Launches are recorded, not run: the public ops are called with ``backend="triton"`` on CPU tensors that
   report ``is_cuda`` (so every launcher picks the block sizes and warp counts it would pick on a GPU), and
   ``JITFunction.run`` is replaced by a recorder of the kernel, its arguments and its launch options.
2. Each distinct launch (kernel, argument types, constexpr values, options) is compiled with
   ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``; ptxas (Triton's own) reports registers and spills.
3. The report lists per kernel: compile errors, spill bytes, and the approximate instructions (``.approx``)
   in its PTX.

Run: ``python tests/sm90_compile.py --json report.json`` (TRITON_INTERPRET must be unset: the kernels must be
JIT functions, not interpreted ones). ``tests/test_triton_sm90.py`` runs it and states the budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sm90_compile.py: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastsearch  # noqa: E402
from fastsearch.kernels import noise as _noise_kernels  # noqa: E402, F401 - imported before the env change below
from fastsearch.kernels import score as _score_kernels  # noqa: E402, F401
from fastsearch.kernels import select as _select_kernels  # noqa: E402, F401
from fastsearch.kernels import select_large as _select_large_kernels  # noqa: E402, F401
from fastsearch.kernels import steps as _steps_kernels  # noqa: E402, F401

TARGET = GPUTarget("cuda", 90, 32)
KERNEL_MODULES = ("noise", "score", "select", "select_large", "steps")
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


@dataclass
class Launch:
    """One distinct launch: which kernel, its argument types, its constexprs and its compile options."""

    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, object]
    case: str
    fn: JITFunction = field(repr=False, compare=False, default=None)

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, self.constexprs, self.options], sort_keys=True, default=str)


@dataclass
class Compiled:
    kernel: str
    case: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, object]
    error: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    approx: list[str] = field(default_factory=list)


def kernel_name(fn: JITFunction) -> str:
    return f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument {value!r}")


class Recorder:
    """Stands in for JITFunction.run: records each launch, runs nothing."""

    def __init__(self):
        self.launches: dict[str, Launch] = {}
        self.case = ""

    def run(self, fn: JITFunction, *args, grid, warmup=False, **kwargs):
        names = fn.arg_names
        bound = dict(zip(names, args, strict=False))
        options = {name: kwargs.pop(name) for name in _LAUNCH_OPTIONS if name in kwargs}
        bound.update({name: value for name, value in kwargs.items() if name in names})
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"{kernel_name(fn)} launched with unknown arguments {unknown}")
        signature, constexprs = {}, {}
        for param in fn.params:
            name = param.name
            if name not in bound:
                if not param.has_default:
                    raise TypeError(f"{kernel_name(fn)} launched without {name}")
                bound[name] = param.default
            value = bound[name]
            if param.is_constexpr or value is None:
                signature[name] = "constexpr"
                constexprs[name] = value
            elif param.annotation_type and not isinstance(value, torch.Tensor):
                signature[name] = param.annotation_type  # e.g. seed: tl.int64
            else:
                signature[name] = _arg_type(value)
        launch = Launch(kernel_name(fn), signature, constexprs, options, self.case, fn)
        self.launches.setdefault(launch.key(), launch)


def _fake_gpu() -> Callable[[], None]:
    """CPU tensors report is_cuda (the launchers then plan for a GPU); returns the undo."""
    saved_is_cuda = torch.Tensor.__dict__.get("is_cuda")
    saved_properties = torch.cuda.get_device_properties
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=132)

    def undo():
        if saved_is_cuda is None:
            del torch.Tensor.is_cuda
        else:
            torch.Tensor.is_cuda = saved_is_cuda
        torch.cuda.get_device_properties = saved_properties
    return undo


def _ragged(sizes) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def cases() -> dict[str, Callable[[], object]]:
    """Calls that reach every kernel with the specialisations the suite uses (dtypes, layouts, flags)."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, Callable[[], object]] = {}
    t = dict(backend="triton")
    sizes = [5, 0, 130, 17]
    offsets = _ragged(sizes)
    total = int(offsets[-1])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(4, 3, 8, 8, generator=g).to(dtype)
        v = torch.randn(4, 3, 8, 8, generator=g).to(dtype)
        levels = torch.rand(4, generator=g) * 0.8 + 0.1
        name = str(dtype).rsplit(".", 1)[-1]
        out[f"ddim_step {name} seed"] = lambda x=x, v=v: fastsearch.ddim_step(x, v, 0.5, 0.6, eta=1.0, seed=3, **t)
        out[f"ddim_step {name} tensors clip"] = lambda x=x, v=v, levels=levels: fastsearch.ddim_step(
            x, v, levels, levels * 0.9 + 0.05, eta=0.0, clip_sample_range=1.0, **t)
        out[f"ddim_step {name} noise"] = lambda x=x, v=v: fastsearch.ddim_step(
            x, v, 0.5, 0.6, eta=0.5, noise=torch.randn_like(x), prediction_type="v_prediction", **t)
        out[f"flow_euler_step {name}"] = lambda x=x, v=v, levels=levels: fastsearch.flow_euler_step(
            x, v, levels, levels * 0.5, **t)
        out[f"flow_euler_step {name} stochastic"] = lambda x=x, v=v: fastsearch.flow_euler_step(
            x, v, 0.7, 0.5, seed=1, stochastic=True, **t)
        out[f"flow_heun_step {name}"] = lambda x=x, v=v: fastsearch.flow_heun_step(x, v, v, 0.7, 0.5, **t)
        out[f"renoise {name} vp"] = lambda x=x: fastsearch.renoise(x, 0.5, 0.3, schedule="vp", seed=2, **t)
        out[f"renoise {name} flow"] = lambda x=x, levels=levels: fastsearch.renoise(
            x, levels * 0.5, levels, schedule="flow", noise=torch.randn_like(x), **t)
        out[f"randn {name}"] = lambda dtype=dtype: fastsearch.randn((3, 1000), seed=5, dtype=dtype, **t)
        out[f"zo_neighbors {name}"] = lambda x=x: fastsearch.zo_neighbors(x, 6, cos_sim=0.9, seed=4, **t)
        scores = torch.randn(total, generator=g).to(dtype)
        out[f"segmented_topk {name} ragged"] = lambda s=scores: fastsearch.segmented_topk(s, 4, offsets=offsets, **t)
        out[f"segmented_topk {name} dense mask"] = lambda s=scores: fastsearch.segmented_topk(
            s[:128].reshape(4, 32), 3, mask=torch.rand(4, 32, generator=g) > 0.3, largest=False, **t)
        out[f"beam_prune {name}"] = lambda s=scores: fastsearch.beam_prune(
            s, 4, offsets=offsets, finished=torch.rand(total, generator=g) > 0.8,
            lengths=torch.randint(1, 50, (total,), generator=g), length_penalty=0.6,
            dedup_keys=torch.randint(0, 9, (total,), generator=g), refill_to=8, **t)
        out[f"beam_prune {name} plain"] = lambda s=scores: fastsearch.beam_prune(s, 2, offsets=offsets, **t)
        log_w = torch.randn(total, generator=g).to(dtype)
        full = _ragged([s for s in sizes if s])  # resampling needs candidates in every group
        for method in fastsearch.ops.particles.RESAMPLE_METHODS:
            out[f"resample {name} {method}"] = lambda w=log_w, method=method, full=full: fastsearch.resample(
                w, 16, offsets=full, method=method, seed=7, **t)
        out[f"effective_sample_size {name}"] = lambda w=log_w: fastsearch.effective_sample_size(
            w, offsets=offsets, **t)
        out[f"vote {name}"] = lambda s=scores: [fastsearch.vote(
            torch.randint(0, 5, (total,), generator=g), s, offsets=offsets, method=method,
            mask=torch.rand(total, generator=g) > 0.2, **t) for method in ("majority", "weighted", "max")]
        hidden = torch.randn(40, 64, generator=g).to(dtype)
        head = torch.randn(2, 64, generator=g).to(dtype)
        positions = torch.tensor([3, 9, 12, 30, 39])
        out[f"prm_step_scores {name}"] = lambda h=hidden, w=head, p=positions: fastsearch.prm_step_scores(h, p, w, **t)
        out[f"prm_scores {name}"] = lambda h=hidden, w=head, positions=positions: [fastsearch.prm_scores(
            h, positions, w, offsets=torch.tensor([0, 2, 2, 5]), method=method, empty=0.0, **t)
            for method in ("last", "min", "logit_sum")]
        steps = torch.rand(total, generator=g).to(dtype)
        out[f"aggregate_steps {name}"] = lambda s=steps: [fastsearch.aggregate_steps(
            s, offsets=offsets, method=method, empty=0.5, **t) for method in ("last", "min", "max", "prod", "mean",
                                                                                "logit_sum")]
        out[f"aggregate_steps {name} dense"] = lambda s=steps: fastsearch.aggregate_steps(
            s[:120].reshape(8, 15), method="mean", **t)
        embeddings = torch.randn(total, 48, generator=g).to(dtype)
        out[f"cosine_scores {name}"] = lambda e=embeddings: [
            fastsearch.cosine_scores(e, e[0], **t), fastsearch.cosine_scores(e, e, **t),
            fastsearch.cosine_scores(e, e[:4], offsets=offsets, **t)]
        out[f"ensemble_scores {name}"] = lambda s=scores: [fastsearch.ensemble_scores(
            torch.stack([s, s * 2]), offsets=offsets, method=method, weights=[1.0, 0.5], **t)
            for method in ("rank", "zscore")]
    # Groups past LARGE_GROUP take the tiled kernels (kernels/select_large.py): one specialisation for every
    # size past it, so these sizes stand for all (tests/test_large_groups.py uses the same kernels).
    large = _ragged([3000, 7, 2600])
    large_total = int(large[-1])
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).rsplit(".", 1)[-1]
        scores = torch.randn(large_total, generator=g).to(dtype)
        out[f"segmented_topk {name} large"] = lambda s=scores: [fastsearch.segmented_topk(
            s, k, offsets=large, mask=torch.rand(large_total, generator=g) > 0.1, largest=largest, **t)
            for k, largest in ((5, True), (1100, False))]
    scores = torch.randn(large_total, generator=g)
    out["beam_prune large"] = lambda: [fastsearch.beam_prune(
        scores, 1030, offsets=large, finished=torch.rand(large_total, generator=g) > 0.8,
        lengths=torch.randint(1, 50, (large_total,), generator=g), length_penalty=0.7,
        dedup_keys=torch.randint(0, 3000, (large_total,), generator=g), refill_to=9, **t),
        fastsearch.beam_prune(scores, 4, offsets=large, **t)]
    for method in fastsearch.ops.particles.RESAMPLE_METHODS:
        out[f"resample large {method}"] = lambda method=method: fastsearch.resample(
            scores, 3000, offsets=large, method=method, seed=7, **t)
    out["effective_sample_size large"] = lambda: fastsearch.effective_sample_size(scores, offsets=large, **t)
    out["vote large"] = lambda: [fastsearch.vote(
        torch.randint(0, 40, (large_total,), generator=g), scores, offsets=large, method=method,
        mask=torch.rand(large_total, generator=g) > 0.2, **t) for method in ("majority", "weighted", "max")]
    tokens = torch.randint(0, 1000, (total,), generator=g)
    out["sequence_keys"] = lambda: [fastsearch.sequence_keys(tokens, offsets=offsets, **t),
                                    fastsearch.sequence_keys(tokens[:120].reshape(6, 20), **t)]
    return out


def record() -> tuple[list[Launch], dict[str, str]]:
    """Every distinct launch of the cases, and the cases that raised before launching anything (with why)."""
    recorder = Recorder()
    saved_run = JITFunction.run
    JITFunction.run = lambda fn, *args, **kwargs: recorder.run(fn, *args, **kwargs)
    os.environ["TRITON_INTERPRET"] = "1"  # fastsearch's backend check only; the kernels are JIT functions already
    undo = _fake_gpu()
    failures = {}
    try:
        for name, call in cases().items():
            recorder.case = name
            before = len(recorder.launches)
            try:
                call()
            except Exception as error:  # outputs are never written: a launcher may trip over them afterwards
                if len(recorder.launches) == before:
                    failures[name] = f"{type(error).__name__}: {error}"
    finally:
        undo()
        JITFunction.run = saved_run
        del os.environ["TRITON_INTERPRET"]
    return list(recorder.launches.values()), failures


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas() -> str:
    """The ptxas Triton itself uses for sm_90 (its PTX may be newer than the CUDA toolkit's)."""
    from triton.backends.nvidia import compiler
    try:
        return compiler.get_ptxas(TARGET.arch).path
    except TypeError:  # older Triton: no arch argument
        return compiler.get_ptxas().path


def compile_launch(launch: Launch) -> Compiled:
    result = Compiled(launch.kernel, launch.case, launch.signature, launch.constexprs, launch.options)
    try:
        source = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs)
        options = {key: value for key, value in launch.options.items() if value is not None}
        kernel = triton.compile(source, target=TARGET, options=options)
    except Exception as error:
        result.error = f"{type(error).__name__}: {str(error)[-2000:]}"
        return result
    ptx = kernel.asm["ptx"]
    result.approx = sorted({line.split()[0] for line in ptx.splitlines() if ".approx" in line})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        # Triton targets sm_90a (the arch-specific features of the H100), so ptxas must too.
        command = [_ptxas(), f"-arch=sm_{TARGET.arch}a", "-v", str(path), "-o", str(Path(folder) / "k.cubin")]
        report = subprocess.run(command, capture_output=True, text=True)
    usage = _PTXAS_USAGE.search(report.stderr)
    spill = _PTXAS_SPILL.search(report.stderr)
    if report.returncode != 0 or usage is None or spill is None:
        result.error = f"ptxas: {report.stderr[-2000:]}"
        return result
    result.registers = int(usage.group(1))
    result.spill_bytes = int(spill.group(1)) + int(spill.group(2))
    return result


def top_level_kernels() -> set[str]:
    """Every kernel the launchers start (a name ending in _kernel), module by module."""
    names = set()
    for module in KERNEL_MODULES:
        mod = sys.modules[f"fastsearch.kernels.{module}"]
        names.update(f"{module}.{name}" for name, value in vars(mod).items()
                     if isinstance(value, JITFunction) and name.endswith("_kernel"))
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    launches, failures = record()
    compiled = [compile_launch(launch) for launch in launches]
    report = {"triton": triton.__version__, "target": f"sm_{TARGET.arch}", "kernels": sorted(top_level_kernels()),
              "failed_cases": failures, "launches": [asdict(c) for c in compiled]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    for c in compiled:
        state = c.error.splitlines()[0] if c.error else f"{c.registers} regs, {c.spill_bytes} B spilled"
        print(f"{c.kernel:45s} {state}  {' '.join(c.approx)}  [{c.case}]")
    for name, why in failures.items():
        print(f"case {name!r} launched nothing: {why}")
    return 1 if failures or any(c.error for c in compiled) else 0


if __name__ == "__main__":
    sys.exit(main())
