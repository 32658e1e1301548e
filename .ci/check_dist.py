"""The wheel is the product: build it from a clean copy of the checkout and use it as a user would.

Run by `make dist-check` (part of `make test`) with the project's virtual environment:

1. copies the files git tracks or would track (no build outputs, no .venv) into a temporary folder;
2. `python -m build --no-isolation` there: an sdist, then a wheel built from that sdist, so the sdist is
   checked to build on its own (this is what `pip install fastsearch-*.tar.gz --no-build-isolation` does);
3. creates a fresh virtual environment holding only torch and fastsearch's declared dependencies, and
   installs the wheel into it (not editable);
4. checks the wheel's file list against the source tree: every module of fastsearch/ and kernels/ is in
   it, and nothing is installed at the top level but `fastsearch` (no `kernels` package to shadow the
   hub's);
5. from outside the source tree, runs `check_installed.py` in that environment (imports every
   subpackage, loads the compiled kernels, runs an op, a best-of-N and a random search) and
   `fastsearch info`.

Exits non-zero, naming what failed, if any step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folders and the package each one installs as.
PACKAGE_ROOTS = {"fastsearch": "fastsearch", "kernels": "fastsearch.kernels"}


def run(*cmd, cwd=None, env=None, log: Path | None = None) -> None:
    """Runs a command, failing on a non-zero exit; with ``log``, its output goes there (the tail is shown on
    failure) rather than to the terminal."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    if log is None:
        subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, check=True)
        return
    with open(log, "w") as out:
        done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        print("".join(open(log).readlines()[-60:]), flush=True)
        sys.exit(f"check_dist: {cmd[0]} ... exited with {done.returncode} (--keep keeps its whole output, {log.name})")


def source_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    # links stay links (fastsearch/kernels points at kernels/); deleted but tracked files are left out
    return sorted({f for f in listed if f and ((ROOT / f).is_symlink() or (ROOT / f).is_file())})


def expected_modules(files: list[str]) -> tuple[list[str], list[str]]:
    """The installed paths of every Python file of the packages, and every package name, from the tree."""
    paths, packages = [], set()
    for f in files:
        top, _, rest = f.partition("/")
        if top not in PACKAGE_ROOTS or not f.endswith(".py"):
            continue
        package = ".".join([PACKAGE_ROOTS[top], *Path(rest).parent.parts])
        packages.add(package)
        paths.append("/".join([*PACKAGE_ROOTS[top].split("."), rest]))
    return sorted(paths), sorted(packages)


def check_wheel_contents(wheel: Path, expected_paths: list[str]) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    if tops != {"fastsearch"}:
        sys.exit(f"check_dist: the wheel installs {sorted(tops)} at the top level; only 'fastsearch' may be there")
    missing = sorted(set(expected_paths) - set(names))
    if missing:
        sys.exit(f"check_dist: the wheel lacks {len(missing)} module(s) of the source tree: {missing}")
    if not any(n.startswith("fastsearch/_C") and n.endswith((".so", ".pyd")) for n in names):
        sys.exit("check_dist: the wheel holds no compiled extension fastsearch/_C*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", default="torch==2.13.0", help="pip requirement for torch in the fresh venv")
    parser.add_argument("--constraints", default=None, help="pip constraints file for the fresh venv")
    parser.add_argument("--python", default=None, help="base interpreter of the fresh venv (default: this one's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    start = time.monotonic()
    constraint = ["-c", str(Path(args.constraints).resolve())] if args.constraints else []

    work = Path(tempfile.mkdtemp(prefix="fastsearch-dist-"))
    try:
        src, dist, venv = work / "src", work / "dist", work / "venv"
        files = source_files()
        for f in files:
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / f).is_symlink():
                os.symlink(os.readlink(ROOT / f), src / f)
            else:
                shutil.copy2(ROOT / f, src / f)
        run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src, log=work / "build.log")
        sdists, wheels = sorted(dist.glob("fastsearch-*.tar.gz")), sorted(dist.glob("fastsearch-*.whl"))
        if len(sdists) != 1 or len(wheels) != 1:
            sys.exit(f"check_dist: expected one sdist and one wheel, got {sdists + wheels}")

        paths, packages = expected_modules(files)
        check_wheel_contents(wheels[0], paths)

        base = args.python or getattr(sys, "_base_executable", sys.executable)
        run(base, "-m", "venv", venv)
        pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        run(*pip, *constraint, args.torch)
        run(*pip, *constraint, wheels[0])

        # Outside the source tree, with no stray paths: what a user's script sees.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FASTSEARCH_", "TRITON_"))}
        outside = work / "user"
        outside.mkdir()
        run(venv / "bin" / "python", ROOT / ".ci" / "check_installed.py", json.dumps(packages), str(ROOT),
            cwd=outside, env=env)
        run(venv / "bin" / "fastsearch", "info", cwd=outside, env=env)
    finally:
        if args.keep:
            print(f"check_dist: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"check_dist: the sdist and wheel build from a clean copy and work when installed "
          f"({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
