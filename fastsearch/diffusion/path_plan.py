"""The plan of search over paths on an N-step schedule: where branching starts and what each round runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PathPlan:
    """Search over paths on an N-step schedule (built by :meth:`fastsearch.diffusion.PathsSearch.plan`).

    Attributes:
        num_steps: N.
        start: the state where branching starts (the first stretch denoises states 0 to ``start``).
        rounds: per round ``(state, renoised, following)``: the kept paths at ``state`` are re-noised back to the
            noisier state ``renoised`` and denoised to ``following`` (N in the last round).
    """

    num_steps: int
    start: int
    rounds: tuple[tuple[int, int, int], ...]

    @classmethod
    def build(cls, num_steps: int, start: int, forward_interval: int, backward_interval: int) -> PathPlan:
        rounds, current = [], start
        while current < num_steps:
            renoised = max(current - forward_interval, 0)
            following = min(renoised + backward_interval, num_steps)
            rounds.append((current, renoised, following))
            current = following
        return cls(num_steps, start, tuple(rounds))

    def path_cost(self, sampler, branches: int) -> int:
        """NFEs of one path under ``sampler``: its first stretch, then ``branches`` branches in every round."""
        return sampler.nfe(0, self.start) + branches * sum(sampler.nfe(renoised, following)
                                                           for _, renoised, following in self.rounds)

    def evaluations(self) -> tuple[list[int], dict[int, int]]:
        """The plan as one sequence of steps (a pipeline call that goes back to noisier states).

        Returns:
            ``(states, selections)``: the state stepped from at each position, and the positions after which a
            selection and re-noising follow, each mapped to the round it starts.
        """
        states = list(range(self.start))
        selections = {len(states) - 1: 0}
        for index, (_, renoised, following) in enumerate(self.rounds):
            states.extend(range(renoised, following))
            if following < self.num_steps:
                selections[len(states) - 1] = index + 1
        return states, selections
