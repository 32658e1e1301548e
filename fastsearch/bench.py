"""Side-by-side timings of fastsearch ops against what a user would otherwise run.

Every case times, in one process and one run, the fastsearch backends available here and the
baselines: diffusers' scheduler step (where one exists), eager PyTorch, and ``torch.compile`` of the
eager code. Medians come from ``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronises
CUDA). Bandwidth counts the bytes an ideal fused kernel must move; ``copy_frac`` divides it by the copy
bandwidth measured on the same device at the same size.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.utils.benchmark as torch_benchmark

import fastsearch
from fastsearch import _backend
from fastsearch.ops import score as score_ops
from fastsearch.ops import steps as step_ops

CSV_FIELDS = ["date", "device", "op", "case", "shape", "dtype", "impl", "median_us", "gb_per_s", "copy_frac",
              "speedup_vs_diffusers", "speedup_vs_eager", "speedup_vs_compile", "torch", "fastsearch",
              "largest_alloc_mb"]


@dataclass
class Case:
    op: str
    case: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bytes_moved: int
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)
    measure_memory: bool = False  # also record the largest single allocation of each implementation


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def median_us(fn: Callable[[], object], min_run_time: float) -> float:
    fn()  # warm up (compiles, caches)
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def largest_allocation_mb(fn: Callable[[], object], device: torch.device) -> float:
    """The largest block one call allocates, in MiB: the CUDA allocator's peak above the memory in use
    before the call, or on the CPU the largest allocation the torch profiler's memory view records."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([event.cpu_memory_usage for event in prof.events()] + [0]) / 2**20


def _fastsearch_backends(device: torch.device, op: str | None = None) -> list[str]:
    """The compiled and Triton backends that can run ``op`` (any op, when None) on ``device`` here."""
    names = []
    if device.type == "cpu":
        if _backend.has_cpu() and (op is None or _backend._has_kernel(op, "CPU")):
            names.append("cpu")
    else:
        if _backend.has_cuda() and (op is None or _backend._has_kernel(op, "CUDA")):
            names.append("cuda")
        if _backend.has_triton("cuda"):
            names.append("triton")
    return names


def _compiled(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001 - a baseline that cannot compile is left out, not fatal
        return None


def _ddim_cases(shape, dtype, device) -> list[Case]:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(50)
    t = int(scheduler.timesteps[10])
    alpha = float(scheduler.alphas_cumprod[t])
    alpha_prev = float(scheduler.alphas_cumprod[t - scheduler.config.num_train_timesteps // 50])
    x = torch.randn(shape, dtype=dtype, device=device)
    eps = torch.randn(shape, dtype=dtype, device=device)
    nbytes = x.numel() * x.element_size()
    cases = []
    for eta in (0.0, 1.0):
        case = Case("ddim_step", f"eta={eta:g}" + (" seed" if eta else ""), shape, dtype, 4 * nbytes)

        def eager(eta=eta):
            noise = torch.randn_like(x) if eta > 0 else None
            return step_ops._ddim_step_reference(x, eps, None, alpha, None, alpha_prev, eta, noise, None, 0, None,
                                                 False)

        for name in _fastsearch_backends(device):
            case.impls[f"fastsearch-{name}"] = (
                lambda name=name, eta=eta: fastsearch.ddim_step(x, eps, alpha, alpha_prev, eta=eta,
                                                                seed=1 if eta else None, backend=name))
        case.impls["diffusers"] = lambda eta=eta: scheduler.step(eps, t, x, eta=eta, return_dict=False)
        if not eta:
            # The memory floor of any two-in, two-out step: copies of the same bytes into ready outputs.
            outputs = (torch.empty_like(x), torch.empty_like(x))
            case.impls["copy-same-bytes"] = lambda outputs=outputs: (outputs[0].copy_(x), outputs[1].copy_(eps))
        case.impls["eager"] = eager
        compiled = _compiled(eager)
        if compiled is not None:
            case.impls["compile"] = compiled
        cases.append(case)
    return cases


def _flow_cases(shape, dtype, device) -> list[Case]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[10]
    sigma, sigma_next = float(scheduler.sigmas[10]), float(scheduler.sigmas[11])
    x = torch.randn(shape, dtype=dtype, device=device)
    v = torch.randn(shape, dtype=dtype, device=device)
    nbytes = x.numel() * x.element_size()
    case = Case("flow_euler_step", "euler", shape, dtype, 3 * nbytes)

    def diffusers_step():
        scheduler._step_index = 10  # the scheduler advances its own index on every call
        return scheduler.step(v, t, x, return_dict=False)

    def eager():
        return step_ops._flow_euler_step_reference(x, v, None, sigma, None, sigma_next, None, None, False)

    for name in _fastsearch_backends(device):
        case.impls[f"fastsearch-{name}"] = lambda name=name: fastsearch.flow_euler_step(x, v, sigma, sigma_next,
                                                                                        backend=name)
    case.impls["diffusers"] = diffusers_step
    case.impls["eager"] = eager
    compiled = _compiled(eager)
    if compiled is not None:
        case.impls["compile"] = compiled
    return [case]


def _per_sample_cases(shape, dtype, device) -> list[Case]:
    """Steps that diffusers cannot express: per-sample levels (search over paths, particles)."""
    x = torch.randn(shape, dtype=dtype, device=device)
    v = torch.randn(shape, dtype=dtype, device=device)
    v2 = torch.randn(shape, dtype=dtype, device=device)
    batch = shape[0]
    sigma = torch.linspace(0.3, 0.8, batch, device=device)
    sigma_next = sigma - 0.02
    level_to = sigma + 0.1
    nbytes = x.numel() * x.element_size()
    heun = Case("flow_heun_step", "per-sample sigma", shape, dtype, 4 * nbytes)
    renoise = Case("renoise", "flow per-sample seed", shape, dtype, 2 * nbytes)

    def heun_eager():
        return step_ops._flow_heun_step_reference(x, v, v2, sigma, 0.0, sigma_next, 0.0)

    def renoise_eager():
        return step_ops._renoise_reference(x, sigma, 0.0, level_to, 0.0, 1, torch.randn_like(x), None)

    for name in _fastsearch_backends(device):
        heun.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.flow_heun_step(x, v, v2, sigma, sigma_next, backend=name))
        renoise.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.renoise(x, sigma, level_to, schedule="flow", seed=3, backend=name))
    for case, eager in ((heun, heun_eager), (renoise, renoise_eager)):
        case.impls["eager"] = eager
        compiled = _compiled(eager)
        if compiled is not None:
            case.impls["compile"] = compiled
    return [heun, renoise]


def _noise_cases(shape, dtype, device) -> list[Case]:
    numel = 1
    for size in shape:
        numel *= size
    randn = Case("randn", "philox", shape, dtype, numel * torch.tensor([], dtype=dtype).element_size())
    for name in _fastsearch_backends(device):
        randn.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.randn(shape, seed=5, dtype=dtype, device=device, backend=name))
    randn.impls["eager"] = lambda: torch.randn(shape, dtype=dtype, device=device)
    return [randn]


