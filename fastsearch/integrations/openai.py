"""A ``Generator`` over an OpenAI-compatible ``/v1/completions`` server: vLLM, SGLang, ``transformers serve``,
llama.cpp, OpenAI itself.

One search step is one :meth:`OpenAIGenerator.generate` call: one HTTP request per prompt (asking for its ``n``
samples), all in flight together under a semaphore of ``max_concurrency``. HTTP, timeouts and the retries of
429 / 5xx answers and of connection errors (backoff 0.5 s doubling to 8 s, or the server's ``Retry-After``) are
the ``openai`` package's (:class:`openai.AsyncOpenAI`); a retried request's answer replaces its failed attempt,
so each prompt gets exactly ``n`` completions and nothing is counted twice.

Exact token counts and ``finished``, per server kind (``server=``):

============  =====================================================================================================
kind          what is sent and read
============  =====================================================================================================
``vllm``      sends ``include_stop_str_in_output`` and ``return_token_ids``; ``num_tokens = len(choice.token_ids)``
              (the EOS included; ``usage`` sums all choices); ``finished`` when ``finish_reason == "stop"`` and
              ``stop_reason`` is None (end of sequence) or an int (a stop token: one of the model's extra
              end-of-sequence tokens); a str ``stop_reason`` is the stop string met, ``"length"`` is ``max_tokens``.
``sglang``    sends ``no_stop_trim`` and ``logprobs=0``; ``num_tokens = len(choice.logprobs.tokens)``; ``finished``
              when ``finish_reason == "stop"`` and ``matched_stop`` is not a str (SGLang gives the EOS token id).
              From SGLang's API; not exercised against a real SGLang server.
``transform`` ``transformers serve``: it ignores ``n`` and refuses unknown fields, so one request per sample with
``ers``       ``n=1``, with ``generation_config='{"do_sample": true}'`` when ``temperature > 0`` (it samples only when
              the model's generation config says so; top-k / top-p stay the model's), no other extra field;
              ``num_tokens = usage.completion_tokens`` (that request's generated tokens, the EOS included); its text
              keeps the stop string (cut right after it); ``finish_reason == "length"`` is the ``max_tokens`` limit,
              ``"stop"`` with a stop string in the text a stop string, else the EOS. It matches stop strings on
              prompt and completion together: a stop string that begins in the prompt (``"\\n"`` generated after
              a prompt ending with ``"\\n"``) is met too, where vLLM would go on.
``openai``    anything else (OpenAI, llama.cpp, proxies): sends ``logprobs=0``; ``num_tokens`` is
              ``len(choice.logprobs.tokens)``, else ``usage.completion_tokens`` for one-sample requests. Per-choice
              ``stop_reason`` / ``matched_stop`` are used when present. Otherwise a ``"stop"`` whose stop string is
              not in the text cannot be told from an end of sequence: it is taken as the stop string (appended when
              the call has exactly one), ``finished=False``, so that a search never ends an attempt early.
============  =====================================================================================================

Requests per prompt: one asking for the ``n`` samples, except with ``n_per_request=1`` (``transformers serve``, or a
server found to ignore ``n``) and at ``temperature == 0`` (vLLM refuses ``n > 1`` for greedy decoding): then ``n``
one-sample requests, so that the server's work matches the ``n`` completions a search counts.

``server="auto"`` (the default) asks ``GET /v1/models`` once: ``owned_by == "vllm"`` / ``"sglang"`` picks those
kinds, a model entry with a ``status`` field (what ``transformers serve`` lists) picks ``transformers``, anything
else ``openai``. A server that answers one choice to a request for several switches the generator to one sample
per request (``n_per_request=1``), keeping the choice it got.

Seeds: each request gets its own seed, ``derive_seed(seed, prompt_index)``, and the j-th one-sample request of a
prompt (j > 0) ``derive_seed(seed, prompt_index, j)``: vLLM and others give the same samples for the same seed
whatever the prompt, so one seed for the whole call would correlate every prompt's samples, and vLLM seeds a
request's k-th sample with ``seed + k``, so request seeds must not be consecutive either (derived seeds are spread
over the whole range). Seeds are folded into ``[0, seed_limit)``, by default ``[0, 2**31)``: vLLM and
``transformers serve`` take any int64, llama.cpp a uint32.

Usable from synchronous code (:meth:`~OpenAIGenerator.generate`, also from inside a running event loop, e.g. a
notebook) and from async code (:meth:`~OpenAIGenerator.agenerate`): both run the requests on an event loop of the
generator's own, on a background thread, which owns the HTTP client. An exception (or a cancellation) mid-step
cancels the step's other requests and waits for them to end: no task or socket outlives the call but the client's
idle keep-alive connections, which :meth:`~OpenAIGenerator.close` closes.

Needs the ``openai`` extra (``pip install fastsearch[openai]``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
import weakref
from collections.abc import Sequence
from urllib.parse import urlsplit

from fastsearch.checks import check_choice, check_float, check_int
from fastsearch.search.types import Completion, check_generate_args
from fastsearch.seeding import derive_seed

SERVER_KINDS = ("auto", "vllm", "sglang", "transformers", "openai")
_PROMPT_PREFIX = 60  # characters of a prompt an error message quotes


class OpenAIGeneratorError(RuntimeError):
    """A request of a step failed for good (after its retries): the message names the request, its prompt, the
    server's URL and the HTTP status or connection error; ``__cause__`` is the ``openai`` exception, if any.

    Attributes:
        prompt_index: index of the prompt in the ``generate`` call.
        status_code: the HTTP status of the last attempt, or None (connection error, timeout, bad answer).
    """

    def __init__(self, message: str, prompt_index: int, status_code: int | None = None):
        super().__init__(message)
        self.prompt_index = prompt_index
        self.status_code = status_code


class _FewerChoices(Exception):
    """A response with fewer choices than the request asked for (internal: retried, then reported)."""

    def __init__(self, got: int, asked: int):
        super().__init__(f"the server returned {got} choices, {asked} were asked for")
        self.got, self.asked = got, asked


def _api_root(base_url: str) -> str:
    """``base_url`` with ``/v1`` appended when it names no path (``http://host:8000`` -> ``http://host:8000/v1``)."""
    if not isinstance(base_url, str) or not base_url:
        raise TypeError(f"base_url must be a non-empty str, got {base_url!r}")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}")
    root = base_url.rstrip("/")
    return root if parts.path.strip("/") else root + "/v1"


