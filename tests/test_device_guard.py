"""Every Triton launch runs on the device of its op's tensors (issue 12, finding 3).

Triton launches on the *current* CUDA device, whatever device the arguments live on, so each launcher in
``fastsearch.kernels`` makes its first tensor's device current (``kernels/_device.py``). No GPU is needed
here: the guard is checked with FakeTensors on ``cuda:1`` and a stand-in for ``torch.cuda.device`` that
records which device it makes current, and every launch of every kernel, reached through the public ops
under the interpreter, is checked to happen while that device is current.
"""

import inspect

import pytest
import torch
from test_op_api import _calls
from torch._subclasses.fake_tensor import FakeTensorMode

import fastsearch
from fastsearch import _backend
from fastsearch.kernels import _device, noise, score, select, steps

OP_MODULES = (noise, score, select, steps)


class RecordedDevice:
    """Stands in for ``torch.cuda.device``: keeps a stack of the devices made current."""

    current: list[int] = []

    def __init__(self, device):
        self.index = torch.device(device).index

    def __enter__(self):
        RecordedDevice.current.append(self.index)

    def __exit__(self, *exc):
        RecordedDevice.current.pop()
        return False


@pytest.fixture
def recorded_device(monkeypatch):
    RecordedDevice.current = []
    monkeypatch.setattr(torch.cuda, "device", RecordedDevice)
    return RecordedDevice


@pytest.mark.parametrize("index", [0, 1, 3])
def test_guard_makes_the_tensor_device_current(recorded_device, index):
    seen = []

    @_device.launches_on_tensor_device
    def launcher(tensor, extra, *, flag):
        seen.append((list(recorded_device.current), extra, flag))
        return "result"

    with FakeTensorMode():
        tensor = torch.empty(4, device=f"cuda:{index}")
    assert launcher(tensor, 7, flag=True) == "result"
    assert seen == [([index], 7, True)]
    assert recorded_device.current == []  # restored on the way out


def test_guard_restores_the_device_after_an_error(recorded_device):
    @_device.launches_on_tensor_device
    def launcher(tensor):
        raise ValueError("bad launch")

    with FakeTensorMode():
        tensor = torch.empty(4, device="cuda:2")
    with pytest.raises(ValueError, match="bad launch"):
        launcher(tensor)
    assert recorded_device.current == []


def test_cpu_tensors_take_no_guard(monkeypatch):
    def no_cuda(device):
        raise AssertionError(f"torch.cuda.device({device}) entered for a CPU tensor")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    assert _device.launch_device(torch.zeros(2)) is None
    guarded = _device.launches_on_tensor_device(lambda tensor: tensor.sum())
    assert guarded(torch.ones(3)).item() == 3.0


def test_every_public_launcher_is_guarded():
    """A launcher is a public function of an op module; each one must carry the guard."""
    for module in OP_MODULES:
        launchers = [name for name, value in vars(module).items()
                     if inspect.isfunction(value) and not name.startswith("_")
                     and inspect.unwrap(value).__module__ == module.__name__]
        assert launchers, module.__name__
        for name in launchers:
            assert getattr(getattr(module, name), "launches_on_tensor_device", False), f"{module.__name__}.{name}"


class _RecordingKernel:
    """Wraps a Triton kernel: records the current (recorded) device at every launch, then launches it."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, list(RecordedDevice.current)))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _kernels(module):
    return {name: value for name, value in vars(module).items() if name.endswith("_kernel") and hasattr(value, "fn")}


@pytest.mark.skipif(not _backend.has_triton("cpu"), reason="triton is not installed")
def test_every_kernel_launch_runs_on_the_ops_device(monkeypatch, recorded_device):
    """Every op's Triton kernels launch inside the guard, on the device of the op's tensors.

    The tensors are CPU tensors (the interpreter runs the kernels); ``launch_device`` is told that they
    live on ``cuda:1``, so a launch outside the guard, or inside a guard for another device, shows up as a
    launch with another current device.
    """
    launches = []
    expected = set()
    for module in OP_MODULES:
        for name, kernel in _kernels(module).items():
            monkeypatch.setattr(module, name, _RecordingKernel(f"{module.__name__}.{name}", kernel, launches))
            expected.add(f"{module.__name__}.{name}")
    monkeypatch.setattr(_device, "launch_device", lambda tensor: torch.device("cuda", 1))

    calls = _calls("cpu")
    for name, (args, kwargs) in calls.items():
        getattr(fastsearch, name)(*args, **kwargs, backend="triton")
    # The variants the table above does not reach: dense aggregation, steps that draw noise from a seed.
    fastsearch.aggregate_steps(torch.rand(3, 4), method="mean", backend="triton")
    sample = calls["ddim_step"][0][0]
    fastsearch.ddim_step(sample, sample, 0.5, 0.7, eta=1.0, seed=1, backend="triton")
    fastsearch.flow_euler_step(sample, sample, 0.5, 0.3, stochastic=True, seed=1, backend="triton")

    assert launches, "no Triton kernel ran"
    wrong = [(name, current) for name, current in launches if current != [1]]
    assert not wrong, f"launched outside the op's device: {wrong}"
    assert {name for name, _ in launches} == expected
