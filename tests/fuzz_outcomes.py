"""Hostile-input fuzzing of every public op, counted by outcome (``make fuzz`` runs it; not a pytest module).

Each case is one op call: a valid call with random sizes and values, or the same with one argument replaced
by something hostile (None, a string, a wrong dtype or rank, a meta tensor, a strided or expanded view,
NaN / inf, out-of-range numbers ...). Every backend that runs here (the torch reference, the C++ CPU kernels,
the Triton kernels under the interpreter) gets the case in a worker process of its own, so that a crash is
counted, not fatal. Outcomes per case:

- ``agrees``: every backend returned, and the same as the reference (to the rounding of the dtype);
- ``clear error``: every backend raised ValueError or TypeError naming the argument at fault (for a hostile
  case, the mutated argument; for a valid case, never: a valid call must run);
- ``unclear``: an error of another type, one that does not name the argument, or backends that disagree on
  raising (one raises, another returns);
- ``crash``: a worker died (segfault, abort) or hung past the time limit;
- ``silent wrong``: a backend returned something other than the reference's result.

Usage: ``python tests/fuzz_outcomes.py [--cases-per-op N] [--seed S] [--report PATH]``; exit status 1 when
any case is unclear, crashed or silently wrong.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import sys
import time
import traceback
from collections import Counter

TIMEOUT_S = 120.0
OUTCOMES = ("agrees", "clear error", "unclear", "crash", "silent wrong")


# -- cases -----------------------------------------------------------------------------------------------


def _tensor_mutations(torch, value):
    """Hostile replacements of a tensor argument: name -> a function building it from the valid tensor."""

    def strided(base):
        wide = torch.zeros(base.shape[:-1] + (2 * base.shape[-1],), dtype=base.dtype)
        view = wide[..., ::2]
        view.copy_(base)
        return view

    def filled(number):
        return lambda base: base.clone().fill_(number)

    return {
        "none": lambda base: None,
        "string": lambda base: "0.5",
        "list": lambda base: base.tolist(),
        "int": lambda base: 3,
        "bool_tensor": lambda base: base.bool(),
        "int32_tensor": lambda base: base.to(torch.int32),
        "float64_tensor": lambda base: base.double(),
        "complex_tensor": lambda base: base.to(torch.complex64),
        "extra_dim": lambda base: base.unsqueeze(0),
        "flattened": lambda base: base.reshape(-1),
        "scalar": lambda base: base.reshape(-1)[0],
        "empty": lambda base: base.new_empty((0,) + tuple(base.shape[1:])),
        "meta": lambda base: base.to("meta"),
        "strided": strided,
        "expanded": lambda base: base.reshape(-1)[:1].expand(base.shape),
        "nan": filled(float("nan")),
        "inf": filled(float("inf")),
        "negative": lambda base: -base.abs() - 1,
        "huge_values": filled(1e30),
        "huge_ints": filled(2**40),
    }


SCALAR_MUTATIONS = {
    "none": None, "string": "0.5", "nan": float("nan"), "inf": float("inf"), "minus_inf": -float("inf"),
    "negative": -1, "zero": 0, "huge_int": 2**70, "float_for_int": 2.5, "bool": True, "list": [1, 2],
    "tensor_0d": "tensor_0d", "tensor_1d": "tensor_1d",
}


def _valid(torch, fastsearch, op, rng):
    """A valid call of ``op`` with random sizes: (function, kwargs)."""
    g = rng.randint
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    sizes = [g(0, 5) for _ in range(g(1, 4))]
    total = sum(sizes)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    values = torch.randn(total, generator=torch.Generator().manual_seed(g(0, 10**6)))
    # resampling needs a candidate in every group: its groups are the non-empty ones
    nonempty_offsets = torch.unique_consecutive(offsets) if total else offsets[:1]
    shape = (g(1, 4), g(1, 3), g(2, 6))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(g(0, 10**6))).to(dtype)
    v = torch.randn(shape, generator=torch.Generator().manual_seed(g(0, 10**6))).to(dtype)
    seed = g(0, 2**62)
    tokens, width = g(1, 12), g(1, 16)
    hidden = torch.randn(tokens, width).to(dtype)
    positions = torch.randint(0, tokens, (total,))
    head = torch.randn(2, width).to(dtype)
    table = {
        "segmented_topk": dict(scores=values, k=g(1, 4), offsets=offsets, mask=torch.rand(total) > 0.3,
                               largest=bool(g(0, 1))),
        "beam_prune": dict(scores=values, k=g(1, 3), offsets=offsets, finished=torch.rand(total) > 0.5,
                           lengths=torch.randint(1, 30, (total,)), length_penalty=rng.choice([0.0, 1.0]),
                           dedup_keys=torch.randint(0, 3, (total,)), refill_to=g(0, 6)),
        "effective_sample_size": dict(log_weights=values, offsets=offsets),
        "resample": dict(log_weights=values, num_samples=g(1, 5), offsets=nonempty_offsets,
                         method=rng.choice(["systematic", "multinomial", "stratified", "residual"]), seed=seed),
        "vote": dict(answer_keys=torch.randint(0, 3, (total,)), scores=values.abs(), offsets=offsets,
                     method=rng.choice(["majority", "weighted"]), mask=torch.rand(total) > 0.2),
        "sequence_keys": dict(token_ids=torch.randint(0, 50, (total,)), offsets=offsets),
        "aggregate_steps": dict(step_scores=values.sigmoid(), offsets=offsets,
                                method=rng.choice(["last", "min", "prod", "mean", "max", "logit_sum"]), empty=0.0),
        "prm_step_scores": dict(hidden_states=hidden, step_positions=positions, head_weight=head,
                                head_bias=torch.randn(2).to(dtype), positive_index=g(0, 1), activation="softmax"),
        "prm_scores": dict(hidden_states=hidden, step_positions=positions, head_weight=head, offsets=offsets,
                           head_bias=None, positive_index=0, activation="softmax", method="min", empty=0.0),
        "cosine_scores": dict(embeddings=torch.randn(total, width).to(dtype), references=torch.randn(width).to(dtype),
                              offsets=None),
        "ensemble_scores": dict(scores=torch.randn(2, total), offsets=offsets, method=rng.choice(["rank", "zscore"]),
                                weights=torch.tensor([1.0, 0.5])),
        "ddim_step": dict(sample=x, model_output=v, alpha_prod_t=rng.uniform(0.2, 0.6),
                          alpha_prod_t_prev=rng.uniform(0.6, 0.9), eta=rng.choice([0.0, 1.0]), seed=seed,
                          prediction_type=rng.choice(["epsilon", "sample", "v_prediction"]),
                          clip_sample_range=rng.choice([None, 1.0])),
        "flow_euler_step": dict(sample=x, velocity=v, sigma=torch.rand(shape[0]), sigma_next=rng.uniform(0, 0.5),
                                **({"seed": seed, "stochastic": True} if g(0, 1) else {})),
        "flow_heun_step": dict(sample=x, velocity=v, velocity_next=v.flip(0), sigma=0.7, sigma_next=0.4),
        "renoise": dict(sample=x, level_from=0.4, level_to=0.6, schedule="flow", seed=seed),
        "randn": dict(shape=(g(0, 5), g(1, 7)), seed=seed, offset=g(0, 2**40), dtype=dtype),
        "zo_neighbors": dict(pivot=x, num_neighbors=g(1, 4), cos_sim=rng.uniform(-1, 1), seed=seed),
    }
    return getattr(fastsearch, op), table[op]


def make_case(op: str, index: int, seed: int):
    """Case ``index`` of ``op``: ``(function, kwargs, mutated argument or None, mutation name or None)``.
    Deterministic in (op, index, seed), so that the parent and every worker build the same call."""
    import torch

    import fastsearch

    rng = random.Random(f"{seed}:{op}:{index}")
    torch.manual_seed(rng.randint(0, 2**31))
    function, kwargs = _valid(torch, fastsearch, op, rng)
    if index % 4 == 0:  # a quarter of the cases stay valid
        return function, kwargs, None, None
    name = rng.choice(sorted(kwargs))
    value = kwargs[name]
    if isinstance(value, torch.Tensor):
        builders = _tensor_mutations(torch, value)
        mutation = rng.choice(sorted(builders))
        try:
            replacement = builders[mutation](value)
        except (RuntimeError, IndexError, TypeError, ValueError):  # not buildable from this tensor (empty ...)
            mutation, replacement = "none", None
    else:
        mutation = rng.choice(sorted(SCALAR_MUTATIONS))
        replacement = SCALAR_MUTATIONS[mutation]
        if replacement == "tensor_0d":
            replacement = torch.tensor(value if isinstance(value, int | float) and value is not None else 1)
        elif replacement == "tensor_1d":
            replacement = torch.tensor([0.5, 0.5])
    return function, {**kwargs, name: replacement}, name, mutation


# -- the worker ----------------------------------------------------------------------------------------


def _summary(result):
    """A backend's result as plain CPU tensors (a tuple of them), for comparison in the worker."""
    import torch

    if isinstance(result, torch.Tensor):
        return (result.detach().cpu(),)
    return tuple(None if part is None else part.detach().cpu() for part in result)  # None: an output left out


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_cuda_emulation() -> None:
    """tests/cuda_emu: the CUDA kernels compiled for the host (once per process; FASTSEARCH_CUDA_EMU=0: never)."""
    from fastsearch import _backend

    if _backend._cuda_emulation is not None or os.environ.get("FASTSEARCH_CUDA_EMU", "1") == "0":
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu"))
    import emulation

    emulation.load()


