"""One search's candidates spread over every GPU (or CPU process) of a torchrun job, and a dataset's problems
spread over the same ranks. Launch with

    torchrun --nproc-per-node 2 -m fastsearch.demos.distributed

(one process per GPU with NCCL when CUDA is there, else gloo on the CPU). Rank 0 prints the results, which equal
what one process computes with the same seed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fastsearch.diffusion import FlowSampler, fk_steering
from fastsearch.models import gmm, reasoning
from fastsearch.search import beam_search


def main() -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    group = dist.group.WORLD
    try:
        # FK steering: 256 particles split over the ranks, weights and resampling exact on every rank
        mixture = gmm.rare_mode_mixture(64, device=device)
        result = fk_steering(mixture.flow_model(), gmm.ModeLogDensity(mixture), FlowSampler(10, stochastic=True),
                             (64,), num_particles=256, resample_every=1, seed=0, device=device, progress=False,
                             group=group)
        # beam search over a dataset: each rank searches its share of the problems with its own models
        problems = [p.text for p in reasoning.make_problems(16, seed=0)]
        answers = beam_search(problems, reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), n=8, beam_width=2,
                              max_steps=8, seed=0, answer_fn=reasoning.extract_answer, group=group).answers
        if dist.get_rank() == 0:
            print(f"{dist.get_world_size()} ranks: FK best score {result.score.tolist()}, {result.total_nfe} NFEs; "
                  f"beam search answers {answers}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