def _overhead_cases(device) -> list[Case]:
    """Per-call cost on a tiny tensor: the public function against the bare dispatcher call."""
    if not _fastsearch_backends(device):
        return []
    x = torch.randn(1, 5, device=device)
    eps = torch.randn(1, 5, device=device)
    op = torch.ops.fastsearch.ddim_step.default
    case = Case("ddim_step", "call overhead", (1, 5), torch.float32, 4 * x.numel() * 4)
    case.impls["fastsearch-public"] = lambda: fastsearch.ddim_step(x, eps, 0.5, 0.6)
    case.impls["torch.ops-direct"] = lambda: op(x, eps, None, 0.5, None, 0.6, 0.0, None, None, 0, None, False)
    return [case]


def _select_cases(shape, dtype, device) -> list[Case]:
    """Beam pruning and resampling: 64 groups of ~64 candidates on a CPU, 512 x 256 on a GPU (the step
    shape does not apply)."""
    import numpy as np

    groups, width = (512, 256) if device.type == "cuda" else (64, 64)
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(width // 2, width + width // 2, (groups,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).to(device)
    total = int(sizes.sum())
    scores = torch.rand(total, generator=g).to(device)
    finished = (torch.rand(total, generator=g) < 0.1).to(device)
    lengths = torch.randint(10, 200, (total,), generator=g).to(device)
    k, beams, penalty = 4, 16, 0.5
    cpu_offsets = offsets.cpu().tolist()
    # The dense layout a user pads to for the torch composite (padding is -inf and "finished").
    column = torch.arange(int(sizes.max()), device=device)
    inside = column < sizes.to(device)[:, None]
    flat = (offsets[:-1, None] + column).clamp(max=total - 1)
    dense_scores = torch.where(inside, scores[flat], torch.full((), -torch.inf, device=device))
    dense_finished = ~inside | finished[flat]
    dense_lengths = lengths[flat]
    nbytes = total * (4 + 1 + 8)
    case = Case("beam_prune", f"{groups} ragged groups ~{width}", (total,), torch.float32, nbytes)

    def composite():
        adjusted = torch.where(dense_finished, torch.full((), -torch.inf, device=device),
                               dense_scores / dense_lengths.float() ** penalty)
        values, index = torch.topk(adjusted, k, dim=-1)
        counts = (values > -torch.inf).sum(-1)
        slot = torch.arange(beams, device=device)
        return index.gather(-1, slot % counts.clamp(min=1)[:, None]), values, counts

    def per_group_loop():
        out = []
        for start, end in zip(cpu_offsets[:-1], cpu_offsets[1:], strict=True):
            adjusted = torch.where(finished[start:end], torch.full((), -torch.inf, device=device),
                                   scores[start:end] / lengths[start:end].float() ** penalty)
            values, index = torch.topk(adjusted, min(k, end - start))
            alive = index[values > -torch.inf] + start
            out.append(alive.repeat(beams // max(len(alive), 1) + 1)[:beams])
        return out

    np_scores, np_finished, np_lengths = scores.cpu().numpy(), finished.cpu().numpy(), lengths.cpu().numpy()

    def numpy_argsort():
        out = []
        for start, end in zip(cpu_offsets[:-1], cpu_offsets[1:], strict=True):
            adjusted = np.where(np_finished[start:end], -np.inf,
                                np_scores[start:end] / np_lengths[start:end] ** penalty)
            out.append(np.argsort(-adjusted, kind="stable")[:k] + start)
        return out

    for name in _fastsearch_backends(device):
        case.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.beam_prune(scores, k, offsets=offsets, finished=finished, lengths=lengths,
                                                    length_penalty=penalty, refill_to=beams, backend=name))
    case.impls["eager"] = composite
    compiled = _compiled(composite)
    if compiled is not None:
        case.impls["compile"] = compiled
    case.impls["torch-loop"] = per_group_loop
    case.impls["numpy-argsort"] = numpy_argsort

    log_weights = torch.randn(groups, width, generator=g).to(device)
    particles = width
    resample = Case("resample", f"systematic {groups}x{width}", (groups, width), torch.float32, groups * width * 12)
    for name in _fastsearch_backends(device):
        resample.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.resample(log_weights, particles, method="systematic", seed=1, backend=name))
    resample.impls["eager"] = lambda: torch.multinomial(torch.softmax(log_weights, -1), particles, replacement=True)
    return [case, resample]


def _score_cases(shape, dtype, device) -> list[Case]:
    """PRM scoring against the full-logits path today's PRM code runs: hidden @ lm_head.T over the whole
    vocabulary, two columns at the step tags, softmax, aggregation in Python. The step shape does not apply:
    T=2048, H=1024, V=32000, S=256, N=64 on a CPU; T=32768, H=4096, V=152064, S=4096, N=512 on a GPU."""
    tokens, hidden, vocab, steps, candidates = ((32768, 4096, 152064, 4096, 512) if device.type == "cuda"
                                                else (2048, 1024, 32000, 256, 64))
    g = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(tokens, hidden, generator=g).to(dtype).to(device)
    lm_head = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).to(device)
    good, bad = 7, 11
    head = lm_head[[good, bad]].contiguous()
    positions = torch.sort(torch.randperm(tokens, generator=g)[:steps]).values.to(device)
    cuts = torch.sort(torch.randperm(steps - 1, generator=g)[:candidates - 1] + 1).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([steps])]).to(device)
    cpu_offsets = offsets.cpu().tolist()
    bytes_moved = steps * hidden * hidden_states.element_size() + head.numel() * head.element_size()
    case = Case("prm_scores", f"T{tokens} H{hidden} V{vocab} S{steps} N{candidates}", (tokens, hidden), dtype,
                bytes_moved, measure_memory=True)

    def full_logits():
        logits = hidden_states @ lm_head.T  # [T, V]
        step_scores = torch.softmax(logits[positions][:, [good, bad]].float(), dim=-1)[:, 0]
        return [step_scores[start:end][-1] for start, end in zip(cpu_offsets[:-1], cpu_offsets[1:], strict=True)]

    def gather_eager():
        return score_ops._prm_scores_reference(hidden_states, positions, offsets, head, None, 0, 0, 0, None)

    for name in _fastsearch_backends(device, "prm_scores"):
        case.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.prm_scores(hidden_states, positions, offsets, head, backend=name))
    case.impls["eager"] = full_logits
    case.impls["gather-eager"] = gather_eager
    return [case]


