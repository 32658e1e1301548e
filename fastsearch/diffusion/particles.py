"""FK steering's bookkeeping: potentials, log-weights and ESS-triggered resampling of particles."""

from __future__ import annotations

import torch

import fastsearch
from fastsearch.diffusion.core import best_index, selectable
from fastsearch.diffusion.options import FKSteering
from fastsearch.seeding import Stream, derive_seed


class ParticleWeights:
    """Potentials and log-weights of S slots x n particles (slot-major rows), with their ESS-triggered resampling.

    Each :meth:`update` takes the scores of a scoring step and returns that step's history entry; after an
    intermediate one, :meth:`resample` resamples the slots whose effective sample size fell below
    ``ess_threshold * n`` and returns the flat ancestor of every row, by which the caller reorders its particles.
    Resampling after step ``s`` draws from seed ``derive_seed(seed, Stream.RESAMPLE, s)``.
    """

    def __init__(self, slots: int, particles: int, options: FKSteering, seed: int, device: torch.device):
        self.slots, self.particles = slots, particles
        self.potential, self.lam, self.ess_threshold = options.potential, options.lam, options.ess_threshold
        self.seed = seed
        rows = slots * particles
        # the potential's running statistic of each path, the log-weights, and the log of the product of the
        # potentials applied so far (which the final potential divides out)
        self.statistic = torch.full((rows,), -torch.inf if self.potential == "max" else 0.0, device=device)
        self.log_weights = torch.zeros(rows, device=device)
        self.log_potential_total = torch.zeros(rows, device=device)
        self.identity = torch.arange(rows, device=device).view(slots, particles)

    def update(self, scores: torch.Tensor, *, step: int, nfe: int, final: bool) -> dict:
        """Apply the potentials of [S * n] ``scores`` (the final samples' when ``final``); returns the history
        entry ``{"step", "nfe", "scores", "log_weights", "ess": None, "resampled", "ancestors": None,
        "best_score"}``."""
        reward = selectable(scores)
        lam = self.lam
        if final:
            increment = lam * reward - self.log_potential_total
        elif self.potential == "max":
            self.statistic = torch.maximum(self.statistic, reward)
            increment = lam * self.statistic
        elif self.potential == "add":
            self.statistic = self.statistic + reward
            increment = lam * self.statistic
        elif self.potential == "diff":
            increment = lam * (reward - self.statistic)
            self.statistic = reward
        else:
            increment = lam * reward
        increment = selectable(increment)  # lam = 0 times -inf, or -inf - -inf, count as impossible
        self.log_weights = selectable(self.log_weights + increment)
        self.log_potential_total = self.log_potential_total + increment
        grouped_scores = scores.view(self.slots, self.particles)
        return {"step": step, "nfe": nfe, "scores": grouped_scores,
                "log_weights": self.log_weights.view(self.slots, self.particles).clone(), "ess": None,
                "resampled": torch.zeros(self.slots, dtype=torch.bool, device=scores.device),
                "ancestors": None, "best_score": grouped_scores.flatten()[best_index(grouped_scores)]}

    def resample(self, entry: dict) -> torch.Tensor | None:
        """Resample (systematic) the slots whose ESS is low, after an intermediate :meth:`update` whose ``entry``
        gets ``"ess"``, ``"resampled"`` and ``"ancestors"``. Returns the [S * n] flat ancestor of every row, or
        None when no slot resamples; resampled slots restart their log-weights at 0."""
        grouped = self.log_weights.view(self.slots, self.particles)
        ess = fastsearch.effective_sample_size(grouped)
        alive = torch.isfinite(grouped).any(dim=1)
        resampled = (ess < self.ess_threshold * self.particles) & alive
        entry["ess"], entry["resampled"] = ess, resampled
        if not bool(resampled.any()):
            return None
        drawn = fastsearch.resample(torch.where(alive[:, None], grouped, torch.zeros_like(grouped)), self.particles,
                                    method="systematic", seed=derive_seed(self.seed, Stream.RESAMPLE, entry["step"]))
        ancestors = torch.where(resampled[:, None], drawn, self.identity)
        entry["ancestors"] = ancestors
        flat = ancestors.flatten()
        self.statistic = self.statistic[flat]
        self.log_potential_total = self.log_potential_total[flat]
        self.log_weights = torch.where(resampled.repeat_interleave(self.particles), 0.0, self.log_weights[flat])
        return flat