def _worker(conn, seed: int) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import warnings

    warnings.filterwarnings("ignore")
    while True:
        message = conn.recv()
        if message is None:
            return
        op, index, backend = message
        if backend == "cuda" and not _has_gpu():
            _load_cuda_emulation()  # the CUDA kernels on CPU tensors, as in the test suite
        try:
            function, kwargs, _, _ = make_case(op, index, seed)
            result = ("ok", _summary(function(**kwargs, backend=backend)))
        except Exception as error:  # noqa: BLE001 - every failure is classified by the parent
            result = ("raised", type(error).__name__, str(error)[:300])
        except BaseException:  # noqa: BLE001
            result = ("raised", "BaseException", traceback.format_exc()[-300:])
        try:
            conn.send(result)
        except Exception as error:  # noqa: BLE001 - an unpicklable result
            conn.send(("raised", "Unpicklable", str(error)[:300]))


class Worker:
    """One process that runs cases for one backend; restarted after a crash or a hang."""

    def __init__(self, seed: int):
        self.seed = seed
        self.context = mp.get_context("spawn")
        self.process = None

    def start(self) -> None:
        self.conn, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, args=(child, self.seed), daemon=True)
        self.process.start()

    def run(self, op: str, index: int, backend: str):
        if self.process is None or not self.process.is_alive():
            self.start()
        self.conn.send((op, index, backend))
        if self.conn.poll(TIMEOUT_S):
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                pass
        reason = "hang" if self.process.is_alive() else f"exit code {self.process.exitcode}"
        self.process.kill()
        self.process.join()
        self.process = None
        return ("crash", reason)

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.conn.send(None)
            self.process.join(10)


