"""Build and load the CUDA kernels for the host, on the emulation of ``tests/cuda_emu/include`` (a test tool).

``load()`` compiles ``csrc/cuda/*.cu`` (rewritten: launches and ``__shared__`` declarations, see ``rewrite``)
with the host compiler against the emulation headers, together with the unchanged CUDA bindings
(``csrc/cuda/*_binding.cpp``) and the scheduler (``src/runtime.cpp``), into one library that registers every
CUDA op as ``fastsearch_cuda_emu::<op>`` for CPU tensors; it then points ``fastsearch._backend`` at it, so
that ``backend="cuda"`` on CPU tensors runs the emulated kernels. The build is cached under
``build/cuda_emu`` (ninja rebuilds what changed), or where ``FASTSEARCH_CUDA_EMU_BUILD`` says.

Run as a script to build only: ``python tests/cuda_emu/emulation.py``.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
# FASTSEARCH_CUDA_EMU_ASAN=1: an AddressSanitizer build (heap and globals; the fibers' stacks are left
# uninstrumented, --param=asan-stack=0) for a process started with asan_environment(): a kernel that reads or
# writes past a tensor's memory is reported and the process aborts (tests/test_cuda_emulation.py runs the
# cuda-backend cases of the suite that way).
ASAN = os.environ.get("FASTSEARCH_CUDA_EMU_ASAN") == "1"
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer", "--param=asan-stack=0"] if ASAN else []
BUILD = Path(os.environ.get("FASTSEARCH_CUDA_EMU_BUILD", ROOT / "build" / ("cuda_emu_asan" if ASAN else "cuda_emu")))
NAMESPACE = "fastsearch_cuda_emu"

_SHARED_LINE = re.compile(r"__shared__\s+(?P<type>[^;{}=]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\]\s*)*);")
_SHARED_AGGREGATE = re.compile(r"__shared__\s+(?P<kind>union|struct)\s*\{")


class RewriteError(ValueError):
    pass


def _matching(text: str, start: int, opening: str, closing: str) -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == opening:
            depth += 1
        elif text[index] == closing:
            depth -= 1
            if depth == 0:
                return index + 1
    raise RewriteError(f"unbalanced {opening}{closing} from offset {start}")


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression (``name``, ``ns::name<args>``) that ends just before ``end``."""
    index = end
    while index > 0 and text[index - 1].isspace():
        index -= 1
    if text[index - 1] == ">":  # template arguments
        depth = 0
        while True:
            index -= 1
            if text[index] == ">":
                depth += 1
            elif text[index] == "<":
                depth -= 1
                if depth == 0:
                    break
    while index > 0 and (text[index - 1].isalnum() or text[index - 1] in "_:"):
        index -= 1
    return index


def _keep_lines(old: str, new: str) -> str:
    """``new`` padded with the line breaks it lacks against ``old``: later lines keep their numbers."""
    return new + "\n" * max(0, old.count("\n") - new.count("\n"))


def rewrite_launches(text: str) -> str:
    """``kernel<<<grid, block, shared, stream>>>(args)`` -> ``::fs_emu::launch(::fs_emu::config(grid, block,
    shared, stream), kernel, args)``."""
    while (open_at := text.find("<<<")) >= 0:
        close_at = text.find(">>>", open_at)
        if close_at < 0:
            raise RewriteError("<<< without >>>")
        config = text[open_at + 3:close_at]
        start = _kernel_start(text, open_at)
        kernel = text[start:open_at].strip()
        paren = close_at + 3
        while text[paren].isspace():
            paren += 1
        if text[paren] != "(":
            raise RewriteError(f"launch of {kernel} without arguments")
        end = _matching(text, paren, "(", ")")
        arguments = text[paren + 1:end - 1].strip()
        call = f"::fs_emu::launch(::fs_emu::config({config}), {kernel}{', ' + arguments if arguments else ''})"
        text = text[:start] + _keep_lines(text[start:end], call) + text[end:]
    return text


