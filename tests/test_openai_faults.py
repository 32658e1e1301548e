"""OpenAIGenerator against a local server that misbehaves on purpose (tests/openai_servers.py): servers down,
slow, 429 / 5xx, dropped connections, fewer choices than asked; retries never count a sample twice; an error
mid-step leaves no task, request or socket behind. Also the per-server-kind parsing of a choice, and seeds."""

import asyncio
import time

import pytest
from openai_servers import Action, FaultServer, completion_text, free_port

from fastsearch.integrations.openai import OpenAIGenerator, OpenAIGeneratorError, parse_choice
from fastsearch.search import Completion
from fastsearch.seeding import derive_seed

PROMPTS = ["first prompt", "the second prompt, rather longer than the first", "3"]
CALL = dict(n=3, stop=["\n\n"], temperature=0.7, max_tokens=16, seed=11)


def expected(prompts=PROMPTS, n=3, seed=11):
    """What the fault server answers when nothing goes wrong (vLLM-style: stop string kept, token_ids)."""
    out = []
    for index, prompt in enumerate(prompts):
        request_seed = derive_seed(seed, index) % (1 << 31)
        out.append([Completion(completion_text(prompt, request_seed, j), len(completion_text(prompt, request_seed, j)),
                               False) for j in range(n)])
    return out


def wait_until(condition, seconds=5.0):
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def pending_tasks(generator) -> int:
    """Tasks still alive on the generator's own event loop (but the one asking)."""
    async def count():
        return len([task for task in asyncio.all_tasks() if task is not asyncio.current_task()])
    return asyncio.run_coroutine_threadsafe(count(), generator._loop).result(5)


def test_happy_path_seeds_and_vllm_fields():
    with FaultServer() as server, OpenAIGenerator(server.url, "fault", max_retries=0) as generator:
        assert generator.generate(PROMPTS, **CALL) == expected()
        assert generator._kind == "vllm"
        assert len(server.requests) == len(PROMPTS)
        seeds = sorted(body["seed"] for body in server.requests)
        assert seeds == sorted(derive_seed(11, index) % (1 << 31) for index in range(len(PROMPTS)))
        assert len(set(seeds)) == len(seeds) and all(0 <= seed < 1 << 31 for seed in seeds)
        for body in server.requests:
            assert body["n"] == 3 and body["stop"] == ["\n\n"] and body["max_tokens"] == 16
            assert body["include_stop_str_in_output"] is True and body["return_token_ids"] is True
        assert generator.generate([], **CALL) == []


def test_greedy_sends_one_sample_per_request():
    with FaultServer() as server, OpenAIGenerator(server.url, "fault", max_retries=0) as generator:
        out = generator.generate(PROMPTS[:2], **{**CALL, "temperature": 0.0})
        assert [len(samples) for samples in out] == [3, 3]
        assert len(server.requests) == 6 and all(body["n"] == 1 for body in server.requests)
        assert generator.n_per_request is None  # still n samples per request when sampling
        generator.generate(PROMPTS[:2], **CALL)
        assert [body["n"] for body in server.requests[6:]] == [3, 3]


def test_server_down_names_the_request():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with OpenAIGenerator(url, "m", max_retries=1, server="vllm", timeout=2) as generator:
        with pytest.raises(OpenAIGeneratorError, match=r"prompt \d.*127\.0\.0\.1.*APIConnectionError") as info:
            generator.generate(PROMPTS, **CALL)
        assert info.value.status_code is None


def test_429_and_5xx_are_retried_and_never_counted_twice():
    def plan(number, body):  # every prompt: a 429, then a 503, then the answer
        attempt = sum(seen["prompt"] == body["prompt"] for seen in server.requests) - 1
        return Action(status=(429, 503, 200)[min(attempt, 2)])

    server = FaultServer(plan)
    with server, OpenAIGenerator(server.url, "fault", max_retries=2) as generator:
        assert generator.generate(PROMPTS, **CALL) == expected()
        assert len(server.requests) == 3 * len(PROMPTS)


def test_persistent_5xx_fails_naming_prompt_status_and_url():
    def plan(number, body):
        return Action(status=500) if body["prompt"] == PROMPTS[1] else Action()

    with FaultServer(plan) as server, OpenAIGenerator(server.url, "fault", max_retries=1) as generator:
        with pytest.raises(OpenAIGeneratorError) as info:
            generator.generate(PROMPTS, **CALL)
        message = str(info.value)
        assert "prompt 1" in message and PROMPTS[1][:40] in message and "HTTP 500" in message
        assert server.url in message and info.value.prompt_index == 1 and info.value.status_code == 500
        assert sum(body["prompt"] == PROMPTS[1] for body in server.requests) == 2  # the attempt and one retry


