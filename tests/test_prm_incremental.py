"""Incremental PRM scoring (``incremental=True``): each call runs only new steps' tokens after the cached
keys/values of the candidate's longest scored prefix, and gives the full recomputation's scores; the cache
holds only what the latest call's candidates continue."""

import gc
import weakref

import pytest
import torch
from test_prm_formats import LLAMA_TEMPLATE, QWEN_TEMPLATE, char_tokenizer, tiny_llama, tiny_qwen_classifier

from fastsearch.integrations.prms import QwenMathPRM, RLHFlowPRM
from fastsearch.integrations.transformers import HFProcessRewardModel
from fastsearch.models import reasoning
from fastsearch.search import beam_search, particle_filter

FORMATS = ["math_shepherd", "qwen", "rlhflow"]


@pytest.fixture(scope="module")
def makers():
    """Per format: ``make(incremental, batch_size)`` -> a PRM, all of one format sharing one model."""
    qwen_tokenizer, llama_tokenizer = char_tokenizer(QWEN_TEMPLATE), char_tokenizer(LLAMA_TEMPLATE)
    qwen = tiny_qwen_classifier(len(qwen_tokenizer), seed=7, mlp_head=True, max_positions=4096)
    llama = tiny_llama(len(llama_tokenizer), seed=8, max_positions=4096)
    return {
        "math_shepherd": lambda inc, b: HFProcessRewardModel(llama, llama_tokenizer, "<extra_0>", "+", "-",
                                                             batch_size=b, incremental=inc),
        "qwen": lambda inc, b: QwenMathPRM(qwen, qwen_tokenizer, batch_size=b, incremental=inc),
        "rlhflow": lambda inc, b: RLHFlowPRM(llama, llama_tokenizer, batch_size=b, incremental=inc),
    }


class Compared:
    """A step verifier that scores every call both ways, checks they agree and checks the cache's bounds."""

    def __init__(self, full, incremental):
        self.full, self.incremental = full, incremental
        self.calls = 0

    def score(self, problems, step_lists):
        expected, expected_offsets = self.full.score(problems, step_lists)
        passes = self.incremental.forward_passes
        got, offsets = self.incremental.score(problems, step_lists)
        assert torch.equal(offsets, expected_offsets)
        torch.testing.assert_close(got, expected, atol=3e-6, rtol=1e-5)
        self.calls += 1
        live = {(problem, tuple(steps)) for problem, steps in zip(problems, step_lists, strict=True) if steps}
        info = self.incremental.cache_info()
        # nodes: one root per problem and one per step of the live candidates at most (shared prefixes count once)
        assert info["nodes"] <= len({p for p, _ in live}) + sum(len(steps) for _, steps in live)
        # blocks: this call's forward passes, or older rows of candidates that needed none
        assert info["blocks"] <= self.incremental.forward_passes - passes + len(live)
        return got, offsets


@pytest.mark.parametrize("form", FORMATS)
def test_incremental_equals_full_in_beam_search(makers, form):
    full, incremental = makers[form](False, 5), makers[form](True, 5)
    verifier = Compared(full, incremental)
    problems = [p.text for p in reasoning.make_problems(2, seed=1)]
    result = beam_search(problems, reasoning.SimulatedGenerator(), verifier, n=6, beam_width=2, max_steps=5,
                         answer_fn=reasoning.extract_answer, seed=3)
    assert verifier.calls == result.spent.verifier_calls >= 3
    assert incremental.tokens_processed < full.tokens_processed / 2


@pytest.mark.parametrize("search", ["lookahead", "particle_filter"])
def test_incremental_equals_full_with_lookahead_and_resampling(makers, search):
    full, incremental = makers["qwen"](False, 4), makers["qwen"](True, 4)
    verifier = Compared(full, incremental)
    problems = [p.text for p in reasoning.make_problems(3, seed=2)]
    if search == "lookahead":  # rollouts are scored but not kept: the next call continues a shorter prefix
        beam_search(problems, reasoning.SimulatedGenerator(), verifier, n=4, beam_width=2, max_steps=4, lookahead=1,
                    answer_fn=reasoning.extract_answer, seed=0)
    else:  # resampling copies particles: copies share their ancestor's cached prefix
        particle_filter(problems, reasoning.SimulatedGenerator(), verifier, n=4, max_steps=5, ess_threshold=1.0,
                        answer_fn=reasoning.extract_answer, seed=0)
    assert verifier.calls >= 3 and incremental.tokens_processed < full.tokens_processed


