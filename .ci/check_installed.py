"""Uses an installed (non-editable) fastsearch as a user would; run by check_dist.py in a fresh venv.

Arguments: a JSON list of every package name the source tree has, and the source tree's path (which
no imported module may come from).
"""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

packages, source_root = json.loads(sys.argv[1]), Path(sys.argv[2]).resolve()


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"check_installed: {what}")


for name in packages:
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        # an adapter whose library is an optional extra must say which extra to install
        check(name.startswith("fastsearch.integrations.") and "pip install 'fastsearch[" in str(error),
              f"importing {name} failed: {error!r}")
        print(f"check_installed: {name} needs an extra: {error}")
        continue
    where = Path(module.__path__[0]).resolve()
    check(source_root not in where.parents, f"{name} was imported from the source tree ({where})")
    check("site-packages" in where.parts, f"{name} is not installed in site-packages ({where})")

# The hub's `kernels` is not installed here, and the wheel must not provide a top-level one either.
check(importlib.util.find_spec("kernels") is None, "a top-level 'kernels' module is importable")

import fastsearch  # noqa: E402
from fastsearch import _backend  # noqa: E402

check(_backend.has_cpu(), f"the compiled CPU kernels did not load: {_backend.extension_error()}")
importlib.import_module("fastsearch._C")

scores = torch.tensor([[0.3, 0.9, 0.1, 0.9, 0.5], [2.0, -1.0, 4.0, 0.0, 1.0]])
top = fastsearch.segmented_topk(scores, 2, backend="cpu")
values, indices = top
check(indices.tolist() == [[1, 3], [2, 0]], f"segmented_topk on the cpu backend gave {indices.tolist()}")
check(torch.equal(values, torch.tensor([[0.9, 0.9], [4.0, 2.0]])), f"segmented_topk values {values.tolist()}")

from fastsearch.models import gmm, reasoning  # noqa: E402
from fastsearch.search import best_of_n  # noqa: E402

problems = reasoning.make_problems(3, seed=0)
result = best_of_n([p.text for p in problems], reasoning.SimulatedGenerator(), reasoning.SimulatedPRM(), n=4,
                   answer_fn=reasoning.extract_answer, seed=0)
check(len(result.answers) == 3 and result.spent.generator_calls == 1,
      f"best_of_n returned {len(result.answers)} answers for 3 problems with {result.spent}")

from fastsearch.diffusion import FlowSampler, random_search  # noqa: E402

mixture = gmm.rare_mode_mixture(2)
found = random_search(mixture.flow_model(), gmm.ModeLogDensity(mixture), FlowSampler(4), (2,), num_candidates=3,
                      num_prompts=2, seed=0, progress=False)
check(found.nfe == 3 * 4 and tuple(found.sample.shape) == (2, 2), f"random_search spent {found.nfe} NFEs")

print(f"check_installed: {len(packages)} packages import from {Path(fastsearch.__file__).parent}, the CPU kernels "
      "run, best_of_n and random_search work")
