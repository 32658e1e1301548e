"""Every kernel of one backend, once each, on small inputs and on the large-group paths.

Made for ``compute-sanitizer`` (``make gpu-check`` runs it under memcheck, racecheck and synccheck with
``--backend cuda``): short, deterministic, and every op's result is compared with the reference so that a
kernel that runs clean but wrong still fails. ``--backend cpu`` (or ``triton`` with TRITON_INTERPRET=1) runs
the same calls here, and ``--backend cuda --cuda-emulation`` runs the CUDA kernels on the host emulation of
tests/cuda_emu: that is how this script is checked without a GPU (tests/test_gpu_check.py).

Exit status: 0 when every call matches the reference, 1 otherwise (each mismatch printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fastsearch


def _ragged(sizes, device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64, device=device)


def calls(device: str):
    """(name, function of backend) pairs covering every op; the large groups take the kernels' big-group paths
    (more candidates than one tile, ranks over several blocks)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    x, v = rand(3, 4, 16, 16), rand(3, 4, 16, 16)
    levels = (torch.rand(3, generator=g) * 0.8 + 0.1).to(device)
    sizes = [7, 0, 1500, 9000, 33]  # an empty group, and groups past one tile
    offsets = _ragged(sizes, device)
    total = int(offsets[-1])
    scores, log_w = rand(total), rand(total)
    keys = torch.randint(0, 40, (total,), generator=g).to(device)
    full = _ragged([s for s in sizes if s], device)
    hidden, head = rand(600, 96), rand(2, 96)
    positions = torch.randint(0, 600, (50,), generator=g).sort().values.to(device)
    step_offsets = _ragged([10, 0, 25, 15], device)
    embeddings, references = rand(total, 32), rand(len(sizes), 32)
    yield "ddim_step", lambda b: fastsearch.ddim_step(x, v, levels, levels * 0.9, eta=1.0, seed=1, backend=b)
    yield "flow_euler_step", lambda b: fastsearch.flow_euler_step(x, v, 0.7, 0.5, seed=2, stochastic=True, backend=b)
    yield "flow_heun_step", lambda b: fastsearch.flow_heun_step(x, v, v, levels, levels * 0.5, backend=b)
    yield "renoise", lambda b: fastsearch.renoise(x, 0.3, 0.6, schedule="flow", seed=3, backend=b)
    yield "randn", lambda b: fastsearch.randn((5, 999), seed=4, device=device, backend=b)
    yield "zo_neighbors", lambda b: fastsearch.zo_neighbors(x, 5, cos_sim=0.9, seed=5, backend=b)
    yield "segmented_topk", lambda b: fastsearch.segmented_topk(scores, 8, offsets=offsets, backend=b)
    yield "beam_prune", lambda b: fastsearch.beam_prune(
        scores, 6, offsets=offsets, finished=keys % 7 == 0, lengths=keys + 1, length_penalty=0.8,
        dedup_keys=keys, refill_to=12, backend=b)
    yield "resample", lambda b: fastsearch.resample(log_w, 64, offsets=full, seed=6, backend=b)
    yield "effective_sample_size", lambda b: fastsearch.effective_sample_size(log_w, offsets=offsets, backend=b)
    yield "vote", lambda b: fastsearch.vote(keys, scores, offsets=offsets, method="weighted", backend=b)
    yield "sequence_keys", lambda b: fastsearch.sequence_keys(keys, offsets=offsets, backend=b)
    yield "prm_scores", lambda b: fastsearch.prm_scores(hidden, positions, head, offsets=step_offsets, method="min",
                                                        empty=0.0, backend=b)
    yield "aggregate_steps", lambda b: fastsearch.aggregate_steps(scores.sigmoid(), offsets=offsets,
                                                                  method="logit_sum", empty=0.0, backend=b)
    yield "cosine_scores", lambda b: fastsearch.cosine_scores(embeddings, references, offsets=offsets,
                                                              backend=b)
    yield "ensemble_scores", lambda b: fastsearch.ensemble_scores(torch.stack([scores, log_w]), offsets=offsets,
                                                                  method="rank", backend=b)


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for item in result for t in _flat(item)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", help="the backend whose kernels run (default: cuda)")
    parser.add_argument("--device", default=None, help="default: cuda for cuda/triton with a GPU, else cpu")
    parser.add_argument("--cuda-emulation", action="store_true",
                        help="run the cuda backend on CPU tensors through tests/cuda_emu (no GPU needed)")
    args = parser.parse_args(argv)
    if args.cuda_emulation:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "cuda_emu"))
        import emulation

        emulation.load()
    device = args.device or ("cuda" if args.backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu")
    failures = 0
    for name, call in calls(device):
        got, want = _flat(call(args.backend)), _flat(call("torch"))
        before = failures
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            a, b = a.cpu(), b.cpu()
            if a.dtype.is_floating_point:
                same = a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4,
                                                             equal_nan=True)
            else:
                same = torch.equal(a, b)
            if not same:
                failures += 1
                print(f"{name} output {index}: {args.backend} differs from the reference")
        print(f"{name}: {'ok' if failures == before else 'MISMATCH'}")
    print(f"kernel_smoke: {failures} mismatches on backend {args.backend} ({device})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
