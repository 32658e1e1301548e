"""Dataset scale-out on Ray Data for real (`make ray-test`, in its own environment with ray[data] installed)."""

from __future__ import annotations

from pathlib import Path

import ray
from env_pins import unpinned_and_drifted

from fastsearch.demos import ray_dataset


def test_ray_data_actors_give_one_process_answers():
    on_ray, alone = ray_dataset.run(num_problems=12, actors=2)
    assert len(on_ray) == 12 and on_ray == alone
    assert not ray.is_initialized()  # the cluster it started is shut down


def test_the_demo_runs_as_documented(capsys):
    ray_dataset.main()
    assert "answers equal one process's" in capsys.readouterr().out


def test_constraints_pin_every_installed_distribution():
    """`make ray-test` is reproducible: everything installed but torch (and the venv's own pip and setuptools) is
    pinned in tests/ray/constraints.txt."""
    unpinned, drifted = unpinned_and_drifted(Path(__file__).resolve().parent / "constraints.txt",
                                             skip=("torch", "pip", "setuptools"))
    assert not unpinned, f"installed but not in tests/ray/constraints.txt: {unpinned}"
    assert not drifted, f"installed at other versions than tests/ray/constraints.txt: {drifted}"
