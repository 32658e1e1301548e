"""vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) on 127.0.0.1 over the tiny
Llama: what its ``/v1/completions`` returns per choice (the fields an OpenAI-API generator reads to count tokens
and tell EOS from a stop string), and a beam search through ``OpenAIGenerator`` against it."""

from collections import Counter

import httpx
import pytest
from vllm_helpers import LetterVerifier, RecordingGenerator, token_count

from fastsearch.search import beam_search

# every choice carries all of these keys (null when not asked for)
CHOICE_FIELDS = {"index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids", "prompt_token_ids",
                 "prompt_logprobs"}


def _complete(server, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}/completions", json={"model": server.model, **body}, timeout=60.0)


def test_completion_choice_fields(server, generator_tokenizer):
    prompts, n, max_tokens = ["1+1=", "abc", "x"], 6, 10
    response = _complete(server, prompt=prompts, n=n, stop=["\n"], seed=7, temperature=1.0, max_tokens=max_tokens,
                         include_stop_str_in_output=True, return_token_ids=True, logprobs=0)
    assert response.status_code == 200, response.text
    body = response.json()
    choices = body["choices"]
    # a list prompt gives flat choices: choice index = prompt index * n + sample
    assert [choice["index"] for choice in choices] == list(range(len(prompts) * n))
    eos_id = generator_tokenizer.eos_token_id
    kinds = Counter()
    for choice in choices:
        assert CHOICE_FIELDS <= set(choice), sorted(choice)
        prompt = prompts[choice["index"] // n]
        assert choice["prompt_token_ids"] == generator_tokenizer.encode(prompt, add_special_tokens=False)
        ids, text = choice["token_ids"], choice["text"]
        # logprobs' tokens are another exact per-choice count (EOS included)
        assert len(choice["logprobs"]["tokens"]) == len(ids)
        written = len(generator_tokenizer.encode(text, add_special_tokens=False))
        if choice["finish_reason"] == "length":
            kinds["length"] += 1
            assert choice["stop_reason"] is None and len(ids) == written == max_tokens and eos_id not in ids
        elif choice["stop_reason"] == "\n":
            kinds["stop"] += 1  # a stop string: finish_reason "stop", stop_reason the string, text ends with it
            assert choice["finish_reason"] == "stop" and text.endswith("\n") and len(ids) == written
        else:
            kinds["eos"] += 1  # EOS: finish_reason "stop", stop_reason null, token_ids end with EOS, text hides it
            assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
            assert ids[-1] == eos_id and len(ids) == written + 1
    assert kinds["eos"] and kinds["stop"] and kinds["length"], kinds
    # usage sums all choices: no per-choice count without token_ids (or logprobs)
    usage = body["usage"]
    assert usage["completion_tokens"] == sum(len(choice["token_ids"]) for choice in choices)
    assert usage["prompt_tokens"] == sum(len(generator_tokenizer.encode(p, add_special_tokens=False)) for p in prompts)

    # without return_token_ids the keys stay, with null values
    plain = _complete(server, prompt="abc", n=2, stop=["\n"], seed=7, max_tokens=4).json()["choices"]
    assert all(choice["token_ids"] is None and choice["prompt_token_ids"] is None for choice in plain)
    # one request seed serves every prompt of a list: identical prompts get identical samples
    same = _complete(server, prompt=["abc", "abc"], n=3, seed=9, temperature=1.0, max_tokens=6).json()["choices"]
    assert [c["text"] for c in same[:3]] == [c["text"] for c in same[3:]]
    # greedy decoding with n > 1 is refused
    greedy = _complete(server, prompt="abc", n=2, temperature=0, max_tokens=4)
    assert greedy.status_code == 400 and "n must be 1 when using greedy sampling" in greedy.text


def test_beam_search_through_openai_generator(server, generator_tokenizer):
    openai_module = pytest.importorskip("fastsearch.integrations.openai",
                                        reason="fastsearch.integrations.openai lands with issue 14's OpenAI adapter")
    generator = openai_module.OpenAIGenerator(server.base_url, server.model, max_concurrency=8, timeout=60.0,
                                              max_retries=1)
    recorder = RecordingGenerator(generator)
    verifier = LetterVerifier()
    problems = ["what is 1+1?", "name a letter"]
    try:
        result = beam_search(problems, recorder, verifier, n=8, beam_width=2, max_steps=3, step_delimiter="\n",
                             temperature=1.0, max_tokens=12, seed=0)
        again = beam_search(problems, generator, LetterVerifier(), n=8, beam_width=2, max_steps=3,
                            step_delimiter="\n", temperature=1.0, max_tokens=12, seed=0)
    finally:
        close = getattr(generator, "close", None)
        if callable(close):
            close()
    spent = result.spent
    assert 2 <= spent.generator_calls <= 3 and spent.verifier_calls == verifier.calls == spent.generator_calls
    assert spent.sequences == len(recorder.completions) > 16
    assert all(c.num_tokens == token_count(generator_tokenizer, c) for c in recorder.completions)
    assert spent.generated_tokens == sum(c.num_tokens for c in recorder.completions)
    assert any(c.text.endswith("\n") and not c.finished for c in recorder.completions)
    assert len(result.completions) == len(problems)
    assert again.candidates == result.candidates  # seeded requests: the search is repeatable through the server