def test_slow_server_times_out_then_retries():
    def plan(number, body):  # the first attempt of each prompt hangs past the timeout
        first = sum(seen["prompt"] == body["prompt"] for seen in server.requests) == 1
        return Action(delay=3.0 if first else 0.0)

    server = FaultServer(plan)
    with server, OpenAIGenerator(server.url, "fault", max_retries=1, timeout=0.3) as generator:
        assert generator.generate(PROMPTS, **CALL) == expected()
        assert len(server.requests) == 2 * len(PROMPTS)
    with FaultServer(lambda number, body: Action(delay=3.0)) as server, \
            OpenAIGenerator(server.url, "fault", max_retries=0, timeout=0.3) as generator:
        with pytest.raises(OpenAIGeneratorError, match="APITimeoutError"):
            generator.generate(PROMPTS[:1], **CALL)


def test_dropped_connection_mid_step_is_retried():
    with FaultServer(lambda number, body: Action(drop=number == 1)) as server, \
            OpenAIGenerator(server.url, "fault", max_retries=1) as generator:
        assert generator.generate(PROMPTS, **CALL) == expected()
        assert len(server.requests) == len(PROMPTS) + 1


def test_fewer_choices_are_retried_then_reported():
    def plan(number, body):
        return Action(choices=2 if number == 0 else None)

    with FaultServer(plan) as server, OpenAIGenerator(server.url, "fault", max_retries=1, retry_delay=0.01) as gen:
        assert gen.generate(PROMPTS, **CALL) == expected()
        assert len(server.requests) == len(PROMPTS) + 1
    with FaultServer(lambda number, body: Action(choices=2)) as server, \
            OpenAIGenerator(server.url, "fault", max_retries=2, retry_delay=0.01) as generator:
        with pytest.raises(OpenAIGeneratorError, match=r"returned 2 choices, 3 were asked.*n_per_request=1"):
            generator.generate(PROMPTS[:1], **CALL)
        assert len(server.requests) == 3


def test_server_ignoring_n_switches_to_one_sample_per_request():
    def plan(number, body):  # a server that ignores n (as transformers serve and llama.cpp do)
        return Action(choices=1)

    with FaultServer(plan) as server, OpenAIGenerator(server.url, "fault", server="openai", max_retries=0) as strict:
        with pytest.raises(OpenAIGeneratorError, match="fewer|choices"):
            strict.generate(PROMPTS[:1], **{**CALL, "seed": 3})
    with FaultServer(plan) as server, OpenAIGenerator(server.url, "fault") as generator:
        first = generator.generate(PROMPTS, **CALL)
        assert generator.n_per_request == 1
        assert [len(samples) for samples in first] == [3, 3, 3]
        assert sum(body["n"] == 3 for body in server.requests) == len(PROMPTS)
        assert len(server.requests) == 3 * len(PROMPTS)  # the first choice of each is kept: n requests a prompt
        again = generator.generate(PROMPTS, **CALL)  # now n one-sample requests a prompt, the same seeds
        assert again == first
        assert len({body["seed"] for body in server.requests[-9:]}) == 9


def test_error_mid_step_cancels_the_others_and_leaks_nothing():
    def plan(number, body):  # one request fails fast while the others hang
        if body["prompt"] == "bad":
            return Action(status=400, delay=0.2)
        return Action(delay=30.0) if body["prompt"] == "slow" else Action()

    prompts = ["slow"] * 6 + ["bad"]
    with FaultServer(plan) as server:
        generator = OpenAIGenerator(server.url, "fault", max_retries=0)
        began = time.monotonic()
        with pytest.raises(OpenAIGeneratorError, match="prompt 6 'bad'.*HTTP 400"):
            generator.generate(prompts, **CALL)
        assert time.monotonic() - began < 10
        assert pending_tasks(generator) == 0
        assert wait_until(lambda: server.in_progress == 0), "cancelled requests still in progress on the server"
        assert generator.generate(["ok"], n=1, stop=None, temperature=0.0, max_tokens=4, seed=None)[0][0].text
        generator.close()
        assert wait_until(lambda: server.open_connections == 0), f"{server.open_connections} sockets left open"
        with pytest.raises(RuntimeError, match="closed"):
            generator.generate(["x"], n=1)


def test_cancelled_agenerate_cancels_its_requests():
    with FaultServer(lambda number, body: Action(delay=30.0)) as server, \
            OpenAIGenerator(server.url, "fault") as generator:
        async def main():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(generator.agenerate(PROMPTS, **CALL), 0.5)
        asyncio.run(main())
        assert wait_until(lambda: server.in_progress == 0 and pending_tasks(generator) == 0)


def test_concurrency_bound_and_sync_call_inside_a_running_loop():
    with FaultServer(lambda number, body: Action(delay=0.3)) as server:
        with OpenAIGenerator(server.url, "fault", max_concurrency=2) as generator:
            async def inside_a_loop():  # e.g. a notebook cell: the sync API must not touch this loop
                return generator.generate(["p"] * 6, n=1, seed=1)
            out = asyncio.run(inside_a_loop())
            assert [len(samples) for samples in out] == [1] * 6
            assert server.max_in_progress == 2
        server.max_in_progress = 0
        with OpenAIGenerator(server.url, "fault", max_concurrency=64) as generator:
            async def two_steps():
                return await asyncio.gather(generator.agenerate(["a"] * 4, n=2, seed=1),
                                            generator.agenerate(["b"] * 4, n=2, seed=1))
            first, second = asyncio.run(two_steps())
            assert server.max_in_progress == 8 and len(first) == len(second) == 4


