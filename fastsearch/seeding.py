"""Seeds: the one valid range, the one way to derive a seed for each use, and the names of those uses.

A search is a deterministic function of its ``seed``: every random draw it makes (initial noises, sampler
steps, zero-order neighbours, re-noising, resampling, generator calls) takes its own seed
``derive_seed(seed, stream, *index)``, where ``stream`` is a :class:`Stream` and ``index`` says which draw
of that kind (round, step, call number). The kernels turn a seed into Gaussian noise with the
Philox4x32-10 stream of ``csrc/common/philox.h``.
"""

from __future__ import annotations

import enum

import torch

MAX_SEED = 1 << 63  # seeds are in [0, 2**63): an int64 on every backend
# Stream positions are in [0, 2**63): a draw of n normals from ``offset`` reads positions offset ... offset + n - 1,
# so it needs 0 <= offset and offset + n <= 2**63 (an int64 index on every backend, never wrapping around).
STREAM_LENGTH = 1 << 63
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


class Stream(enum.IntEnum):
    """What a derived seed is for. Each use has its own value, so no two uses share draws."""

    NOISE = 0  # initial noises (diffusion), keyed by round or candidate
    STEPS = 1  # stochastic sampler steps (diffusion), keyed by round
    NEIGHBORS = 2  # zero-order neighbours, keyed by round
    RENOISE = 3  # re-noising for search over paths, keyed by round
    RESAMPLE = 4  # particle resampling (FK steering, particle filtering), keyed by step
    STEP_NOISE = 5  # noise a pipeline's scheduler step draws under a search, keyed by step
    GENERATE = 6  # LLM generator calls, keyed by call number
    PROBE = 7  # compute-optimal: the difficulty probe
    FIT = 8  # compute-optimal: fitting the policy, keyed by budget and strategy
    SEARCH = 9  # compute-optimal: the searches it runs, keyed by strategy


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int in [0, 2**63); a 0-d integer tensor is accepted. TypeError / ValueError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        if isinstance(seed, torch.Tensor) and seed.dim() == 0 and not seed.is_floating_point() \
                and seed.dtype != torch.bool:
            seed = int(seed)
        else:
            raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return seed


def check_offset(offset, numel: int, name: str = "offset") -> int:
    """``offset`` as an int with ``[offset, offset + numel)`` inside the stream ``[0, 2**63)``.

    A 0-d integer tensor is accepted; TypeError / ValueError naming ``name`` otherwise.
    """
    if isinstance(offset, torch.Tensor) and offset.dim() == 0 and not offset.is_floating_point() \
            and offset.dtype != torch.bool:
        offset = int(offset)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{name} must be an int, got {type(offset).__name__}")
    if not 0 <= offset < STREAM_LENGTH:
        raise ValueError(f"{name} must be in [0, 2**63), got {offset}")
    if offset + numel > STREAM_LENGTH:
        raise ValueError(f"{name} + the number of elements must be at most 2**63 (the stream's length), got {name}="
                         f"{offset} for {numel} elements")
    return offset


def fresh_seed() -> int:
    """A seed drawn from torch's default generator, so ``torch.manual_seed`` makes runs repeatable."""
    return int(torch.randint(0, MAX_SEED - 1, (), dtype=torch.int64))


def resolve_seed(seed, name: str = "seed") -> int:
    """``seed`` checked, or a :func:`fresh_seed` when it is None."""
    return fresh_seed() if seed is None else check_seed(seed, name)


def derive_seed(seed: int, *keys: int) -> int:
    """A child seed in [0, 2**63) for the use named by ``keys`` (a :class:`Stream`, then indices).

    A splitmix64 chain: each key is added (times the golden ratio) to the state, which is then mixed, so
    distinct key sequences give unrelated seeds and the same sequence always gives the same seed.
    """
    state = seed & _MASK64
    for key in keys:
        state = (state + _GOLDEN * (int(key) + 1)) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state >> 1
