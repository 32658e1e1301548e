"""The CPU kernels are built once per instruction set (default, avx2, avx512) and picked at run time.

Every build this CPU runs is loaded in a process of its own (FASTSEARCH_CPU_CAPABILITY=<name>; a process
loads one build only), runs one fixed set of op calls on the cpu backend (ragged groups, odd sizes, ties,
NaN, fp32/fp16/bf16, seeds) and saves the outputs; the builds must then agree. The selection ops agree bit
for bit. The step, noise and score ops may round differently (FMA or mul + add, Sleef or libm, sums in
another order): to 1e-6 in fp32 (relative, and absolute where results cancel), and to one unit in the last
place in fp16 / bf16.

Run as a script (`python test_cpu_capability.py INPUTS OUTPUTS`), this file is that child process.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsearch import _backend

NAN, INF = float("nan"), float("inf")
RAGGED_SIZES = [5, 0, 1, 33, 100, 3, 17, 64]
LIVE_SIZES = [size for size in RAGGED_SIZES if size]  # resample needs a candidate in every group
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT_DTYPES = {"fp32": torch.float32, **HALF_DTYPES}
# Ops whose outputs every build must reproduce bit for bit; the others agree to rounding.
BIT_EXACT_OPS = ("segmented_topk", "beam_prune", "resample", "effective_sample_size", "vote", "sequence_keys")


def _offsets(sizes) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def make_inputs() -> dict[str, torch.Tensor]:
    """The tensors every build is run on, made once by the test so that every child reads the same ones."""
    g = torch.Generator().manual_seed(2024)
    total = sum(RAGGED_SIZES)
    tied = torch.randint(0, 6, (total,), generator=g).float() / 4  # many exact ties
    special = torch.rand(total, generator=g)
    tied[special < 0.06] = NAN
    tied[(special >= 0.06) & (special < 0.1)] = -INF
    tied[(special >= 0.1) & (special < 0.12)] = INF
    big = 3001  # more than a batch of beam_prune's prepared candidates
    log_weights = torch.randn(total, generator=g) * 3
    log_weights[torch.rand(total, generator=g) < 0.15] = -INF
    log_weights[_offsets(LIVE_SIZES)[:-1]] = 0.5  # a finite log-weight in every group
    return {
        "offsets": _offsets(RAGGED_SIZES),
        "live_offsets": _offsets(LIVE_SIZES),
        "tied": tied,
        "smooth": torch.randn(total, generator=g) * 2,
        "mask": torch.rand(total, generator=g) > 0.1,
        "finished": torch.rand(total, generator=g) < 0.2,
        "lengths": torch.randint(1, 60, (total,), generator=g),
        "wide_lengths": torch.randint(1, 1 << 40, (total,), generator=g),  # too spread out for a power table
        "dedup": torch.randint(0, 6, (total,), generator=g),
        "answers": torch.randint(0, 4, (total,), generator=g),
        "big_scores": torch.randn(big, generator=g),
        "big_lengths": torch.randint(1, 3000, (big,), generator=g),
        "big_offsets": torch.tensor([0, 7, 2048 + 13, big]),
        "log_weights": log_weights,
        "tokens": torch.randint(-5, 50000, (total,), generator=g),
        "sample": torch.randn(3, 5, 67, generator=g),
        "model_output": torch.randn(3, 5, 67, generator=g),
        "velocity_next": torch.randn(3, 5, 67, generator=g),
        "noise": torch.randn(3, 5, 67, generator=g),
        "levels": torch.tensor([0.15, 0.5, 0.9]),
        "levels_next": torch.tensor([0.3, 0.7, 0.95]),
        "hidden": torch.randn(41, 77, generator=g),
        "step_positions": torch.randint(0, 41, (23,), generator=g),
        "step_offsets": torch.tensor([0, 1, 5, 5, 12, 23]),
        "head": torch.randn(3, 77, generator=g) / 3,
        "head_bias": torch.randn(3, generator=g),
        "step_scores": torch.rand(23, generator=g),
        "embeddings": torch.randn(29, 131, generator=g),
        "references": torch.randn(3, 131, generator=g),
        "embedding_offsets": torch.tensor([0, 10, 10, 29]),
        "verifier_scores": torch.randint(0, 5, (3, 29), generator=g).float() / 2,
    }


def run_ops(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every op on the cpu backend, over the inputs of make_inputs; one entry per output tensor."""
    import fastsearch

    out: dict[str, torch.Tensor] = {}

    def keep(name, result):
        if isinstance(result, torch.Tensor):
            out[name] = result
        else:
            fields = getattr(result, "_fields", range(len(result)))  # a NamedTuple, or a plain tuple
            for field, tensor in zip(fields, result, strict=True):
                if tensor is not None:
                    out[f"{name}.{field}"] = tensor

    cpu = {"backend": "cpu"}
    offsets = x["offsets"]
    # -- selection: bit-exact
    for dtype_name, dtype in {**FLOAT_DTYPES, "fp64": torch.float64}.items():
        scores = x["tied"].to(dtype)
        for k in (1, 4, 70):
            for largest in (True, False):
                keep(f"segmented_topk.{dtype_name}.k{k}.{largest}",
                     fastsearch.segmented_topk(scores, k, offsets=offsets, mask=x["mask"], largest=largest, **cpu))
        keep(f"segmented_topk.{dtype_name}.dense", fastsearch.segmented_topk(scores[:96].view(8, 12), 5, **cpu))
        for k in (1, 3, 8, 12):
            keep(f"beam_prune.{dtype_name}.k{k}",
                 fastsearch.beam_prune(scores, k, offsets=offsets, finished=x["finished"], refill_to=9, **cpu))
            for penalty in (0.7, 1.0, 2.0, 0.5):
                for lengths in ("lengths", "wide_lengths"):
                    keep(f"beam_prune.{dtype_name}.k{k}.{lengths}.{penalty}",
                         fastsearch.beam_prune(x["smooth"].to(dtype), k, offsets=offsets, finished=x["finished"],
                                               lengths=x[lengths], length_penalty=penalty, refill_to=5, **cpu))
            keep(f"beam_prune.{dtype_name}.k{k}.float_lengths",
                 fastsearch.beam_prune(scores, k, offsets=offsets, lengths=x["lengths"].float() / 3,
                                       length_penalty=1.3, **cpu))
            keep(f"beam_prune.{dtype_name}.k{k}.dedup",
                 fastsearch.beam_prune(scores, k, offsets=offsets, finished=x["finished"], lengths=x["lengths"],
                                       length_penalty=0.7, dedup_keys=x["dedup"], refill_to=4, **cpu))
    for k in (2, 8, 20):
        keep(f"beam_prune.big.k{k}", fastsearch.beam_prune(x["big_scores"], k, offsets=x["big_offsets"],
                                                            lengths=x["big_lengths"], length_penalty=0.6, **cpu))
    for dtype_name, dtype in {**FLOAT_DTYPES, "fp64": torch.float64}.items():
        log_weights = x["log_weights"].to(dtype)
        for method in ("multinomial", "systematic", "stratified", "residual"):
            for seed in (0, 12345678901):
                keep(f"resample.{dtype_name}.{method}.{seed}",
                     fastsearch.resample(log_weights, 37, method=method, offsets=x["live_offsets"], seed=seed,
                                         **cpu))
        keep(f"effective_sample_size.{dtype_name}",
             fastsearch.effective_sample_size(log_weights, offsets=offsets, **cpu))
    keep("resample.big", fastsearch.resample(x["big_scores"] * 4, 3001, method="residual",
                                             offsets=x["big_offsets"], seed=5, **cpu))
    keep("effective_sample_size.big",
         fastsearch.effective_sample_size(x["big_scores"] * 4, offsets=x["big_offsets"], **cpu))
    for method in ("majority", "weighted", "max"):
        for dtype_name, dtype in FLOAT_DTYPES.items():
            keep(f"vote.{method}.{dtype_name}",
                 fastsearch.vote(x["answers"], None if method == "majority" else x["tied"].to(dtype), method=method,
                                 offsets=offsets, mask=x["mask"], **cpu))
    keep("sequence_keys.int64", fastsearch.sequence_keys(x["tokens"], offsets=offsets, **cpu))
    keep("sequence_keys.int32", fastsearch.sequence_keys(x["tokens"].int(), offsets=offsets, **cpu))
    # -- steps, noise and scores: to rounding
    for dtype_name, dtype in FLOAT_DTYPES.items():
        sample, model_output = x["sample"].to(dtype), x["model_output"].to(dtype)
        noise, velocity_next = x["noise"].to(dtype), x["velocity_next"].to(dtype)
        levels, levels_next = x["levels"], x["levels_next"]
        for prediction_type in ("epsilon", "sample", "v_prediction"):
            keep(f"ddim_step.{dtype_name}.{prediction_type}",
                 fastsearch.ddim_step(sample, model_output, levels, levels_next, eta=0.7, seed=11,
                                      prediction_type=prediction_type, clip_sample_range=1.5,
                                      use_clipped_model_output=True, **cpu))
        keep(f"ddim_step.{dtype_name}.noise",
             fastsearch.ddim_step(sample, model_output, 0.4, levels_next, eta=1.0, noise=noise, **cpu))
        keep(f"flow_euler_step.{dtype_name}",
             fastsearch.flow_euler_step(sample, model_output, levels_next, levels, **cpu))
        keep(f"flow_euler_step.{dtype_name}.stochastic",
             fastsearch.flow_euler_step(sample, model_output, levels_next, 0.2, seed=3, stochastic=True, **cpu))
        keep(f"flow_heun_step.{dtype_name}",
             fastsearch.flow_heun_step(sample, model_output, velocity_next, levels_next, levels, **cpu))
        keep(f"renoise.{dtype_name}.vp", fastsearch.renoise(sample, levels_next, levels, schedule="vp", seed=8, **cpu))
        keep(f"renoise.{dtype_name}.flow",
             fastsearch.renoise(sample, levels, levels_next, schedule="flow", noise=noise, **cpu))
        keep(f"randn.{dtype_name}", fastsearch.randn((7, 301), seed=99, offset=5, dtype=dtype, **cpu))
        # The .out overloads, stepping a copy of the sample in place.
        x_t = sample.clone()
        keep(f"ddim_step.out.{dtype_name}", fastsearch.ddim_step(x_t, model_output, levels, levels_next, eta=0.7,
                                                                 seed=11, out=(x_t, torch.empty_like(x_t)), **cpu))
        x_t = sample.clone()
        keep(f"flow_euler_step.out.{dtype_name}",
             fastsearch.flow_euler_step(x_t, model_output, levels_next, 0.2, seed=3, stochastic=True, out=x_t, **cpu))
        x_t = sample.clone()
        keep(f"flow_heun_step.out.{dtype_name}",
             fastsearch.flow_heun_step(x_t, model_output, velocity_next, levels_next, levels, out=x_t, **cpu))
        x_t = sample.clone()
        keep(f"renoise.out.{dtype_name}",
             fastsearch.renoise(x_t, levels, levels_next, schedule="flow", noise=noise, out=x_t, **cpu))
        keep(f"zo_neighbors.{dtype_name}", fastsearch.zo_neighbors(sample, 4, cos_sim=0.9, seed=21, **cpu))
        hidden, head, bias = x["hidden"].to(dtype), x["head"].to(dtype), x["head_bias"].to(dtype)
        keep(f"prm_step_scores.{dtype_name}",
             fastsearch.prm_step_scores(hidden, x["step_positions"], head, head_bias=bias, positive_index=1, **cpu))
        keep(f"prm_scores.{dtype_name}",
             fastsearch.prm_scores(hidden, x["step_positions"], head[:1], offsets=x["step_offsets"],
                                   activation="sigmoid", method="mean", empty=-1.0, **cpu))
        keep(f"cosine_scores.{dtype_name}",
             fastsearch.cosine_scores(x["embeddings"].to(dtype), x["references"].to(dtype),
                                      offsets=x["embedding_offsets"], **cpu))
    for method in ("last", "min", "prod", "mean", "max", "logit_sum"):
        keep(f"aggregate_steps.{method}",
             fastsearch.aggregate_steps(x["step_scores"], offsets=x["step_offsets"], method=method, empty=0.25, **cpu))
    for method in ("rank", "zscore"):
        keep(f"ensemble_scores.{method}",
             fastsearch.ensemble_scores(x["verifier_scores"], offsets=x["embedding_offsets"], method=method,
                                        weights=[1.0, 0.5, 2.0], **cpu))
    return out


