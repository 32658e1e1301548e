"""transformers adapters on tiny randomly initialised models with a tokenizer built offline (no download),
and ``lm_head_rows`` (its checks and scalings need no transformers install)."""

import subprocess
import sys

import pytest
import torch
from helpers import KERNEL_BACKENDS

import fastsearch
from fastsearch.integrations.transformers import HFGenerator, HFProcessRewardModel, lm_head_rows
from fastsearch.search import Completion

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +-=.\n§")
TAG = "§"


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in CHARS:
        vocab[char] = len(vocab)
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def _tiny_llama(vocab_size, seed, tie=False):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def generator_model(tokenizer):
    model = _tiny_llama(len(tokenizer), seed=0)
    with torch.no_grad():  # make newlines and EOS likely, so that stops happen within a few tokens
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("\n")] *= 0
        model.lm_head.bias = None
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("\n")] += model.model.norm.weight * 0.4
    return model


def test_generator_shapes_stops_and_counts(tokenizer, generator_model):
    generator = HFGenerator(generator_model, tokenizer, batch_size=8)
    prompts = ["1+1=", "abc", "x"]
    out = generator.generate(prompts, n=3, stop=["\n"], temperature=1.0, max_tokens=12, seed=4)
    assert len(out) == 3 and all(len(samples) == 3 for samples in out)
    for samples in out:
        for completion in samples:
            assert isinstance(completion, Completion)
            assert 1 <= completion.num_tokens <= 12
            if "\n" in completion.text:
                assert completion.text.endswith("\n") and completion.text.count("\n") == 1
                assert not completion.finished
            # one char per token here; special tokens (sampled <s>, <pad>) count but print nothing
            assert len(completion.text) + int(completion.finished) <= completion.num_tokens
    assert any(c.text.endswith("\n") for samples in out for c in samples), "no completion reached the stop string"
    again = generator.generate(prompts, n=3, stop=["\n"], temperature=1.0, max_tokens=12, seed=4)
    assert again == out


def test_generator_greedy_batched_equals_one_by_one(tokenizer, generator_model):
    generator = HFGenerator(generator_model, tokenizer, batch_size=2)
    prompts = ["12+3=", "a", "hello wor"]
    batched = generator.generate(prompts, n=1, stop=["\n"], temperature=0, max_tokens=6)
    single = [generator.generate([p], n=1, stop=["\n"], temperature=0, max_tokens=6)[0] for p in prompts]
    assert batched == single


def test_generator_errors(tokenizer, generator_model):
    generator = HFGenerator(generator_model, tokenizer)
    with pytest.raises(TypeError, match="prompts must be a sequence of strings"):
        generator.generate("abc", n=1)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generator.generate(["a"], n=1, temperature=-1.0)
    with pytest.raises(TypeError, match="temperature must be a float"):
        generator.generate(["a"], n=1, temperature="hot")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        generator.generate(["a"], n=1, seed=-1)


@pytest.mark.parametrize("name", ["n", "max_tokens", "batch_size"])
def test_generator_int_options(tokenizer, generator_model, name):
    """Every count is checked alike: TypeError for a non-int, ValueError below 1."""
    def call(value):
        if name == "batch_size":
            return HFGenerator(generator_model, tokenizer, batch_size=value)
        return HFGenerator(generator_model, tokenizer).generate(["a"], **{"n": 1, name: value})

    with pytest.raises(TypeError, match=f"{name} must be an int, got str"):
        call("3")
    with pytest.raises(TypeError, match=f"{name} must be an int, got bool"):
        call(True)
    with pytest.raises(ValueError, match=f"{name} must be at least 1, got 0"):
        call(0)


@pytest.fixture(scope="module")
def prm_model(tokenizer):
    return _tiny_llama(len(tokenizer), seed=1)


def _full_logits_step_scores(model, tokenizer, text):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0]
    good, bad = tokenizer.convert_tokens_to_ids("+"), tokenizer.convert_tokens_to_ids("-")
    tags = (ids[0] == tokenizer.convert_tokens_to_ids(TAG)).nonzero().squeeze(-1)
    return torch.softmax(logits[tags][:, [good, bad]].double(), -1)[:, 0].float()


def test_prm_scores_equal_full_logits(tokenizer, prm_model):
    prm = HFProcessRewardModel(prm_model, tokenizer, TAG, "+", "-", batch_size=2)
    problems = ["what is 2+2", "what is 3+1", "name a color", "q"]
    step_lists = [["2+2=4", "so 4"], ["3+1=5"], [], ["a", "b", "c", "d"]]
    scores, offsets = prm.score(problems, step_lists)
    assert offsets.tolist() == [0, 2, 3, 3, 7]
    assert scores.shape == (7,) and scores.dtype == torch.float32
    for i, (problem, steps) in enumerate(zip(problems, step_lists, strict=True)):
        if steps:
            expected = _full_logits_step_scores(prm_model, tokenizer, prm.format(problem, steps))
            torch.testing.assert_close(scores[offsets[i]:offsets[i + 1]], expected, atol=1e-5, rtol=1e-5)
    candidates = HFProcessRewardModel(prm_model, tokenizer, TAG, "+", "-", aggregate="min").score_candidates(
        problems, step_lists)
    assert torch.isnan(candidates[2])
    torch.testing.assert_close(candidates[3], scores[3:7].min())


