"""The communication share of FK steering over a process group: 256 particles on 2 gloo processes (CPU).

    PYTHONPATH=. python benchmarks/distributed_fk.py [--world-size 2] [--particles 256] [--dim 64]

Prints, per rank, the median wall time of a 10-step run and the share spent inside collectives, and the same
search on one process for comparison.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastsearch.bench import diffusion


def _rank(rank: int, world_size: int, store_path: str, particles: int, dim: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        results.put((rank, diffusion.fk_communication_share(dist.group.WORLD, particles, dim=dim)))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--dim", type=int, default=diffusion.DIM, help="the mixture's dimension (model cost)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mixture = diffusion.gmm.rare_mode_mixture(args.dim)
    model, verifier = mixture.flow_model(), diffusion.gmm.ModeLogDensity(mixture)
    sampler = diffusion.FlowSampler(diffusion.NUM_STEPS, stochastic=True)
    walls = []
    for _ in range(4):
        begin = time.perf_counter()
        diffusion.fk_steering(model, verifier, sampler, (args.dim,), num_particles=args.particles,
                              resample_every=1, num_prompts=1, seed=0, progress=False)
        walls.append(time.perf_counter() - begin)
    print(f"one process: {args.particles} particles, d = {args.dim}, {diffusion.NUM_STEPS} steps: "
          f"median wall {sorted(walls[1:])[1] * 1e3:.1f} ms")
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        ranks = [context.Process(target=_rank, args=(r, args.world_size, store, args.particles, args.dim, results))
                 for r in range(args.world_size)]
        for process in ranks:
            process.start()
        report = dict(results.get(timeout=600) for _ in ranks)
        for process in ranks:
            process.join()
    for rank in sorted(report):
        row = report[rank]
        print(f"rank {rank}/{args.world_size}: wall {row['wall_s'] * 1e3:.1f} ms, in collectives "
              f"{row['comm_s'] * 1e3:.1f} ms = {row['comm_share']:.1%} ({row['collectives']} collectives, "
              f"{row['resampled_steps']} resampling steps)")


if __name__ == "__main__":
    main()
