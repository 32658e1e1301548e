"""OpenAIGenerator against a real OpenAI-compatible server: ``transformers serve`` (transformers[serving]) around a
tiny random Llama saved to a temporary folder, started once for the module on 127.0.0.1 (tests/openai_servers.py).

The model's tokenizer has one character per token and its generation config suppresses the special tokens but the
EOS, so every completion's exact token count is ``len(text) + finished``; greedy decoding is compared with the same
model run in-process (:class:`~fastsearch.integrations.transformers.HFGenerator`); best-of-N, beam search and
particle filtering run end to end with their generator calls and tokens checked."""

import asyncio

import pytest
import torch
from openai_servers import STEP, start_server

from fastsearch.integrations.openai import OpenAIGenerator
from fastsearch.search import Completion, beam_search, best_of_n, particle_filter

STOP = STEP


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server(str(tmp_path_factory.mktemp("tiny-llama")))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def generator(server):
    with OpenAIGenerator(server.url, server.model, max_retries=1, timeout=60) as client:
        yield client


def check_counts(completions, max_tokens, stop=(STOP,)):
    """The exact count of this model's tokens, and ``finished`` only for an EOS."""
    for completion in completions:
        assert isinstance(completion, Completion)
        assert completion.num_tokens == len(completion.text) + int(completion.finished), completion
        assert 1 <= completion.num_tokens <= max_tokens
        if stop and completion.text.endswith(STOP):
            assert not completion.finished and completion.text.count(STOP) == 1
        if stop and completion.finished:
            assert STOP not in completion.text and completion.num_tokens < max_tokens


class Counting:
    """A generator that forwards to another and records every call and completion."""

    def __init__(self, inner):
        self.inner, self.calls, self.completions = inner, 0, []

    def generate(self, prompts, *, n, stop, temperature, max_tokens, seed):
        out = self.inner.generate(prompts, n=n, stop=stop, temperature=temperature, max_tokens=max_tokens, seed=seed)
        assert len(out) == len(prompts) and all(len(samples) == n for samples in out)
        self.calls += 1
        for samples in out:
            check_counts(samples, max_tokens, stop)
            self.completions += samples
        return out


class DigitShare:
    """A step verifier: (digits + 1) / (characters + 2) of each step, in (0, 1)."""

    def score(self, problems, step_lists):
        return [[(sum(char.isdigit() for char in step) + 1) / (len(step) + 2) for step in steps]
                for steps in step_lists]


def test_samples_counts_seeds_and_server_kind(server, generator):
    prompts = ["1+1=", "abc", "12 + 30 = "]
    out = generator.generate(prompts, n=3, stop=[STOP], temperature=1.0, max_tokens=12, seed=4)
    assert generator._kind == server.kind
    assert generator.n_per_request == (1 if server.kind == "transformers" else None)
    assert [len(samples) for samples in out] == [3, 3, 3]
    flat = [completion for samples in out for completion in samples]
    check_counts(flat, 12)
    assert len({completion.text for completion in flat}) > 3, "the samples of a prompt should differ"
    assert generator.generate(prompts, n=3, stop=[STOP], temperature=1.0, max_tokens=12, seed=4) == out
    assert generator.generate(prompts, n=3, stop=[STOP], temperature=1.0, max_tokens=12, seed=5) != out
    many = generator.generate(["x", "7", "q="] * 3, n=2, stop=[STOP], temperature=1.0, max_tokens=10, seed=0)
    flat = [completion for samples in many for completion in samples]
    check_counts(flat, 10)
    assert any(completion.finished for completion in flat), "no end of sequence was sampled"
    assert any(completion.text.endswith(STOP) for completion in flat), "no stop string was met"
    assert any(completion.num_tokens == 10 and not completion.finished for completion in flat), "no length stop"


def test_greedy_equals_the_model_in_process(server, generator):
    transformers = pytest.importorskip("transformers")
    from fastsearch.integrations.transformers import HFGenerator

    model = transformers.AutoModelForCausalLM.from_pretrained(server.model, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(server.model)
    local = HFGenerator(model, tokenizer, batch_size=1)
    prompts = ["1+1=", "hello", "7 + 8 = ", "zz", "q.\n"]
    for stop, max_tokens in (([STOP], 20), (None, 6)):
        remote = generator.generate(prompts, n=1, stop=stop, temperature=0.0, max_tokens=max_tokens, seed=None)
        assert remote == local.generate(prompts, n=1, stop=stop, temperature=0.0, max_tokens=max_tokens)


def test_async_and_inside_a_running_loop(generator):
    prompts = ["ab", "cd"]
    call = dict(n=2, stop=[STOP], temperature=1.0, max_tokens=8, seed=9)
    reference = generator.generate(prompts, **call)

    async def main():
        inside = generator.generate(prompts, **call)  # sync API from a thread running an event loop
        together = await asyncio.gather(generator.agenerate(prompts, **call), generator.agenerate(prompts, **call))
        return inside, together

    inside, together = asyncio.run(main())
    assert inside == reference and together == [reference, reference]


def test_searches_end_to_end(generator):
    problems = ["1+2=", "9-4="]
    verifier = DigitShare()
    counting = Counting(generator)
    result = best_of_n(problems, counting, verifier, n=3, temperature=1.0, max_tokens=12, seed=1, step_delimiter=STOP)
    assert counting.calls == result.spent.generator_calls == 1
    assert result.spent.sequences == len(counting.completions) == 6
    assert result.spent.generated_tokens == sum(completion.num_tokens for completion in counting.completions)
    again = best_of_n(problems, Counting(generator), verifier, n=3, temperature=1.0, max_tokens=12, seed=1,
                      step_delimiter=STOP)
    assert again.candidates == result.candidates  # the server honours the per-request seeds

    for search, options in ((beam_search, dict(n=4, beam_width=2)), (particle_filter, dict(n=4))):
        counting = Counting(generator)
        result = search(problems, counting, verifier, max_steps=3, temperature=1.0, max_tokens=16, seed=2,
                        step_delimiter=STOP, **options)
        assert 2 <= counting.calls == result.spent.generator_calls <= 3
        assert result.spent.sequences == len(counting.completions)
        assert result.spent.generated_tokens == sum(completion.num_tokens for completion in counting.completions)
        assert int(result.spent.tokens_per_problem.sum()) == result.spent.generated_tokens
        assert len(result.completions) == len(problems)
        assert all(candidate for candidate in result.candidates)
