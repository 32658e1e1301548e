"""The pin check of the separate test environments (`make vllm-test`, `make ray-test`): every distribution
installed there but torch is pinned in the environment's constraints file, at the installed version."""

from __future__ import annotations

import importlib.metadata
import re
import sysconfig
from pathlib import Path


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def unpinned_and_drifted(constraints: Path, skip: tuple[str, ...] = ("torch",)) -> tuple[list[str], list[str]]:
    """``(installed but not pinned, installed at another version than pinned)`` for this interpreter's
    site-packages against ``constraints`` (``name==version`` lines; ``#`` comments)."""
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            if not version:
                raise ValueError(f"{constraints}: {line!r} is not an exact pin")
            pins[_normalized(name)] = version
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    unpinned, drifted = [], []
    for dist in importlib.metadata.distributions(path=site):
        name = _normalized(dist.metadata["Name"])
        if name in skip:
            continue
        if name not in pins:
            unpinned.append(name)
        elif pins[name] != dist.version:
            drifted.append(f"{name} {dist.version} (pinned {pins[name]})")
    return sorted(unpinned), sorted(drifted)
