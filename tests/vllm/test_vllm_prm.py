"""VLLMProcessRewardModel on a real vLLM pooling engine over a tiny Qwen2.5-Math-PRM-shaped model: the text
format, scores equal to a direct transformers computation, and a beam search that runs entirely on vLLM."""

import itertools

import pytest
import torch
from tiny_models import prm_reference_scores
from vllm_helpers import CountingLLM, RecordingGenerator, RecordingVerifier, token_count

from fastsearch.integrations.vllm import QWEN_PRM_SYSTEM_PROMPT, VLLMGenerator, VLLMProcessRewardModel, qwen_prm_text
from fastsearch.search import beam_search, best_of_n, particle_filter

QWEN_TEXT = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
             "<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\none<extra_0>is two<extra_0><|im_end|>\n")


def test_qwen_prm_text(prm_dir):
    transformers = pytest.importorskip("transformers")
    assert qwen_prm_text("1+1=?", ["one", "is two"]) == QWEN_TEXT
    # separators inside the texts are dropped, so that separator i ends step i
    assert qwen_prm_text("1+1<extra_0>=?", ["o<extra_0>ne", "is two<extra_0>"]) == QWEN_TEXT
    # the tokenizer's chat template (ChatML, as Qwen2.5's renders it) gives the same text
    tokenizer = transformers.AutoTokenizer.from_pretrained(prm_dir)
    assert tokenizer.chat_template
    assert qwen_prm_text("1+1=?", ["one", "is two"], tokenizer=tokenizer) == QWEN_TEXT
    assert QWEN_PRM_SYSTEM_PROMPT in QWEN_TEXT
    no_system = qwen_prm_text("q", ["a"], system_prompt=None, tokenizer=tokenizer)
    assert no_system == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<extra_0><|im_end|>\n"
    assert qwen_prm_text("q", [], separator="§").endswith("<|im_start|>assistant\n<|im_end|>\n")


def test_scores_equal_transformers(prm_llm, prm_dir):
    llm = CountingLLM(prm_llm)
    prm = VLLMProcessRewardModel(llm)
    assert prm.format("1+1=?", ["one", "is two"]) == QWEN_TEXT
    problems = ["what is 1+1?", "x", "solve 3x=9", "nothing yet", "what is 1+1?"]
    step_lists = [["one plus one", "is two", "so 2"], ["a", "b<extra_0>b", "c", "dd"], ["x=3"], [],
                  ["one plus one", "is three"]]
    scores, offsets = prm.score(problems, step_lists)
    assert llm.encode_calls == 1
    assert offsets.tolist() == [0, 3, 7, 8, 8, 10]
    assert scores.dtype == torch.float32 and scores.shape == (10,)
    texts = [prm.format(problem, steps) for problem, steps in zip(problems, step_lists, strict=True) if steps]
    expected = torch.tensor([score for row in prm_reference_scores(prm_dir, texts) for score in row])
    torch.testing.assert_close(scores, expected, atol=2e-5, rtol=0)
    assert float(scores.max() - scores.min()) > 1e-3  # the scores tell candidates apart
    # a shared first step scores the same (a causal model), the step after it differs
    torch.testing.assert_close(scores[8], scores[0], atol=2e-5, rtol=0)
    assert abs(float(scores[9] - scores[1])) > 1e-5
    empty_scores, empty_offsets = prm.score(["q", "r"], [[], []])
    assert empty_scores.numel() == 0 and empty_offsets.tolist() == [0, 0, 0] and llm.encode_calls == 1


def test_prm_errors(prm_llm, generator_llm):
    prm = VLLMProcessRewardModel(prm_llm)
    with pytest.raises(ValueError, match="one problem per candidate"):
        prm.score(["a", "b"], [["x"]])
    with pytest.raises(TypeError, match="step_lists"):
        prm.score(["a"], "x")
    with pytest.raises(TypeError, match=r"step_lists\[0\]"):
        prm.score(["a"], [[1]])
    with pytest.raises(ValueError, match="exactly one token"):
        VLLMProcessRewardModel(prm_llm, separator="ab")
    with pytest.raises(ValueError, match="label=2"):
        VLLMProcessRewardModel(prm_llm, label=2).score(["a"], [["x"]])
    with pytest.raises(ValueError, match="pooling model"):
        VLLMProcessRewardModel(generator_llm)
    with pytest.raises(TypeError, match="llm must be a vllm.LLM"):
        VLLMProcessRewardModel(object())


SEARCHES = {
    "beam_search": (beam_search, dict(n=8, beam_width=2, max_steps=3)),
    "best_of_n": (best_of_n, dict(n=8)),
    "particle_filter": (particle_filter, dict(n=8, max_steps=3)),
}


@pytest.mark.parametrize("name", list(SEARCHES))
def test_search_entirely_on_vllm(name, generator_llm, prm_llm, prm_dir, generator_tokenizer):
    search, options = SEARCHES[name]
    generation = CountingLLM(generator_llm)
    scoring = CountingLLM(prm_llm)
    generator = RecordingGenerator(VLLMGenerator(generation))
    verifier = RecordingVerifier(VLLMProcessRewardModel(scoring))
    problems = ["what is 1+1?", "name a letter"]
    result = search(problems, generator, verifier, step_delimiter="\n", temperature=1.0, max_tokens=12, seed=0,
                    **options)
    spent = result.spent
    assert spent.verifier_calls == scoring.encode_calls == len(verifier.calls)
    if name == "best_of_n":  # one call each: 2 requests of n=8 samples, all 16 solutions scored at once
        assert spent.generator_calls == generation.generate_calls == 1 and generation.requests == [2]
        assert spent.verifier_calls == 1
    else:  # several steps, one generate and one encode call each; a step sends only the open beams / particles
        assert spent.generator_calls == generation.generate_calls == spent.verifier_calls >= 2
        assert generation.requests[0] == 16 and all(later <= 16 for later in generation.requests[1:])
    assert spent.sequences == len(generator.completions)
    assert [c.num_tokens for c in generator.completions] == [len(ids) for ids in generation.generated_token_ids()]
    assert all(c.num_tokens == token_count(generator_tokenizer, c) for c in generator.completions)
    assert spent.generated_tokens == sum(c.num_tokens for c in generator.completions)
    assert spent.scored_steps == sum(int(offsets[-1]) for *_, offsets in verifier.calls)
    # every score vLLM gave during the search equals the direct computation on the same text
    prm = verifier.verifier
    for call_problems, step_lists, scores, offsets in verifier.calls:
        assert offsets.tolist() == [0, *itertools.accumulate(map(len, step_lists))]
        texts = [prm.format(problem, steps) for problem, steps in zip(call_problems, step_lists, strict=True)]
        expected = [score for row in prm_reference_scores(prm_dir, texts) for score in row]
        torch.testing.assert_close(scores, torch.tensor(expected), atol=2e-5, rtol=0)
    # the final candidates carry their last step's score (aggregate="last")
    last_scores = {round(float(scores[int(offsets[i + 1]) - 1]), 5) for *_, scores, offsets in verifier.calls
                   for i in range(len(offsets) - 1) if offsets[i + 1] > offsets[i]}
    assert {round(float(score), 5) for score in result.scores} <= last_scores
    assert int(result.offsets[-1]) >= len(problems) and len(result.completions) == len(problems)
