"""The inference schedules of diffusers' DDIM and flow-matching schedulers, computed the way diffusers does."""

from __future__ import annotations

import numpy as np
import torch

from fastsearch.checks import check_choice

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
TIME_SHIFT_TYPES = ("exponential", "linear")


def ddim_timesteps(num_train_timesteps: int, num_steps: int, timestep_spacing: str = "leading",
                   steps_offset: int = 0) -> torch.Tensor:
    """The timesteps of diffusers' ``DDIMScheduler.set_timesteps``: int64 [num_steps], descending."""
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif timestep_spacing == "leading":
        ratio = num_train_timesteps // num_steps
        timesteps = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    else:
        ratio = num_train_timesteps / num_steps
        timesteps = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    return torch.from_numpy(timesteps)


def _shifted(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps: int, *, shift: float = 1.0, num_train_timesteps: int = 1000, mu: float | None = None,
                time_shift_type: str = "exponential", shift_terminal: float | None = None) -> torch.Tensor:
    """The sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (float32 [num_steps], without
    the final 0), computed the way diffusers does (numpy float64, then float32).

    The training grid's end points (``sigma_max``, ``sigma_min``) carry the static shift, then the inference
    grid is shifted again, exactly as diffusers computes it. With ``mu`` (dynamic shifting), the grid is
    unshifted and ``time_shift(mu, 1, sigma)`` is applied instead; ``shift_terminal`` stretches the result so
    that it ends at that value.
    """
    if mu is not None:
        check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
    train = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
    train = train / num_train_timesteps
    if mu is None:
        train = _shifted(train, shift)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = sigmas / num_train_timesteps
    if mu is None:
        sigmas = _shifted(sigmas, shift)
    elif time_shift_type == "exponential":
        sigmas = np.exp(mu) / (np.exp(mu) + (1 / sigmas - 1))
    else:
        sigmas = mu / (mu + (1 / sigmas - 1))
    if shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    return torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