def child(inputs_path: str, outputs_path: str) -> None:
    """Runs the ops in this process and saves what they gave, with the build it loaded."""
    outputs = run_ops(torch.load(inputs_path))
    loaded = sorted(name for name in sys.modules if name.startswith("fastsearch._C_cpu_"))
    torch.save({"capability": _backend.cpu_capability(), "loaded": loaded, "outputs": outputs}, outputs_path)


# -- the tests -------------------------------------------------------------------------------------------

pytestmark = pytest.mark.skipif(not _backend.has_cpu(), reason="compiled CPU kernels not built")

RUNNABLE = [name for name in _backend.built_cpu_capabilities() if name in _backend.supported_cpu_capabilities()]


def _python(*args, capability: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTSEARCH_BACKEND", "FASTSEARCH_CPU_CAPABILITY")}
    if capability is not None:
        env["FASTSEARCH_CPU_CAPABILITY"] = capability
    return subprocess.run([sys.executable, "-W", "always", *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, dict]:
    """Each runnable build's outputs, from a process that loaded that build only."""
    folder = tmp_path_factory.mktemp("cpu_capability")
    inputs_path = folder / "inputs.pt"
    torch.save(make_inputs(), inputs_path)
    results = {}
    for capability in RUNNABLE:
        outputs_path = folder / f"{capability}.pt"
        done = _python(str(Path(__file__).resolve()), str(inputs_path), str(outputs_path), capability=capability)
        assert done.returncode == 0, done.stderr
        assert "fastsearch: " not in done.stderr, done.stderr  # no fallback, nothing missing
        results[capability] = torch.load(outputs_path)
    return results


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_forced_capability_is_the_one_loaded(outputs, capability):
    if capability not in _backend.supported_cpu_capabilities():
        pytest.skip(f"this CPU does not run the {capability} build")
    assert capability in RUNNABLE, f"the {capability} build was not installed (FASTSEARCH_CPU_CAPABILITIES)"
    assert outputs[capability]["capability"] == capability
    assert outputs[capability]["loaded"] == [f"fastsearch._C_cpu_{capability}"]  # one build a process


def test_unforced_loads_the_best_build_the_cpu_runs():
    done = _python("-c", "from fastsearch import _backend; print(_backend.cpu_capability())", capability=None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == RUNNABLE[-1]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers (NaN payloads and -0.0 included)."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[tensor.element_size()]
    return tensor.contiguous().view(as_int) if tensor.is_floating_point() else tensor


# The fp32 tolerance of the ops that may round differently: relative 1e-6, plus 1e-6 absolute for results
# that cancel (the inputs are O(1), so that is a few units in their last place).
ROUNDING_TOLERANCE = 1e-6


def _assert_close_to_rounding(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    special = ~expected.isfinite()
    # NaN where NaN, and the same infinities (nan_to_num maps each kind to a value of its own).
    assert torch.equal(~got.isfinite(), special) and torch.equal(got[special].nan_to_num(),
                                                                 expected[special].nan_to_num()), name
    stored = got.dtype
    got, expected = got[~special].float(), expected[~special].float()
    bound = ROUNDING_TOLERANCE * (1 + expected.abs())
    if stored != torch.float32:
        # fp16 / bf16 results are the fp32 ones rounded: where those straddle a rounding boundary, the builds
        # store neighbours (one unit in the last place apart).
        bound = bound + torch.finfo(stored).eps * expected.abs()
    error = (got - expected).abs()
    assert bool((error <= bound).all()), f"{name}: off by up to {(error - bound).max().item():.3g} beyond the tolerance"


def test_builds_agree(outputs):
    if len(outputs) < 2:
        pytest.skip("this CPU runs one build only")
    baseline_name = "default" if "default" in outputs else RUNNABLE[0]
    baseline = outputs[baseline_name]["outputs"]
    for capability, result in outputs.items():
        if capability == baseline_name:
            continue
        got = result["outputs"]
        assert sorted(got) == sorted(baseline)
        for name, expected in baseline.items():
            if name.startswith(BIT_EXACT_OPS):
                assert torch.equal(_bits(got[name]), _bits(expected)), f"{name}: {capability} != {baseline_name}"
            else:
                _assert_close_to_rounding(f"{name} ({capability} vs {baseline_name})", got[name], expected)


def test_every_cpu_kernel_is_compared(outputs):
    names = next(iter(outputs.values()))["outputs"]
    # An output is named after its op, or after its op and overload ("ddim_step.out.fp32").
    covered = {name.split(".", 1)[0] for name in names} | {".".join(name.split(".", 2)[:2]) for name in names}
    kernels = {"randn" if op == "randn_fill_" else op for op, key in _backend._native_kernels if key == "CPU"}
    assert kernels <= covered, f"not compared across builds: {sorted(kernels - covered)}"


def test_misspelled_capability_warns_and_falls_back():
    done = _python("-c", "from fastsearch import _backend; print(_backend.cpu_capability())", capability="avx3")
    assert done.returncode == 0, done.stderr
    assert "FASTSEARCH_CPU_CAPABILITY='avx3' is not one of default, avx2, avx512" in done.stderr
    assert done.stderr.count("FASTSEARCH_CPU_CAPABILITY") == 1  # said once
    assert done.stdout.strip() == RUNNABLE[-1]


def test_capability_the_cpu_lacks_warns_and_falls_back(monkeypatch):
    # Importing a build whose instructions the CPU lacks would die of SIGILL: it must never be chosen.
    monkeypatch.setattr(_backend, "supported_cpu_capabilities", lambda: ("default",))
    monkeypatch.setenv("FASTSEARCH_CPU_CAPABILITY", "avx512")
    with pytest.warns(RuntimeWarning, match=r"FASTSEARCH_CPU_CAPABILITY='avx512' needs instructions this CPU "
                                            r"lacks \(it runs default\); using the default CPU kernels"):
        assert _backend._choose_cpu_capability() == "default"


def test_capability_not_built_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(_backend, "built_cpu_capabilities", lambda: ("default", "avx2"))
    monkeypatch.setattr(_backend, "supported_cpu_capabilities", lambda: ("default", "avx2", "avx512"))
    monkeypatch.setenv("FASTSEARCH_CPU_CAPABILITY", "avx512")
    with pytest.warns(RuntimeWarning, match="'avx512' was not built .*; using the avx2 CPU kernels"):
        assert _backend._choose_cpu_capability() == "avx2"


def test_info_prints_the_capability_in_use():
    capability = RUNNABLE[0]
    done = _python("-m", "fastsearch", "info", capability=capability)
    assert done.returncode == 0, done.stderr
    assert f"CPU kernels: {capability}," in done.stdout
    assert f"this CPU runs {', '.join(_backend.supported_cpu_capabilities())}" in done.stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
@pytest.mark.parametrize("module", ["fastsearch._C", "fastsearch._C_cpu_default"])
def test_modules_a_plain_x86_64_cpu_imports_hold_no_vector_extension(module):
    # _C runs before anything knows what the CPU supports, _C_cpu_default wherever nothing better runs: an
    # AVX instruction in either (a VEX or EVEX encoding: the ymm / zmm registers, v-prefixed mnemonics)
    # would be SIGILL on a CPU without it.
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 only")
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"{module} was not built")
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", spec.origin], capture_output=True, text=True,
                             check=True).stdout
    vector = [line for line in listing.splitlines() if re.match(r"\s+[0-9a-f]+:\s+v[a-z]", line)]
    assert not vector, f"{module} holds AVX instructions, e.g. {vector[:3]}"


if __name__ == "__main__":
    child(*sys.argv[1:])
