"""Side-by-side timings of fastsearch ops against what a user would otherwise run (``fastsearch bench``).

Every case times, in one process and one run, the fastsearch backends available here and the
baselines: diffusers' scheduler step (where one exists), eager PyTorch, and ``torch.compile`` of the
eager code. Medians come from ``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronises
CUDA). Bandwidth counts the bytes an ideal fused kernel must move; ``copy_frac`` divides it by the copy
bandwidth measured on the same device at the same size.

One module a family: :mod:`.ops` (op cases against their baselines), :mod:`.llm` (whole LLM searches),
:mod:`.diffusion` (whole noise searches); :mod:`.harness` holds the timing helpers they share.
"""

from __future__ import annotations

import csv
import datetime
import os

import torch

import fastsearch
from fastsearch.bench.harness import device_name, largest_allocation_mb, median_us
from fastsearch.bench.ops import FAMILIES, overhead_cases

CSV_FIELDS = ["date", "device", "op", "case", "shape", "dtype", "impl", "median_us", "gb_per_s", "copy_frac",
              "speedup_vs_diffusers", "speedup_vs_eager", "speedup_vs_compile", "torch", "fastsearch",
              "largest_alloc_mb"]

# Families measured by their own code (whole searches, not one op): module paths of ``rows(min_run_time,
# device)`` functions returning CSV rows (op, case, shape, dtype, impl, median_us).
ROW_FAMILIES = {"search": "fastsearch.bench.llm", "diffusion": "fastsearch.bench.diffusion"}


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
        cases += overhead_cases(device)
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
