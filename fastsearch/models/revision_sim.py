"""SIMULATION of a model that revises its own attempts (for :class:`~fastsearch.models.reasoning.SimulatedGenerator`).

No language model is involved. Snell et al. (2024, sec. 6) fine-tune a model to revise: shown its earlier
attempts at a problem, it writes a new one. What they report, and what this simulation reproduces:

- A revision is right more often than a first attempt, and more so the more earlier attempts it sees; the
  gain is large on easy problems and small on hard ones.
- A revision sometimes breaks a right answer (about 38 % of right answers turn wrong in their chains,
  before any selection), so the last attempt of a chain is not the best one to take.
- A revision of a wrong attempt tends to keep its approach: on hard problems it often repeats the wrong
  answer, which is why hard problems want several independent chains (parallel compute) beside the
  revisions (sequential compute).

The simulated generator calls these functions with the state it reads from a prompt: how many earlier
attempts the prompt shows (``seen``) and whether the most recent one was right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastsearch.checks import check_float


@dataclass(frozen=True)
class RevisionModel:
    """The simulated effect of earlier attempts in a prompt on the next attempt (a simulation).

    With ``seen`` >= 1 earlier attempts shown, on a problem of difficulty d with L steps:

    - every step's error rates (visible errors and trap falls) are multiplied by
      ``1 - gain * (1 - d) * (1 - saturation ** seen)``: up to ``gain`` fewer errors on the easiest problems,
      none fewer on the hardest; with the default saturation 3/4 of the gain with one earlier attempt
      shown, 15/16 of it with two.
    - when the most recent attempt was right, each step makes a visible error with an extra probability
      that totals ``break_rate * (0.5 + d)`` over the L steps (the revision breaks the right answer; on
      average over difficulties, ``break_rate``).
    - when the most recent attempt was wrong, the first step repeats its mistake (the attempt ends in the
      same wrong answer, looking as right or wrong as it did) with probability ``anchor * d^2``.

    The defaults make about 38 % of right attempts turn wrong in the next revision on
    :func:`~fastsearch.models.reasoning.make_problems`' mix of difficulties, the share the paper reports.

    Args:
        gain: error reduction at difficulty 0 with many earlier attempts, in [0, 1].
        break_rate: chance that a revision of a right attempt makes a visible error, in [0, 1].
        anchor: chance that a revision of a wrong attempt repeats it, at difficulty 1, in [0, 1].
        saturation: how fast the gain saturates with the number of earlier attempts shown, in [0, 1].
    """

    gain: float = 0.9
    break_rate: float = 0.3
    anchor: float = 1.0
    saturation: float = 0.25

    def __post_init__(self):
        for name in ("gain", "break_rate", "anchor", "saturation"):
            check_float(name, getattr(self, name), low=0.0, high=1.0)

    def error_scale(self, difficulty: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """[S] factor on every step's error rates (1 where ``seen`` is 0)."""
        return 1.0 - self.gain * (1.0 - difficulty) * (1.0 - self.saturation ** seen.astype(np.float64))

    def break_per_step(self, difficulty: np.ndarray, last_right: np.ndarray, num_steps: np.ndarray) -> np.ndarray:
        """[S] extra visible-error rate per step of a revision whose most recent attempt was right."""
        total = np.minimum(self.break_rate * (0.5 + difficulty), 1.0)
        per_step = 1.0 - (1.0 - total) ** (1.0 / np.maximum(num_steps, 1))
        return np.where(last_right, per_step, 0.0)

    def anchor_probability(self, difficulty: np.ndarray, last_wrong: np.ndarray) -> np.ndarray:
        """[S] chance that a revision repeats its most recent (wrong) attempt."""
        return np.where(last_wrong, self.anchor * difficulty**2, 0.0)
