"""Argument checks of the step ops (ddim_step, flow_euler_step, flow_heun_step, renoise).

The public functions convert their arguments here (``eta_arg``, ``clip_arg``, ``check_levels``); the
``check_*`` functions validate the op arguments for the Python backends (Triton, reference), with the
messages of the C++ checks in ``csrc/common/op_checks.h``.
"""

from __future__ import annotations

import math

import torch

from fastsearch.checks import check_float
from fastsearch.ops._common import check_data, check_noise, check_sample, check_schedule


def eta_arg(eta) -> float:
    """DDIM's eta: a finite number >= 0 (NaN and inf are refused; they would make every element NaN)."""
    return check_float("eta", eta, low=0.0)


def clip_arg(clip_sample_range) -> float | None:
    """None (no clipping) or a number > 0; +inf clips nothing."""
    if clip_sample_range is None:
        return None
    return check_float("clip_sample_range", clip_sample_range, low=0.0, low_open=True, finite=False)


def _eta_ok(eta: float) -> bool:
    return math.isfinite(eta) and eta >= 0


def check_ddim_step(sample, model_output, alpha_prod_t, alpha_prod_t_value, alpha_prod_t_prev,
                    alpha_prod_t_prev_value, eta, noise, seed, prediction_type, clip_sample_range,
                    use_clipped_model_output):
    check_sample(sample)
    check_data("model_output", model_output, sample)
    check_schedule("alpha_prod_t", alpha_prod_t, sample)
    check_schedule("alpha_prod_t_prev", alpha_prod_t_prev, sample)
    if not _eta_ok(eta):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    check_noise(noise, seed, sample, required=eta > 0)
    if prediction_type not in (0, 1, 2):
        raise ValueError(f"prediction_type must be 0 (epsilon), 1 (sample) or 2 (v_prediction), got {prediction_type}")
    if clip_sample_range is not None and not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be positive, got {clip_sample_range}")


def check_flow_euler_step(sample, velocity, sigma, sigma_value, sigma_next, sigma_next_value, noise, seed,
                          stochastic):
    check_sample(sample)
    check_data("velocity", velocity, sample)
    check_schedule("sigma", sigma, sample)
    check_schedule("sigma_next", sigma_next, sample)
    if not stochastic and (noise is not None or seed is not None):
        raise ValueError("the deterministic Euler step takes no noise; pass stochastic=True to use it")
    check_noise(noise, seed, sample, required=stochastic)


def check_flow_heun_step(sample, velocity, velocity_next, sigma, sigma_value, sigma_next, sigma_next_value):
    check_sample(sample)
    check_data("velocity", velocity, sample)
    check_data("velocity_next", velocity_next, sample)
    check_schedule("sigma", sigma, sample)
    check_schedule("sigma_next", sigma_next, sample)


def check_renoise(sample, level_from, level_from_value, level_to, level_to_value, schedule, noise, seed):
    check_sample(sample)
    check_schedule("level_from", level_from, sample)
    check_schedule("level_to", level_to, sample)
    if schedule not in (0, 1):
        raise ValueError(f"schedule must be 0 (vp) or 1 (flow), got {schedule}")
    check_noise(noise, seed, sample, required=True)


def _first_bad(ok: torch.Tensor, values: torch.Tensor) -> float:
    return float(values.reshape(-1)[(~ok).reshape(-1).nonzero()[0, 0]])


def check_levels(schedule: int, start, start_value: float, end, end_value: float) -> None:
    """Re-noising goes from a cleaner level to a noisier one, both in range (so finite: NaN and +-inf are
    refused). Levels on a GPU are checked too, at the cost of one device sync (a bad level would otherwise give
    NaN or a wrong sample without a word).

    - vp (alpha_prod, noisier is smaller): ``0 < level_from <= 1`` and ``0 <= level_to <= level_from``.
    - flow (sigma, noisier is larger): ``0 <= level_from < 1`` and ``level_from <= level_to <= 1``.
    """
    # on the CPU: the levels are [B] at most, and mixed devices are the op's error to report, named, not this one's
    start = torch.tensor(start_value, dtype=torch.float32) if start is None else start.detach().float().cpu()
    end = torch.tensor(end_value, dtype=torch.float32) if end is None else end.detach().float().cpu()
    start, end = torch.broadcast_tensors(start, end)
    # Written so that NaN fails every comparison, and so every test.
    if schedule == 0:
        ok_from = (start > 0) & (start <= 1)
        ok_to = (end >= 0) & (end <= start)
        from_rule, to_rule = ("an alpha_prod in (0, 1] for schedule='vp'",
                              "in [0, level_from] for schedule='vp' (noisier: alpha_prod_to <= alpha_prod_from)")
    else:
        ok_from = (start >= 0) & (start < 1)
        ok_to = (end >= start) & (end <= 1)
        from_rule, to_rule = ("a sigma in [0, 1) for schedule='flow'",
                              "in [level_from, 1] for schedule='flow' (noisier: sigma_from <= sigma_to <= 1)")
    if not bool(ok_from.all()):
        raise ValueError(f"level_from must be {from_rule}, got {_first_bad(ok_from, start)}")
    if not bool(ok_to.all()):
        raise ValueError(f"level_to must be {to_rule}, got {_first_bad(ok_to, end)}")