def _cut_after_stop(text: str, stop: Sequence[str], before: str = "") -> tuple[str, str | None]:
    """``text`` cut right after the stop string that ends first in ``before + text`` past ``before`` (a match may
    begin in ``before``, the prompt's tail), and that stop string (None: none ends in ``text``)."""
    joined, start, best = before + text, len(before), None
    for candidate in stop:
        if candidate:
            position = joined.find(candidate, max(0, start - len(candidate) + 1))
            if position >= 0 and (best is None or position + len(candidate) < best[0]):
                best = (position + len(candidate), candidate)
    return (text, None) if best is None else (joined[start:best[0]], best[1])


def parse_choice(choice: dict, *, kind: str, stop: Sequence[str], usage_tokens: int | None,
                 prompt: str = "") -> Completion:
    """One response choice (a JSON dict) as a :class:`Completion`, following ``kind``'s fields (module docstring).

    Args:
        choice: ``response.choices[i]`` as a dict (with the server's extra fields).
        kind: a resolved server kind: ``"vllm"``, ``"sglang"``, ``"transformers"`` or ``"openai"``.
        stop: the call's stop strings.
        usage_tokens: ``usage.completion_tokens`` when the request asked for one sample, else None (a sum over
            the choices says nothing about each).
        prompt: the request's prompt. ``transformers serve`` matches stop strings on the prompt and the completion
            together: with ``kind="transformers"`` a stop string that begins in the prompt's tail and ends in the
            text counts as met (the text, e.g. ``"\\n"`` after a prompt ending with ``"\\n"``, does not end with it).

    Returns:
        the completion; its text ends with the stop string when generation stopped at one.

    Raises:
        ValueError: the choice carries no per-choice token count and ``usage_tokens`` is None.
    """
    text = choice.get("text") or ""
    reason = choice.get("finish_reason")
    token_ids = choice.get("token_ids")
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    if token_ids is not None:
        num_tokens = len(token_ids)
    elif tokens is not None:
        num_tokens = len(tokens)
    elif usage_tokens is not None:
        num_tokens = int(usage_tokens)
    else:
        raise ValueError(f"the {kind!r} server's choice has no per-choice token count (no token_ids, no "
                         "logprobs.tokens) and the request asked for several samples: use n_per_request=1")
    if reason != "stop":  # "length" (max_tokens), or anything else a server reports: not an end of sequence
        return Completion(_cut_after_stop(text, stop)[0], num_tokens, False)
    matched = choice.get("stop_reason", choice.get("matched_stop"))
    if isinstance(matched, str):  # the server says which stop string it met
        cut, _ = _cut_after_stop(text, [matched])
        return Completion(cut if cut.endswith(matched) else text + matched, num_tokens, False)
    tail = prompt[max(0, len(prompt) - max(map(len, stop)) + 1):] if kind == "transformers" and stop and text else ""
    cut, found = _cut_after_stop(text, stop, tail)
    if found is not None:  # the server kept the stop string in the text (transformers serve)
        return Completion(cut, num_tokens, False)
    if kind in ("vllm", "sglang", "transformers") or "stop_reason" in choice or "matched_stop" in choice:
        return Completion(text, num_tokens, True)  # no stop string met: the end of sequence (or a stop token)
    # A plain OpenAI-style server says "stop" for both: take it as the stop string (see the module docstring)
    return Completion(text + stop[0] if len(stop) == 1 else text, num_tokens, False) if stop else \
        Completion(text, num_tokens, True)


