"""What a verifier spent, and the base class that counts it.

A verifier is any ``verifier(images, **kwargs) -> [B]`` callable. One that also has a ``cost`` attribute holding a
:class:`VerifierCost` (a running total) is metered: the searches read it before and after they run and report
the difference beside their own NFEs (``NoiseSearchResult.verifier_cost``).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastsearch.checks import check_callable


@dataclass(frozen=True)
class VerifierCost:
    """Compute a verifier spent: calls, images scored and wall-clock seconds.

    Ma et al. 2025 count a verifier's forward passes beside the generator's NFEs: ``images`` is that count (an
    :class:`~fastsearch.verifiers.Ensemble` sums its members', so V verifiers scoring B images count V x B).

    Attributes:
        calls: how many times the verifier was called (an ensemble: its members' calls, summed).
        images: images (or samples) scored.
        seconds: wall-clock time inside the verifier (CUDA work is waited for before the clock stops).
    """

    calls: int = 0
    images: int = 0
    seconds: float = 0.0

    def __add__(self, other: VerifierCost) -> VerifierCost:
        if not isinstance(other, VerifierCost):
            return NotImplemented
        return VerifierCost(self.calls + other.calls, self.images + other.images, self.seconds + other.seconds)

    def __sub__(self, other: VerifierCost) -> VerifierCost:
        if not isinstance(other, VerifierCost):
            return NotImplemented
        return VerifierCost(self.calls - other.calls, self.images - other.images, self.seconds - other.seconds)


def cost_of(verifier) -> VerifierCost | None:
    """The running total of a metered verifier (one with a :class:`VerifierCost` ``cost``), else None."""
    cost = getattr(verifier, "cost", None)
    return cost if isinstance(cost, VerifierCost) else None


def _wait_for(output) -> None:
    if isinstance(output, torch.Tensor) and output.is_cuda:
        torch.cuda.synchronize(output.device)


class MeteredVerifier(abc.ABC):
    """Base class of the shipped verifiers: counts calls, images and seconds of every call in :attr:`cost`.

    Subclasses implement ``score(images, **kwargs) -> [B]`` and :meth:`count` (how many images a call holds);
    calling the verifier runs ``score`` under the meter.
    """

    def __init__(self):
        self._cost = VerifierCost()

    @property
    def cost(self) -> VerifierCost:
        """The running total since construction (or :meth:`reset_cost`)."""
        return self._cost

    def reset_cost(self) -> None:
        self._cost = VerifierCost()

    def count(self, images) -> int:
        """Images in a call's ``images`` (a tensor's first dimension, or a sequence's length)."""
        if isinstance(images, torch.Tensor):
            return images.shape[0] if images.dim() else 1
        try:
            return len(images)
        except TypeError:
            return 1

    @abc.abstractmethod
    def score(self, images, *args, **kwargs) -> torch.Tensor:
        """The scores of one call ([B]); :meth:`__call__` counts its cost."""

    def __call__(self, images, *args, **kwargs) -> torch.Tensor:
        start = time.perf_counter()
        scores = self.score(images, *args, **kwargs)
        _wait_for(scores)
        self._cost = self._cost + VerifierCost(1, self.count(images), time.perf_counter() - start)
        return scores


class Metered(MeteredVerifier):
    """Any ``verifier(images, **kwargs) -> [B]`` callable with its compute counted in :attr:`cost`.

    Example:
        >>> brightness = Metered(lambda images: images.mean(dim=(1, 2, 3)))
        >>> brightness(torch.rand(4, 3, 8, 8)); brightness.cost
        VerifierCost(calls=1, images=4, seconds=...)
    """

    def __init__(self, verifier: Callable):
        super().__init__()
        self.verifier = check_callable("verifier", verifier)

    def score(self, images, *args, **kwargs) -> torch.Tensor:
        return self.verifier(images, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Metered({self.verifier!r})"