FAMILIES = {
    "ddim_step": _ddim_cases,
    "flow_euler_step": _flow_cases,
    "per_sample": _per_sample_cases,
    "randn": _noise_cases,
    "select": _select_cases,
    "score": _score_cases,
}


# Families measured by their own code (whole searches, not one op): module paths of ``rows(min_run_time,
# device)`` functions returning CSV rows (op, case, shape, dtype, impl, median_us).
ROW_FAMILIES = {"search": "fastsearch.search.benchmark", "diffusion": "fastsearch.diffusion.benchmark"}


def copy_bandwidth(numel: int, device: torch.device, min_run_time: float) -> float:
    """GB/s of ``dst.copy_(src)`` for fp32 tensors of ``numel`` elements."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_us(lambda: dst.copy_(src), min_run_time) / 1e3


def run(shape=(16, 4, 64, 64), dtypes=(torch.float32,), device="cpu", families=None, min_run_time=0.5,
        csv_path=None, overhead=True, echo=print) -> list[dict]:
    """Time every case; print a table; append rows to ``csv_path`` when given. Returns the rows."""
    device = torch.device(device)
    shape = tuple(shape)
    numel = 1
    for size in shape:
        numel *= size
    copy_gbps = copy_bandwidth(numel, device, min_run_time)
    echo(f"device {device_name(device)}, copy bandwidth at {numel} fp32 elements: {copy_gbps:.1f} GB/s")
    families = list(families or [*FAMILIES, *ROW_FAMILIES])
    unknown = [family for family in families if family not in FAMILIES and family not in ROW_FAMILIES]
    if unknown:
        raise ValueError(f"unknown benchmark families {unknown}; choose from {[*FAMILIES, *ROW_FAMILIES]}")
    cases = []
    for dtype in dtypes:
        for family in families:
            if family in FAMILIES:
                cases += FAMILIES[family](shape, dtype, device)
    if overhead:
        cases += _overhead_cases(device)
    rows = []
    date = datetime.date.today().isoformat()
    header = f"{'op':<16} {'case':<22} {'dtype':<9} {'impl':<18} {'median us':>10} {'GB/s':>8} {'copy%':>6} " \
             f"{'x diffusers':>11} {'x eager':>8} {'x compile':>9}"
    echo(header)
    echo("-" * len(header))
    for case in cases:
        times = {name: median_us(fn, min_run_time) for name, fn in case.impls.items()}
        for name, us in times.items():
            gbps = case.bytes_moved / us / 1e3
            row = {
                "date": date, "device": device_name(device), "op": case.op, "case": case.case,
                "shape": "x".join(map(str, case.shape)), "dtype": str(case.dtype).replace("torch.", ""),
                "impl": name, "median_us": round(us, 2), "gb_per_s": round(gbps, 2),
                "copy_frac": round(gbps / copy_gbps, 3),
                "speedup_vs_diffusers": _ratio(times, "diffusers", us),
                "speedup_vs_eager": _ratio(times, "eager", us),
                "speedup_vs_compile": _ratio(times, "compile", us),
                "torch": torch.__version__, "fastsearch": fastsearch.__version__,
                "largest_alloc_mb": (round(largest_allocation_mb(case.impls[name], device), 3)
                                     if case.measure_memory else ""),
            }
            rows.append(row)
            echo(f"{case.op:<16} {case.case:<22} {row['dtype']:<9} {name:<18} {us:>10.2f} {gbps:>8.2f} "
                 f"{100 * row['copy_frac']:>5.0f}% {_fmt(row['speedup_vs_diffusers']):>11} "
                 f"{_fmt(row['speedup_vs_eager']):>8} {_fmt(row['speedup_vs_compile']):>9}"
                 + (f"  largest alloc {row['largest_alloc_mb']:.3f} MiB" if case.measure_memory else ""))
    for family in families:
        if family in ROW_FAMILIES:
            rows += _family_rows(family, device, min_run_time, date, echo)
    if csv_path:
        write_csv(csv_path, rows)
        echo(f"appended {len(rows)} rows to {csv_path}")
    return rows


def _family_rows(family: str, device: torch.device, min_run_time: float, date: str, echo) -> list[dict]:
    import importlib
    import inspect

    measure = importlib.import_module(ROW_FAMILIES[family]).rows
    options = {"min_run_time": min_run_time}
    if "device" in inspect.signature(measure).parameters:
        options["device"] = str(device)
    rows = []
    for measured in measure(**options):
        row = dict.fromkeys(CSV_FIELDS, "")
        row.update(date=date, device=device_name(device), torch=torch.__version__, fastsearch=fastsearch.__version__)
        row.update({key: value for key, value in measured.items() if key in CSV_FIELDS})
        rows.append(row)
        echo(f"{row['op']:<16} {row['case']:<40} {row['impl']:<12} {row['median_us']:>10}")
    return rows


def _ratio(times: dict[str, float], baseline: str, us: float):
    return round(times[baseline] / us, 2) if baseline in times else ""


def _fmt(value) -> str:
    return f"{value:.2f}x" if value != "" else "-"


def write_csv(path: str, rows: list[dict]) -> None:
    """Append ``rows``; a file written with older columns is rewritten with the current ones first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    earlier = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != CSV_FIELDS:
                earlier = [{key: row.get(key) or "" for key in CSV_FIELDS} for row in reader]
            else:
                earlier = None
    with open(path, "a" if earlier is None else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if earlier is not None:
            writer.writeheader()
            writer.writerows(earlier)
        writer.writerows(rows)
