"""Every Triton kernel compiles for an H100 (sm_90) without a GPU, within its budgets (tests/sm90_compile.py).

Checked for every launch the ops make, with the block sizes and warp counts they pick on a GPU:
- it compiles (the interpreter forgives what the compiler refuses);
- ptxas spills no register (SPILL_BUDGET_BYTES);
- kernels whose results every backend must give to the bit (the selection kernels, and randn's normals, which
  the seeded ops promise equal to ``randn``) hold no approximate single- or half-precision instruction
  (``sqrt.approx.f32``, ``ex2.approx.f32``, ...). An ``.approx.ftz.f64`` instruction only ever seeds the
  Newton steps of libdevice's double-precision routines, whose results are not approximate, so it passes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SPILL_BUDGET_BYTES = 0
# Kernels whose results are promised equal across backends, bit for bit.
EQUAL_RESULTS = re.compile(r"^(select(_large)?\.\w+|noise\._randn_fill_kernel)$")
APPROXIMATE = re.compile(r"\.approx(\.ftz)?\.(f32|f16|bf16|f16x2|bf16x2)$")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(TESTS / "sm90_compile.py"), "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"sm90_compile.py wrote no report (exit {run.returncode}):\n{run.stdout[-3000:]}"
                    f"\n{run.stderr[-3000:]}")
    return json.loads(out.read_text())


def test_every_case_launches_a_kernel(report):
    assert report["failed_cases"] == {}


def test_every_kernel_is_compiled(report):
    compiled = {launch["kernel"] for launch in report["launches"] if launch["error"] is None}
    assert set(report["kernels"]) - compiled == set()
    assert len(report["kernels"]) >= 22  # the launchers' kernels: a drop means the recorder missed some


def test_no_compile_error(report):
    errors = [f"{launch['kernel']} [{launch['case']}]: {launch['error']}" for launch in report["launches"]
              if launch["error"] is not None]
    assert errors == []


def test_no_register_spills(report):
    spills = [(launch["kernel"], launch["case"], launch["spill_bytes"]) for launch in report["launches"]
              if launch["error"] is None and launch["spill_bytes"] > SPILL_BUDGET_BYTES]
    assert spills == []


def test_no_approximate_instructions_where_backends_must_agree(report):
    approximate = [(launch["kernel"], launch["case"], instruction) for launch in report["launches"]
                   if EQUAL_RESULTS.match(launch["kernel"])
                   for instruction in launch["approx"] if APPROXIMATE.search(instruction)]
    assert approximate == []
