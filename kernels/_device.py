"""Every Triton launch runs on the device of its op's tensors.

A Triton launch goes to the *current* CUDA device (``triton.runtime.jit`` asks the driver for the current
device and that device's current stream; it never looks at the arguments' devices), so an op on tensors
on ``cuda:1`` launched while ``cuda:0`` is current would run its kernel on the wrong GPU with pointers it
cannot read. Each launcher here is wrapped by :func:`launches_on_tensor_device`, which makes the device of
the launcher's first tensor argument current for the duration of the call (``torch.cuda.device``, which
also selects that device's current stream for Triton) and restores the previous one afterwards. CPU
tensors (the interpreter) take no guard at all, so the CPU path pays one attribute read.
"""

import contextlib
import functools

import torch


def launch_device(tensor: torch.Tensor) -> torch.device | None:
    """The CUDA device a launch over ``tensor`` must run on, or None when ``tensor`` is not on a GPU."""
    device = tensor.device
    return device if device.type == "cuda" else None


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that makes ``tensor``'s CUDA device current (a no-op context for other tensors)."""
    device = launch_device(tensor)
    return contextlib.nullcontext() if device is None else torch.cuda.device(device)


def launches_on_tensor_device(launcher):
    """Wrap a launcher whose first argument is a tensor of the op so that its kernels run on its device.

    The op runner has checked that every tensor argument is on the first tensor's device
    (``fastsearch/ops/_common.py``, ``check_readable``), so the first tensor speaks for all of them.
    """

    @functools.wraps(launcher)
    def guarded(first, *args, **kwargs):
        with device_guard(first):
            return launcher(first, *args, **kwargs)

    guarded.launches_on_tensor_device = True
    return guarded