class OpenAIGenerator:
    """A ``Generator`` (:class:`fastsearch.search.Generator`) over an OpenAI-compatible ``/v1/completions`` API.

    Args:
        base_url: the server's OpenAI API root, e.g. ``"http://127.0.0.1:8000/v1"`` (``/v1`` is appended to a URL
            with no path).
        model: the model name the server knows (``GET /v1/models``).
        api_key: sent as a bearer token; default ``$OPENAI_API_KEY``, else ``"EMPTY"`` (local servers ignore it).
        max_concurrency: most requests in flight at once, over all calls of this generator.
        timeout: seconds one HTTP attempt may take before it is retried.
        max_retries: retries of an attempt that failed with 408 / 409 / 429 / 5xx, a connection error, a timeout
            or fewer choices than asked; then :class:`OpenAIGeneratorError`.
        server: ``"auto"``, ``"vllm"``, ``"sglang"``, ``"transformers"`` or ``"openai"``: which per-choice fields
            give token counts and ``finished`` (module docstring).
        n_per_request: None to ask for all ``n`` samples of a prompt in one request (where the server kind takes
            ``n``), or 1 to send ``n`` one-sample requests per prompt.
        seed_limit: request seeds are folded into ``[0, seed_limit)``.
        extra_body: more JSON fields for every request (e.g. ``{"top_k": 20}`` on vLLM).
        retry_delay: first backoff, in seconds, before retrying a response with too few choices (doubling, at
            most 8 s); HTTP retries use the ``openai`` client's own backoff.

    Example (a vLLM or SGLang server on port 8000, a process reward model ``prm`` in this process)::

        from fastsearch.integrations.openai import OpenAIGenerator
        from fastsearch.search import beam_search

        with OpenAIGenerator("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-Math-1.5B-Instruct") as generator:
            samples = generator.generate(["1 + 1 = "], n=2, stop=["\\n\\n"], temperature=0.8, max_tokens=64, seed=0)
            result = beam_search(problems, generator, prm, n=16, beam_width=4, max_steps=20, seed=0)
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_concurrency: int = 64,
                 timeout: float = 600.0, max_retries: int = 3, server: str = "auto", n_per_request: int | None = None,
                 seed_limit: int = 1 << 31, extra_body: dict | None = None, retry_delay: float = 0.5):
        self.base_url = _api_root(base_url)
        if not isinstance(model, str) or not model:
            raise TypeError(f"model must be a non-empty str, got {model!r}")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.max_concurrency = check_int("max_concurrency", max_concurrency)
        self.timeout = check_float("timeout", timeout, low=0.0, low_open=True)
        self.max_retries = check_int("max_retries", max_retries, 0)
        self.server = check_choice("server", server, SERVER_KINDS)
        if n_per_request not in (None, 1):
            raise ValueError(f"n_per_request must be None (n samples per request) or 1, got {n_per_request!r}")
        self.n_per_request = 1 if server == "transformers" else n_per_request
        self.seed_limit = check_int("seed_limit", seed_limit, 2)
        if extra_body is not None and not isinstance(extra_body, dict):
            raise TypeError(f"extra_body must be a dict or None, got {type(extra_body).__name__}")
        self.extra_body = dict(extra_body or {})
        self.retry_delay = check_float("retry_delay", retry_delay, low=0.0)
        self._kind = None if server == "auto" else server
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None
        self._semaphore: asyncio.Semaphore | None = None
        self._finalizer = None
        self._closed = False

    # ----- the background event loop and the client it owns -----

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError("this OpenAIGenerator is closed")
            if self._loop is None:
                import openai  # the optional dependency, imported where it is first needed

                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run():
                    asyncio.set_event_loop(loop)
                    ready.set()
                    loop.run_forever()

                thread = threading.Thread(target=run, name="OpenAIGenerator", daemon=True)
                thread.start()
                ready.wait()
                # the client is bound to the loop it first runs on: it is only ever used on this one
                self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout,
                                                  max_retries=self.max_retries)
                self._semaphore = asyncio.Semaphore(self.max_concurrency)
                self._loop, self._thread = loop, thread
                self._finalizer = weakref.finalize(self, _shut_down, loop, thread, self._client)
            return self._loop

    def close(self) -> None:
        """Closes the HTTP client (its connections) and stops the background loop. Idempotent."""
        with self._lock:
            self._closed = True
            finalizer, self._finalizer = self._finalizer, None
            self._loop = self._thread = self._client = None
        if finalizer is not None:
            finalizer()

    def __enter__(self) -> OpenAIGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- the Generator protocol -----

    def generate(self, prompts: Sequence[str], *, n: int = 1, stop: Sequence[str] | None = None,
                 temperature: float = 1.0, max_tokens: int = 256, seed: int | None = None) -> list[list[Completion]]:
        """Sample ``n`` completions of every prompt: blocks until all are in. Works from plain synchronous code
        and from a thread that runs an event loop (it does not touch that loop).

        Args:
            prompts: P prompt strings.
            n: completions per prompt.
            stop: stop strings (e.g. the step delimiter ``"\\n\\n"``); a completion that stops at one ends with it.
            temperature: 0 decodes greedily.
            max_tokens: most new tokens per completion.
            seed: makes the call repeatable on servers that honour seeds (module docstring: one seed per request).

        Returns:
            P lists of n :class:`fastsearch.search.Completion`.

        Raises:
            OpenAIGeneratorError: a request failed after its retries (the others were cancelled).

        Example::

            generator.generate(["Q: 2 + 2 =", "Q: 3 + 5 ="], n=4, stop=["\\n"], temperature=0.7, max_tokens=32, seed=1)
            # -> [[Completion(text=' 4\\n', num_tokens=3, finished=False), ... 4 of them], [... 4 of them]]
        """
        loop = self._ensure_loop()
        if threading.current_thread() is self._thread:
            raise RuntimeError("OpenAIGenerator.generate was called from the generator's own event loop thread; "
                               "await agenerate(...) there instead")
        future = asyncio.run_coroutine_threadsafe(
            self._generate(prompts, n=n, stop=stop, temperature=temperature, max_tokens=max_tokens, seed=seed), loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt, or the error itself: make sure nothing is left running
            future.cancel()
            raise

    async def agenerate(self, prompts: Sequence[str], *, n: int = 1, stop: Sequence[str] | None = None,
                        temperature: float = 1.0, max_tokens: int = 256,
                        seed: int | None = None) -> list[list[Completion]]:
        """:meth:`generate` for async code: awaits the step without blocking the caller's event loop; cancelling
        the awaiting task cancels the step's requests.

        Example (steps of many searches sharing one event loop, e.g. in a web server)::

            out = await generator.agenerate(prompts, n=4, stop=["\\n\\n"], temperature=0.8, max_tokens=256, seed=0)
        """
        loop = self._ensure_loop()
        coroutine = self._generate(prompts, n=n, stop=stop, temperature=temperature, max_tokens=max_tokens, seed=seed)
        if asyncio.get_running_loop() is loop:
            return await coroutine
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return await asyncio.wrap_future(future)
        finally:
            if not future.done():
                future.cancel()

    # ----- one step, on the generator's loop -----

    async def _generate(self, prompts, *, n, stop, temperature, max_tokens, seed) -> list[list[Completion]]:
        prompts, n, stop, temperature, max_tokens, seed = check_generate_args(prompts, n, stop, temperature,
                                                                              max_tokens, seed)
        if not prompts:
            return []
        if self._kind is None:
            self._kind = await self._detect_kind()
        results: list[list[Completion] | None] = [None] * len(prompts)

        async def one_prompt(index: int) -> None:
            results[index] = await self._prompt(index, prompts[index], n, stop, temperature, max_tokens, seed)

        await _all_or_nothing([one_prompt(index) for index in range(len(prompts))])
        return results

    async def _detect_kind(self) -> str:
        """The server kind, from ``GET /v1/models`` (see the module docstring); ``openai`` when that fails."""
        import openai

        try:
            page = await self._client.models.list()
        except openai.OpenAIError:
            return "openai"
        entries = [model.to_dict() for model in page.data]
        owners = {str(entry.get("owned_by", "")).lower() for entry in entries}
        if "vllm" in owners or any(isinstance(entry.get("permission"), list) and "max_model_len" in entry
                                   and "sglang" not in owners for entry in entries):
            return "vllm"  # vLLM lists its models as owned by "vllm", with permissions and max_model_len
        if "sglang" in owners:
            return "sglang"
        if any(isinstance(entry.get("status"), dict) for entry in entries):
            if self.n_per_request is None:
                self.n_per_request = 1
            return "transformers"
        return "openai"

    async def _prompt(self, index, prompt, n, stop, temperature, max_tokens, seed) -> list[Completion]:
        """The n completions of one prompt: one request for all, or one per sample (see ``n_per_request``; greedy
        decoding asks for one sample per request too: vLLM refuses ``n > 1`` at temperature 0)."""
        if self.n_per_request is None and (n == 1 or temperature > 0):
            choices = await self._request(index, prompt, n, stop, temperature, max_tokens, seed, part=0,
                                          allow_single=n > 1 and self.server == "auto")
            if len(choices) == n:
                return choices
            self.n_per_request = 1  # the server answered one choice to a request for several: it ignores n
            done = choices
        else:
            done = []
        rest = await _all_or_nothing([
            self._request(index, prompt, 1, stop, temperature, max_tokens, seed, part=part)
            for part in range(len(done), n)])
        return done + [choices[0] for choices in rest]

    async def _request(self, index, prompt, n, stop, temperature, max_tokens, seed, *, part,
                       allow_single=False) -> list[Completion]:
        """One HTTP request (with the client's retries), checked and parsed; ``part`` numbers a prompt's
        one-sample requests. With ``allow_single`` a single choice for several asked is returned as is."""
        import openai

        kind = self._kind
        body = dict(self.extra_body)
        if kind == "vllm":
            body.update(include_stop_str_in_output=True, return_token_ids=True)
        elif kind == "sglang":
            body.update(no_stop_trim=True)
        options = dict(model=self.model, prompt=prompt, n=n, max_tokens=max_tokens, temperature=temperature)
        if stop:
            options["stop"] = list(stop)
        if seed is not None:
            request_seed = derive_seed(seed, index) if part == 0 else derive_seed(seed, index, part)
            options["seed"] = request_seed % self.seed_limit
        if kind in ("sglang", "openai"):
            options["logprobs"] = 0
        if kind == "transformers":  # it refuses n; it samples only where the model's generation config says so
            options.pop("n")
            if temperature > 0:
                body["generation_config"] = json.dumps({"do_sample": True})
        attempt = 0
        while True:
            try:
                async with self._semaphore:
                    response = await self._client.completions.create(**options, extra_body=body or None)
                data = response.to_dict()
                choices = sorted(data.get("choices") or [], key=lambda choice: choice.get("index", 0))
                if len(choices) < n and not (allow_single and len(choices) == 1):
                    raise _FewerChoices(len(choices), n)
                usage = data.get("usage") or {}
                usage_tokens = usage.get("completion_tokens") if len(choices) == 1 else None
                return [parse_choice(choice, kind=kind, stop=stop, usage_tokens=usage_tokens, prompt=prompt)
                        for choice in choices[:n]]
            except _FewerChoices as error:
                if attempt >= self.max_retries:
                    raise self._error(index, prompt, part, f"{error} (after {attempt} retries; a server that "
                                      "ignores n needs n_per_request=1)", None) from None
                await asyncio.sleep(min(self.retry_delay * 2 ** attempt, 8.0))
                attempt += 1
            except openai.APIStatusError as error:
                detail = _short(getattr(error, "body", None) or error.message)
                raise self._error(index, prompt, part, f"HTTP {error.status_code}: {detail}",
                                  error.status_code) from error
            except openai.APIError as error:  # connection errors and timeouts, after the client's retries
                raise self._error(index, prompt, part, f"{type(error).__name__}: {error}", None) from error
            except ValueError as error:  # an answer without the fields its kind needs
                raise self._error(index, prompt, part, str(error), None) from error

    def _error(self, index, prompt, part, what, status) -> OpenAIGeneratorError:
        head = prompt[:_PROMPT_PREFIX] + ("..." if len(prompt) > _PROMPT_PREFIX else "")
        which = f"request for prompt {index}" + (f" (sample {part})" if part else "")
        return OpenAIGeneratorError(f"{which} {head!r} to {self.base_url}/completions (model {self.model!r}, server "
                                    f"kind {self._kind!r}, max_retries={self.max_retries}) failed: {what}", index,
                                    status)

    def __repr__(self) -> str:
        return (f"OpenAIGenerator({self.base_url!r}, {self.model!r}, server={self.server!r}, "
                f"max_concurrency={self.max_concurrency}, timeout={self.timeout}, max_retries={self.max_retries})")


def _short(detail, limit: int = 300) -> str:
    text = str(detail)
    return text if len(text) <= limit else text[:limit] + "..."


async def _all_or_nothing(coroutines) -> list:
    """Runs ``coroutines`` concurrently and returns their results in order. The first failure (or a
    cancellation of the caller) cancels the others and waits until they have ended, then raises."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [task for task in tasks if task.done() and not task.cancelled() and task.exception() is not None]
        if failed:
            raise failed[0].exception()
        return [task.result() for task in tasks]
    finally:
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _shut_down(loop: asyncio.AbstractEventLoop, thread: threading.Thread, client) -> None:
    """Closes ``client`` on ``loop``, then stops the loop and its thread (a generator's finalizer)."""
    if loop.is_closed():
        return
    if thread is threading.current_thread():  # collected on its own loop: it cannot wait for itself
        loop.create_task(_close_client(client)).add_done_callback(lambda _: loop.stop())
        return
    if thread.is_alive():
        try:
            asyncio.run_coroutine_threadsafe(_close_client(client), loop).result(timeout=30)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
    if not loop.is_running():
        loop.close()


async def _close_client(client) -> None:
    """Cancels the steps still running on this loop (other threads' calls then raise CancelledError), waits for
    them, and closes the client's connections."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    if others:
        await asyncio.wait(others, timeout=10)
    await client.close()


__all__ = ["SERVER_KINDS", "OpenAIGenerator", "OpenAIGeneratorError", "parse_choice"]
