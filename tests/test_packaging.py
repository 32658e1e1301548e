"""Packaging: the repository's Triton folder never shadows an installed package, the test pins are complete.

`make test` runs the suite as `python -m pytest` from the repository root, so the root is on sys.path here
exactly as it is for any script or REPL a user starts there. transformers >= 5.25 imports the Hugging
Face hub's `kernels` package; a regular package named `kernels` at the root used to win over it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT_KERNELS = ROOT / "kernels"


def _python_at_root(code: str) -> subprocess.CompletedProcess:
    """Runs `python -c code` with the repository root as the working directory (so on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _is_project_folder(spec) -> bool:
    places = [spec.origin] if spec.origin else []
    places += list(spec.submodule_search_locations or [])
    return any(Path(p).resolve() == PROJECT_KERNELS or PROJECT_KERNELS in Path(p).resolve().parents
               for p in places if p)


def test_the_triton_folder_is_no_regular_package():
    assert PROJECT_KERNELS.is_dir()
    assert not (PROJECT_KERNELS / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a regular package that shadows the hub's `kernels` "
        "for any process started at the repository root")


def test_hub_kernels_is_installed_for_this_suite():
    # Without it the checks below would pass for the wrong reason.
    assert importlib.metadata.version("kernels")


def test_find_spec_kernels_from_the_root_is_not_the_project_folder():
    out = _python_at_root(
        "import importlib.util, json, sys\n"
        "assert sys.path[0] == '', sys.path[:2]\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps([spec.origin, list(spec.submodule_search_locations or [])] if spec else None))\n")
    assert out.returncode == 0, out.stderr
    import json

    found = json.loads(out.stdout)
    assert found is not None, "the hub's kernels package is not found from the root"
    origin, locations = found
    for place in [origin, *locations]:
        if place:
            assert PROJECT_KERNELS not in [Path(place).resolve(), *Path(place).resolve().parents], place


def test_kernels_in_this_process_is_the_hub_package():
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and not _is_project_folder(spec), spec
    assert importlib.util.find_spec("fastsearch.kernels.select") is not None


def test_transformers_and_diffusers_import_with_the_hub_kernels_installed():
    out = _python_at_root(
        "import kernels, transformers\n"
        "from transformers import LlamaForCausalLM, Qwen2ForTokenClassification, CLIPModel\n"
        "import diffusers.loaders.peft\n"
        "from diffusers import UNet2DModel, DDIMScheduler, FlowMatchEulerDiscreteScheduler\n"
        "from diffusers.models import UNet2DConditionModel\n"
        "import fastsearch.kernels.select, fastsearch.kernels.steps\n"
        "print(kernels.__file__)\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(PROJECT_KERNELS) not in out.stdout


@pytest.mark.parametrize("name", ["philox", "select", "steps", "score", "noise"])
def test_triton_modules_are_reached_only_as_fastsearch_kernels(name):
    spec = importlib.util.find_spec(f"fastsearch.kernels.{name}")
    assert spec is not None and Path(spec.origin).resolve() == PROJECT_KERNELS / f"{name}.py"
    assert f"kernels.{name}" not in sys.modules


def test_constraints_pin_every_installed_distribution():
    """`make test` must be reproducible: every distribution in this environment (but torch, its CUDA
    libraries and fastsearch) is pinned in the constraints file at the version installed. The Makefile names
    the file in FASTSEARCH_CONSTRAINTS; empty there (`make test-latest`, `CONSTRAINTS=`) means unpinned."""
    constraints = os.environ.get("FASTSEARCH_CONSTRAINTS", "constraints.txt")
    if not constraints:
        pytest.skip("installed without constraints on purpose (make test-latest or CONSTRAINTS=)")
    pins = {}
    for line in (ROOT / constraints).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{constraints}: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    unpinned, drifted = [], []
    # This environment's own site-packages only: once imported, setuptools puts its vendored packages on sys.path.
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in importlib.metadata.distributions(path=site):
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in ("torch", "fastsearch") or name.startswith(("nvidia-", "cuda-")):
            continue
        if name not in pins:
            unpinned.append(name)
        elif pins[name] != dist.version:
            drifted.append(f"{name} {dist.version} (pinned {pins[name]})")
    assert not unpinned, f"installed but not in {constraints}: {sorted(unpinned)}"
    assert not drifted, f"installed at other versions than {constraints}: {sorted(drifted)}"
