"""A search step's generator time through OpenAIGenerator: every request in flight at once against the same
requests sent one after another (``max_concurrency=1``), on a local OpenAI-compatible server.

    PYTHONPATH=. python benchmarks/openai_concurrency.py [--prompts 8] [--n 4] [--max-tokens 32] [--repeats 5]
        [--continuous-batching] [--url http://127.0.0.1:8000/v1 --model NAME] [--csv PATH]

Without ``--url`` it starts ``transformers serve`` (needs ``transformers[serving]``) around the tests' tiny random
Llama (tests/openai_servers.py) on 127.0.0.1, and stops it at the end; ``--continuous-batching`` starts it with
continuous batching, so that concurrent requests share the model's forward passes. With ``--url`` it measures that
server (e.g. vLLM: ``python -m vllm.entrypoints.openai.api_server --model DIR``).

Each repeat is one ``generate`` call of a step: ``--prompts`` prompts, ``--n`` samples each, stop at the step
delimiter, the same seed for both modes. Prints both medians and their ratio, and appends a row to the CSV
(default benchmarks/results/openai-concurrency.csv).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIELDS = ["date", "machine", "server", "prompts", "n", "max_tokens", "requests", "repeats", "concurrent_median_s",
          "sequential_median_s", "speedup", "fastsearch", "openai"]


def step_time(generator, prompts, n: int, max_tokens: int, stop: str, seed: int) -> tuple[float, int]:
    """Seconds of one step's ``generate`` call, and the tokens it returned."""
    start = time.perf_counter()
    out = generator.generate(prompts, n=n, stop=[stop], temperature=1.0, max_tokens=max_tokens, seed=seed)
    seconds = time.perf_counter() - start
    assert len(out) == len(prompts) and all(len(samples) == n for samples in out)
    return seconds, sum(completion.num_tokens for samples in out for completion in samples)


def measure(url: str, model: str, args, stop: str) -> dict:
    """Median step time with all requests in flight and with one at a time, alternating the two modes."""
    from fastsearch.integrations.openai import OpenAIGenerator

    prompts = [f"{index} + {index * 7 % 10} = " for index in range(args.prompts)]
    times = {"concurrent": [], "sequential": []}
    tokens = {"concurrent": [], "sequential": []}
    with OpenAIGenerator(url, model, max_concurrency=1024) as concurrent, \
            OpenAIGenerator(url, model, max_concurrency=1) as sequential:
        generators = {"concurrent": concurrent, "sequential": sequential}
        for generator in generators.values():  # warm up: server kind detection, connections, the model's caches
            step_time(generator, prompts, args.n, args.max_tokens, stop, seed=0)
        for repeat in range(args.repeats):
            for mode, generator in generators.items():
                seconds, count = step_time(generator, prompts, args.n, args.max_tokens, stop, seed=repeat + 1)
                times[mode].append(seconds)
                tokens[mode].append(count)
        requests = args.prompts * (args.n if concurrent.n_per_request == 1 else 1)
        kind = concurrent._kind
    assert tokens["concurrent"] == tokens["sequential"] or kind != "transformers" or args.continuous_batching, \
        "the same seeds should give the same tokens in both modes"
    return {"times": times, "requests": requests, "kind": kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--continuous-batching", action="store_true",
                        help="start transformers serve with --continuous-batching")
    parser.add_argument("--url", default=None, help="an OpenAI-compatible server's API root (default: start one)")
    parser.add_argument("--model", default=None, help="the model name on --url")
    parser.add_argument("--stop", default=None, help="step delimiter (default: the tiny model's, or '\\n\\n')")
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "openai-concurrency.csv"))
    args = parser.parse_args()

    import openai

    import fastsearch

    server = None
    if args.url is None:
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
        from openai_servers import STEP, save_tiny_model, start_transformers_server  # the tests' helpers

        folder = save_tiny_model(tempfile.mkdtemp(prefix="tiny-llama-"))
        extra = ("--continuous-batching",) if args.continuous_batching else ()
        server = start_transformers_server(folder, extra_args=extra)
        url, model, stop = server.url, server.model, args.stop or STEP
        label = "transformers-serve" + ("-cb" if args.continuous_batching else "") + "-tiny-llama"
    else:
        if args.model is None:
            parser.error("--url needs --model")
        url, model, stop, label = args.url, args.model, args.stop or "\n\n", args.url
    try:
        result = measure(url, model, args, stop)
    finally:
        if server is not None:
            server.stop()
    concurrent = statistics.median(result["times"]["concurrent"])
    sequential = statistics.median(result["times"]["sequential"])
    print(f"server {label} (kind {result['kind']}): {args.prompts} prompts x n={args.n}, max_tokens={args.max_tokens}, "
          f"{result['requests']} requests a step, {args.repeats} repeats")
    print(f"all in flight   median {concurrent * 1e3:9.1f} ms  {[round(t, 3) for t in result['times']['concurrent']]}")
    print(f"one at a time   median {sequential * 1e3:9.1f} ms  {[round(t, 3) for t in result['times']['sequential']]}")
    print(f"speed-up {sequential / concurrent:.2f}x")
    row = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}-{os.cpu_count()}cores",
           "server": label, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
           "requests": result["requests"], "repeats": args.repeats, "concurrent_median_s": round(concurrent, 4),
           "sequential_median_s": round(sequential, 4), "speedup": round(sequential / concurrent, 2),
           "fastsearch": fastsearch.__version__, "openai": openai.__version__}
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(f"appended a row to {args.csv}")


if __name__ == "__main__":
    main()