@pytest.mark.parametrize("kind", ["vllm", "sglang", "transformers", "openai"])
def test_parse_choice_per_server_kind(kind):
    stop = ["\n\n"]
    per_choice = {"token_ids": [5, 6, 7]} if kind == "vllm" else {"logprobs": {"tokens": ["a", "b", "c"]}}
    usage = 3 if kind == "transformers" else None
    if kind == "transformers":
        per_choice = {}
    length = parse_choice({"text": "ab\n\nc", "finish_reason": "length", **per_choice}, kind=kind, stop=stop,
                          usage_tokens=usage)
    assert length == Completion("ab\n\n", 3, False)  # a stop string the server left in the text is cut after
    eos = {"text": "abc", "finish_reason": "stop", **per_choice}
    if kind == "vllm":
        eos["stop_reason"] = None
    if kind == "sglang":
        eos["matched_stop"] = 2  # SGLang names the EOS token id
    # a plain OpenAI server cannot tell an EOS from a stop string that it trimmed: taken as the stop string
    assert parse_choice(eos, kind=kind, stop=stop, usage_tokens=usage) == \
        (Completion("abc\n\n", 3, False) if kind == "openai" else Completion("abc", 3, True))
    trimmed = {"text": "ab", "finish_reason": "stop", **per_choice}
    if kind in ("vllm", "sglang"):
        trimmed["stop_reason" if kind == "vllm" else "matched_stop"] = "\n\n"
    parsed = parse_choice(trimmed, kind=kind, stop=stop, usage_tokens=usage)
    if kind == "transformers":  # it keeps stop strings in the text: none there is an end of sequence
        assert parsed == Completion("ab", 3, True)
    else:
        assert parsed == Completion("ab\n\n", 3, False)  # the stop string is put back
    kept = parse_choice({"text": "ab\n\n", "finish_reason": "stop", "stop_reason": "\n\n", **per_choice}, kind=kind,
                        stop=stop, usage_tokens=usage)
    assert kept == Completion("ab\n\n", 3, False)
    if kind == "vllm":
        assert parse_choice({**eos, "stop_reason": 128009}, kind=kind, stop=stop, usage_tokens=None).finished
    if kind != "transformers":
        with pytest.raises(ValueError, match="n_per_request=1"):
            parse_choice({"text": "x", "finish_reason": "stop"}, kind=kind, stop=stop, usage_tokens=None)


def test_transformers_stop_strings_straddling_the_prompt_and_overhanging_tokens():
    stop = ["\n\n"]
    # transformers serve stops when prompt + text ends with a stop string: "\n" after a prompt ending with "\n"
    straddling = {"text": "\n", "finish_reason": "stop"}
    assert parse_choice(straddling, kind="transformers", stop=stop, usage_tokens=1, prompt="step one\n") == \
        Completion("\n", 1, False)
    assert parse_choice(straddling, kind="transformers", stop=stop, usage_tokens=2, prompt="step one") == \
        Completion("\n", 2, True)  # the same text after a prompt without the "\n": an end of sequence
    # a last token running past the stop string ("\n\nA" as one token): the text is cut right after it
    assert parse_choice({"text": "x\n\nA", "finish_reason": "stop"}, kind="transformers", stop=stop,
                        usage_tokens=2, prompt="p") == Completion("x\n\n", 2, False)
    # the earliest-ending stop string wins; one-character stop strings never reach into the prompt
    assert parse_choice({"text": "ab;cd\n\n", "finish_reason": "stop"}, kind="transformers", stop=["\n\n", ";"],
                        usage_tokens=4, prompt=";") == Completion("ab;", 4, False)


def test_close_stops_the_background_thread():
    with FaultServer() as server:
        generator = OpenAIGenerator(server.url, "fault")
        generator.generate(["a"], n=1, seed=0)
        thread = generator._thread
        assert thread.is_alive()
        generator.close()
        generator.close()  # idempotent
        assert not thread.is_alive()
        assert wait_until(lambda: server.open_connections == 0)


def test_argument_errors():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIGenerator("localhost:8000", "m")
    with pytest.raises(TypeError, match="model"):
        OpenAIGenerator("http://127.0.0.1:1/v1", "")
    with pytest.raises(ValueError, match="server"):
        OpenAIGenerator("http://127.0.0.1:1/v1", "m", server="tgi")
    with pytest.raises(ValueError, match="n_per_request"):
        OpenAIGenerator("http://127.0.0.1:1/v1", "m", n_per_request=2)
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIGenerator("http://127.0.0.1:1/v1", "m", max_concurrency=0)
    with pytest.raises(ValueError, match="timeout"):
        OpenAIGenerator("http://127.0.0.1:1/v1", "m", timeout=0)
    assert OpenAIGenerator("http://127.0.0.1:1", "m").base_url == "http://127.0.0.1:1/v1"
    with FaultServer() as server, OpenAIGenerator(server.url, "fault") as generator:
        with pytest.raises(ValueError, match="n must be"):
            generator.generate(["x"], n=0)
        with pytest.raises(TypeError, match="prompts"):
            generator.generate("x", n=1)
