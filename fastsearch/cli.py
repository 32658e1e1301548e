"""The ``fastsearch`` command: ``fastsearch info``, ``fastsearch bench`` and ``fastsearch demo``."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def _info(args) -> int:
    import fastsearch
    from fastsearch import _backend

    print(f"fastsearch {fastsearch.__version__}")
    print(f"python     {platform.python_version()} ({platform.machine()})")
    print(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton     {triton.__version__}")
    except ImportError:
        print("triton     not installed")
    ext = _backend._ext
    if ext is not None:
        cuda = "yes" if ext.has_cuda() else "no"
        cpu = _backend.cpu_capability() or f"not loaded ({_backend.extension_error()})"
        print(f"_C         built (CPU kernels: {cpu}, CUDA kernels: {cuda})")
        print(f"cpu builds {', '.join(_backend.built_cpu_capabilities()) or 'none'} installed; this CPU runs "
              f"{', '.join(_backend.supported_cpu_capabilities())}")
    else:
        print(f"_C         not loaded ({_backend.extension_error()})")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            print(f"device     cuda:{index} {torch.cuda.get_device_name(index)}")
    else:
        print("device     cpu only (no CUDA device)")
    print(f"threads    {torch.get_num_threads()}")
    print("backends   " + ", ".join(f"{name}={'yes' if ok else 'no'}" for name, ok in fastsearch.backends().items()))
    return 0


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _bench(args) -> int:
    from fastsearch import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = tuple(int(size) for size in args.shape.split("x"))
    csv_path = args.csv
    if csv_path == "auto":
        csv_path = f"benchmarks/results/{bench.device_name(torch.device(device))}.csv"
    bench.run(shape=shape, dtypes=[_DTYPES[name] for name in args.dtype.split(",")], device=device,
              families=args.ops.split(",") if args.ops else None, min_run_time=args.min_run_time,
              csv_path=csv_path)
    return 0


_DEMOS = {"llm": "fastsearch.demos.llm", "diffusion": "fastsearch.demos.diffusion"}


def _demo(args) -> int:
    import importlib
    import pathlib
    import time

    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(_DEMOS) if args.which == "all" else [args.which]
    for name in names:
        start = time.perf_counter()
        print(f"== fastsearch demo {name} ==")
        importlib.import_module(_DEMOS[name]).run(out_dir, quick=args.quick, progress=not args.no_progress)
        print(f"== {name} done in {time.perf_counter() - start:.1f} s; plots in {out_dir}/ ==")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastsearch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends").set_defaults(func=_info)
    bench_parser = sub.add_parser("bench", help="time the ops against diffusers, eager PyTorch and torch.compile")
    bench_parser.add_argument("--shape", default="16x4x64x64", help="sample shape, e.g. 16x4x64x64")
    bench_parser.add_argument("--dtype", default="float32", help="comma-separated: float32,float16,bfloat16")
    bench_parser.add_argument("--ops", default=None, help="comma-separated families: ddim_step,flow_euler_step,"
                                                          "per_sample,randn,select,score,search,diffusion "
                                                          "(default: all)")
    bench_parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench_parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per impl")
    bench_parser.add_argument("--csv", default=None,
                              help="append rows to this CSV; 'auto' = benchmarks/results/<device>.csv")
    bench_parser.set_defaults(func=_bench)
    demo_parser = sub.add_parser("demo", help="run the searches on the embedded models; print tables, write plots")
    demo_parser.add_argument("which", nargs="?", choices=["all", *_DEMOS], default="all",
                             help="llm (simulated reasoning task), diffusion (Gaussian mixture and digits), or all")
    demo_parser.add_argument("--out", default="demo-output", help="folder for the PNG plots")
    demo_parser.add_argument("--quick", action="store_true", help="a seconds-long smoke version")
    demo_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo_parser.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