def test_prm_errors(tokenizer, prm_model):
    with pytest.raises(ValueError, match="step_tag='ab' must be exactly one token"):
        HFProcessRewardModel(prm_model, tokenizer, "ab", "+", "-")
    prm = HFProcessRewardModel(prm_model, tokenizer, TAG, "+", "-")
    with pytest.raises(ValueError, match="one problem per candidate"):
        prm.score(["a", "b"], [["x"]])
    # a tag inside a step is dropped, so each step still ends at its own tag
    tagged, _ = prm.score(["a", "b"], [["x"], [f"y {TAG}z"]])
    plain, _ = prm.score(["a", "b"], [["x"], ["y z"]])
    torch.testing.assert_close(tagged, plain)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        HFProcessRewardModel(prm_model, tokenizer, TAG, "+", "-", aggregate="median")
    with pytest.raises(TypeError, match="batch_size must be an int"):
        HFProcessRewardModel(prm_model, tokenizer, TAG, "+", "-", batch_size="3")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        HFProcessRewardModel(prm_model, tokenizer, TAG, "+", "-", batch_size=0)
    with pytest.raises(TypeError, match=r"step_lists\[1\]\[0\] must be a str"):
        prm.score(["a", "b"], [["x"], [3]])


@pytest.mark.parametrize("algorithm", ["best_of_n", "beam_search"])
def test_search_end_to_end_on_tiny_models(tokenizer, generator_model, prm_model, algorithm):
    """A whole search with both adapters: real generate calls, PRM scores from hidden states."""
    from fastsearch.search import beam_search, best_of_n

    generator = HFGenerator(generator_model, tokenizer, batch_size=16)
    prm = HFProcessRewardModel(prm_model, tokenizer, TAG, "+", "-", batch_size=8)
    problems = ["1+1=", "2+3=", "abc"]
    if algorithm == "best_of_n":
        result = best_of_n(problems, generator, prm, n=4, max_tokens=10, step_delimiter="\n", seed=0)
    else:
        result = beam_search(problems, generator, prm, n=4, beam_width=2, max_steps=3, max_tokens=6,
                             step_delimiter="\n", seed=0)
    assert len(result.completions) == 3 and result.offsets.shape == (4,)
    assert result.spent.generator_calls >= 1 and result.spent.verifier_calls >= 1
    for g in range(3):
        start, end = int(result.offsets[g]), int(result.offsets[g + 1])
        assert start <= int(result.chosen[g]) < end
        assert result.completions[g] == result.candidates[int(result.chosen[g])]
    assert torch.isfinite(result.scores).any()


# -- lm_head_rows: a PRM head without the vocabulary ------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("backend", ["torch"] + [p.values[1] for p in KERNEL_BACKENDS if p.values[0] == "cpu"])
def test_prm_head_equals_full_logits_of_a_causal_lm(tie, backend):
    model = _tiny_llama(211, seed=0, tie=tie)
    good, bad, tag = 17, 23, 5
    ids = torch.randint(30, 211, (3, 29), generator=torch.Generator().manual_seed(2))
    ids[:, [6, 13, 28]] = tag
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    tag_rows = torch.nonzero(ids.reshape(-1) == tag).squeeze(-1)
    expected = torch.softmax(out.logits.reshape(-1, 211)[tag_rows][:, [good, bad]].double(), -1)[:, 0].float()
    head = lm_head_rows(model, [good, bad])
    assert head.shape == (2, model.config.hidden_size)
    got = fastsearch.prm_step_scores(out.hidden_states[-1], tag_rows, head, backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    scores, _ = fastsearch.prm_scores(out.hidden_states[-1], tag_rows, head, offsets=torch.tensor([0, 3, 6, 9]),
                                      method="min", backend=backend)
    torch.testing.assert_close(scores, expected.view(3, 3).amin(-1), atol=1e-5, rtol=1e-5)


class _BiasedHead(torch.nn.Module):
    def __init__(self, scale_name=None, scale=1.0):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 40, bias=True)
        self.config = type("Config", (), {scale_name: scale} if scale_name else {})()

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("scale_name,scale", [(None, 1.0), ("logit_scale", 0.37), ("logits_scaling", 4.0)])
def test_lm_head_rows_bias_and_logit_scaling(scale_name, scale):
    torch.manual_seed(1)
    model = _BiasedHead(scale_name, scale)
    hidden = torch.randn(10, 8)
    logits = model.head(hidden)
    logits = logits * scale if scale_name == "logit_scale" else logits / scale
    rows, bias = lm_head_rows(model, torch.tensor([3, 31]), with_bias=True)
    got = fastsearch.prm_step_scores(hidden, torch.arange(10), rows, head_bias=bias)
    torch.testing.assert_close(got, torch.softmax(logits[:, [3, 31]], -1)[:, 0], atol=1e-6, rtol=1e-5)
    assert not rows.requires_grad


def test_lm_head_rows_errors():
    model = _BiasedHead()
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, V=40\)"):
        lm_head_rows(model, [3, 40])
    with pytest.raises(TypeError, match="get_output_embeddings"):
        lm_head_rows(torch.nn.Linear(2, 2), [0])
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-caps"):
        lm_head_rows(model, [3, 4])


def test_lm_head_rows_is_not_an_op_and_transformers_stays_optional():
    """It reads a transformers model, so it lives with the adapters; importing them needs no transformers."""
    assert not hasattr(fastsearch, "lm_head_rows") and "lm_head_rows" not in fastsearch.__all__
    code = ("import sys, fastsearch, fastsearch.search, fastsearch.integrations.transformers\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