def rewrite_shared(text: str, file_id: int) -> str:
    """Each ``__shared__`` declaration -> a reference to per-block storage (``fs_emu::shared_var``)."""
    counter = 0

    def next_id() -> int:
        nonlocal counter
        counter += 1
        return file_id * 1000 + counter

    while (match := _SHARED_AGGREGATE.search(text)) is not None:
        body_end = _matching(text, match.end() - 1, "{", "}")
        tail = re.match(r"\s*(\w+)\s*;", text[body_end:])
        if tail is None:
            raise RewriteError(f"__shared__ {match['kind']} without a name at offset {match.start()}")
        ident = next_id()
        type_name = f"FsEmuShared{ident}"
        body = text[match.end() - 1:body_end]
        replacement = (f"{match['kind']} {type_name} {body}; "
                       f"auto& {tail[1]} = ::fs_emu::shared_var<{type_name}, {ident}>();")
        text = (text[:match.start()] + _keep_lines(text[match.start():body_end + tail.end()], replacement)
                + text[body_end + tail.end():])

    def single(match: re.Match) -> str:
        dims = re.sub(r"\s+", "", match["dims"])
        return f"auto& {match['name']} = ::fs_emu::shared_var<{match['type'].strip()}{dims}, {next_id()}>();"

    text = _SHARED_LINE.sub(single, text)
    if "__shared__" in text:
        line = text[:text.index("__shared__")].count("\n") + 1
        raise RewriteError(f"a __shared__ declaration of a form the rewriter does not know, line {line}")
    return text


def strip_comments(text: str) -> str:
    """Comments removed (line breaks kept), so that the rewriting sees code only."""
    text = re.sub(r"/\*.*?\*/", lambda match: "\n" * match[0].count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def rewrite(text: str, file_id: int) -> str:
    return rewrite_shared(rewrite_launches(strip_comments(text)), file_id)


def sources() -> list[Path]:
    """The rewritten .cu files (written to BUILD/src when they change), the bindings and the scheduler.

    Besides csrc/cuda/*.cu: src/defects.cu, the emulation's own test kernels (``fs_emu_defects::run``).
    """
    out_dir = BUILD / "src"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    kernels = sorted((CSRC / "cuda").glob("*.cu")) + [HERE / "src" / "defects.cu"]
    for file_id, source in enumerate(kernels, start=1):
        target = out_dir / f"{source.stem}.cu.cpp"
        text = f'#line 1 "{source}"\n' + rewrite(source.read_text(), file_id)
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
        written.append(target)
    bindings = sorted((CSRC / "cuda").glob("*_binding.cpp"))
    return written + bindings + [HERE / "src" / "runtime.cpp"]


def build(verbose: bool = False) -> Path:
    """Compile (as needed) and load the library; returns its path."""
    from torch.utils import cpp_extension

    define_schemas()
    BUILD.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    return Path(cpp_extension.load(
        name="fastsearch_cuda_emu", sources=[str(path) for path in sources()],
        extra_include_paths=[str(HERE / "include"), str(CSRC)],
        extra_cflags=["-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas", *ASAN_FLAGS],
        extra_ldflags=ASAN_FLAGS,
        build_directory=str(BUILD), is_python_module=False, verbose=verbose))


_lib = None


def asan_environment() -> dict[str, str]:
    """Variables for a Python process that loads the AddressSanitizer build: libasan must come first, and
    libstdc++ with it (Python does not link it, and ASan's C++ exception interceptor needs it)."""
    import subprocess

    def library(name: str) -> str:
        path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path):
            raise RuntimeError(f"gcc does not find {name} (install the compiler's AddressSanitizer runtime)")
        return path

    return {"FASTSEARCH_CUDA_EMU_ASAN": "1", "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
            "LD_PRELOAD": f"{library('libasan.so')} {library('libstdc++.so')}"}


def _as_original(original, *args, **kwargs):
    return original(*args, **kwargs)


def define_schemas():
    """The schemas of every fastsearch op the CUDA bindings implement, copied into ``fastsearch_cuda_emu``."""
    global _lib
    import torch

    import fastsearch.ops  # noqa: F401  (defines the fastsearch ops)

    if _lib is not None:
        return
    _lib = torch.library.Library(NAMESPACE, "DEF")
    for name in torch._C._dispatch_get_all_op_names():
        namespace, _, op = name.partition("::")
        if namespace != "fastsearch" or "." in op or op.endswith(("_triton", "_triton_out")):
            continue
        for schema in torch._C._jit_get_schemas_for_operator(name):
            overload = schema.overload_name or "default"
            original = getattr(getattr(torch.ops.fastsearch, op), overload)
            _lib.define(str(schema).split("::", 1)[1], tags=tuple(original.tags))
            # Under torch.compile the emulated op traces as the original does (its fake implementation).
            torch.library.register_fake(getattr(getattr(getattr(torch.ops, NAMESPACE), op), overload),
                                        functools.partial(_as_original, original), lib=_lib)


def load():
    """Build, load and switch the emulation on; returns the ``torch.ops.fastsearch_cuda_emu`` namespace."""
    import torch

    from fastsearch import _backend

    build()
    namespace = getattr(torch.ops, NAMESPACE)
    _backend._cuda_emulation = namespace
    return namespace


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