def _same(got, want) -> bool:
    import torch

    if len(got) != len(want):
        return False
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            if a is not b:
                return False
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.is_floating_point:
            tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(a.dtype, 1e-4)
            if not torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True):
                return False
        elif not torch.equal(a, b):
            return False
    return True


def _names_argument(message: str, argument: str | None) -> bool:
    """The message names the argument as a word (``k`` in "k must be ...", not in "kernel")."""
    return argument is not None and re.search(rf"(?<![A-Za-z0-9_]){re.escape(argument)}(?![A-Za-z0-9_])",
                                              message) is not None


def classify(results: dict, argument: str | None, arguments: tuple[str, ...] = ()) -> tuple[str, str]:
    """The case's outcome from every backend's result (the reference's under "torch") and a one-line why.

    An error is clear when it is a ValueError or TypeError naming the mutated ``argument``, or another of the
    op's ``arguments`` (a mismatch between two arguments may be named by either: an empty ``scores`` against
    its ``offsets``)."""
    crashed = {b: r for b, r in results.items() if r[0] == "crash"}
    if crashed:
        return "crash", ", ".join(f"{b}: {r[1]}" for b, r in crashed.items())
    raised = {b: r for b, r in results.items() if r[0] == "raised"}
    if raised and len(raised) < len(results):
        return "unclear", "raises on " + ", ".join(f"{b} ({r[1]}: {r[2][:80]})" for b, r in raised.items()) + \
            " but returns on " + ", ".join(b for b in results if b not in raised)
    if raised:
        bad = {b: r for b, r in raised.items() if r[1] not in ("ValueError", "TypeError") or argument is None
               or not any(_names_argument(r[2], name) for name in (argument, *arguments))}
        if bad:
            b, r = next(iter(bad.items()))
            return "unclear", f"{b}: {r[1]}: {r[2][:120]}"
        return "clear error", ""
    reference = results["torch"][1]
    wrong = [b for b, r in results.items() if b != "torch" and not _same(r[1], reference)]
    if wrong:
        return "silent wrong", f"differs from the reference on {wrong}"
    return "agrees", ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases-per-op", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", default="", help="comma-separated subset of the ops")
    parser.add_argument("--report", default="", help="write every non-agreeing case to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from helpers import backends_for

    if not _has_gpu():
        _load_cuda_emulation()
    ops = [op for op in (args.ops.split(",") if args.ops else OPS)]
    backends = backends_for("cpu")
    workers = {backend: Worker(args.seed) for backend in backends}
    counts, per_op, findings = Counter(), {op: Counter() for op in ops}, []
    began = time.time()
    try:
        for op in ops:
            for index in range(args.cases_per_op):
                function, kwargs, argument, mutation = make_case(op, index, args.seed)
                results = {backend: workers[backend].run(op, index, backend) for backend in backends}
                outcome, why = classify(results, argument, tuple(kwargs))
                counts[outcome] += 1
                per_op[op][outcome] += 1
                if outcome not in ("agrees", "clear error"):
                    findings.append({"op": op, "index": index, "argument": argument, "mutation": mutation,
                                     "outcome": outcome, "why": why})
            print(f"{op:22} " + "  ".join(f"{o}={per_op[op][o]}" for o in OUTCOMES), flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    total = sum(counts.values())
    print(f"\n{total} inputs tried on backends {backends} ({len(ops)} ops, seed {args.seed}, "
          f"{time.time() - began:.0f} s): " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES))
    for finding in findings[:40]:
        print(f"  {finding['outcome']}: {finding['op']} case {finding['index']} ({finding['argument']} -> "
              f"{finding['mutation']}): {finding['why']}")
    if args.report:
        with open(args.report, "w") as handle:
            json.dump({"counts": dict(counts), "per_op": {op: dict(c) for op, c in per_op.items()},
                       "findings": findings}, handle, indent=1)
    return 1 if counts["unclear"] or counts["crash"] or counts["silent wrong"] else 0


OPS = ("segmented_topk", "beam_prune", "effective_sample_size", "resample", "vote", "sequence_keys",
       "aggregate_steps", "prm_step_scores", "prm_scores", "cosine_scores", "ensemble_scores", "ddim_step",
       "flow_euler_step", "flow_heun_step", "renoise", "randn", "zo_neighbors")

if __name__ == "__main__":
    sys.exit(main())