@pytest.mark.parametrize("form", FORMATS)
def test_each_call_runs_only_new_tokens(makers, form):
    prm = makers[form](True, 8)
    steps = ["first", "second step", "3"]
    ids, positions = prm.token_ids("p", steps)
    ends = [len(prm.token_ids("p", steps[:k])[0]) for k in range(4)]
    for k in range(1, 4):
        before = prm.tokens_processed
        prm.score(["p"], [steps[:k]])
        assert prm.tokens_processed - before == ends[k] - (0 if k == 1 else ends[k - 1])
    assert prm.tokens_processed == len(ids) and len(positions) == 3
    passes = prm.forward_passes
    again, _ = prm.score(["p"], [steps[:2]])  # a prefix of a cached candidate: nothing to run
    assert prm.forward_passes == passes
    full, _ = makers[form](False, 8).score(["p"], [steps[:2]])
    torch.testing.assert_close(again, full, atol=3e-6, rtol=1e-5)


def test_mixed_past_lengths_share_one_batch(makers):
    prm, full = makers["rlhflow"](True, 16), makers["rlhflow"](False, 16)
    problems = ["a", "bb", "a", "ccc", "a"]
    first = [["x"], ["y", "yy", "yyy"], ["x", "z" * 9], [], ["w"] * 5]
    prm.score(problems, first)
    grown = [steps + [f"new {i}"] for i, steps in enumerate(first)] + [["fresh"], ["x"]]
    passes = prm.forward_passes
    got, offsets = prm.score(problems + ["dd", "a"], grown)
    assert prm.forward_passes - passes == 2  # the new problem's prefix, then every candidate together
    expected, expected_offsets = full.score(problems + ["dd", "a"], grown)
    assert torch.equal(offsets, expected_offsets)
    torch.testing.assert_close(got, expected, atol=3e-6, rtol=1e-5)


def test_duplicates_run_once_and_children_share_the_parent(makers):
    prm = makers["qwen"](True, 16)
    prm.score(["p"], [["root step"]])
    before = prm.tokens_processed
    children = [["root step", "child"]] * 3 + [["root step", "other"]]
    scores, _ = prm.score(["p"] * 4, children)
    length = {len(steps): len(prm.token_ids("p", steps)[0]) for steps in (["root step"], children[0])}
    other = len(prm.token_ids("p", children[3])[0])
    assert prm.tokens_processed - before == (length[2] - length[1]) + (other - length[1])
    assert torch.equal(scores[0:2], scores[2:4]) and scores[0] == scores[6] and scores[1] == scores[5]
    assert prm.cache_info()["nodes"] == 4  # root, "root step", "child", "other"


def test_entries_not_continued_are_freed(makers):
    prm = makers["math_shepherd"](True, 4)
    prm.score(["p", "q"], [["a"], ["b"]])
    first = {id(node.block): weakref.ref(node.block) for node in prm._roots.values()}
    assert prm.cache_info()["nodes"] == 4
    prm.score(["p"], [["a", "c"]])  # q is gone; p's root and "a" now live in this call's rows
    assert prm.cache_info()["nodes"] == 3 and prm.cache_info()["blocks"] == 1
    gc.collect()
    assert all(ref() is None for ref in first.values())
    size = prm.cache_info()["bytes"]
    prm.score(["p"] * 4, [["a", "c", str(k)] for k in range(4)])
    assert prm.cache_info()["nodes"] == 7 and prm.cache_info()["bytes"] > size
    prm.score(["r"], [["z"]])
    assert prm.cache_info()["nodes"] == 2
    prm.clear_cache()
    assert prm.cache_info() == {"nodes": 0, "blocks": 0, "bytes": 0}
    prm.reset_counters()
    assert prm.tokens_processed == prm.padded_tokens == prm.forward_passes == 0


def test_incremental_refuses_sliding_window_models():
    tokenizer = char_tokenizer(QWEN_TEMPLATE)
    model = tiny_qwen_classifier(len(tokenizer), seed=0)
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="incremental=True needs full attention in every layer"):
        QwenMathPRM(model, tokenizer, incremental=True)
    QwenMathPRM(model, tokenizer, incremental=False)
