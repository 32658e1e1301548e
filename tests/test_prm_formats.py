"""The Qwen2.5-Math-PRM and RLHFlow PRM formats against their full-model computation, on tiny random models
built from configs (Qwen2 with a 2-way token-classification head; a Llama causal LM) and a character-level
tokenizer built offline with the formats' special tokens and chat templates."""

import pytest
import torch

from fastsearch.integrations.prms import QWEN_SYSTEM, QwenMathPRM, RLHFlowPRM

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<extra_0>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
# Qwen's layout (a default system prompt when none is given); Llama 3's, which trims message contents.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{%- for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def char_tokenizer(template: str):
    """One token per printable ASCII character or newline, plus the special tokens, with a chat template."""
    vocab = {token: index for index, token in enumerate(SPECIALS)}
    for code in [10] + list(range(32, 127)):
        vocab[chr(code)] = len(vocab)
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = tokenizers.decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


def tiny_qwen_classifier(vocab_size: int, seed: int, mlp_head: bool = False, num_labels: int = 2, max_positions=512):
    config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels,
                                      max_position_embeddings=max_positions, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForTokenClassification(config).eval()
    with torch.no_grad():
        model.score.bias.normal_()
    if mlp_head:  # the released Qwen2.5-Math-PRM's head: Linear(H, H), ReLU, Linear(H, 2)
        model.score = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)).eval()
    return model


def tiny_llama(vocab_size: int, seed: int, max_positions=512):
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def qwen_reference(model, tokenizer, problem, steps, system=QWEN_SYSTEM):
    """The model card's computation: the whole chat tokenized, the model's own logits softmaxed at <extra_0>."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": problem},
                 {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        logits = model(ids).logits[0]
    return text, torch.softmax(logits[ids[0] == tokenizer.convert_tokens_to_ids("<extra_0>")].double(), -1)[:, 1]


def rlhflow_reference(model, tokenizer, problem, steps):
    """RLHFlow's computation: one user turn per step answered "+", the LM's softmax over "+" / "-" where each
    assistant "+" is predicted (the token before it)."""
    conversation = []
    for index, step in enumerate(steps):
        conversation += [{"role": "user", "content": f"{problem} {step}" if index == 0 else step},
                         {"role": "assistant", "content": "+"}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer.encode(text)
    header_end, plus, minus = (tokenizer.convert_tokens_to_ids(t) for t in ("<|end_header_id|>", "+", "-"))
    answers = [p for p in range(3, len(ids)) if ids[p] == plus and ids[p - 3] == header_end]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    at = torch.tensor(answers) - 1
    return text, torch.softmax(logits[at][:, [plus, minus]].double(), -1)[:, 0]


PROBLEMS = ["what is 2+2?", "name a prime", " spaced problem ", "q"]
STEP_LISTS = [["2+2 = 4", "so \\boxed{4}"], ["7"], [], [f"step {k}: x{k}" for k in range(12)]]


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return char_tokenizer(QWEN_TEMPLATE)


@pytest.fixture(scope="module")
def llama_tokenizer():
    return char_tokenizer(LLAMA_TEMPLATE)


def _check_against(prm, reference, problems, step_lists):
    scores, offsets = prm.score(problems, step_lists)
    assert offsets.tolist() == [0] + torch.tensor([len(s) for s in step_lists]).cumsum(0).tolist()
    assert scores.dtype == torch.float32 and scores.shape == (int(offsets[-1]),)
    for i, (problem, steps) in enumerate(zip(problems, step_lists, strict=True)):
        if not steps:
            continue
        text, expected = reference(problem, steps)
        assert prm.format(problem, steps) == text
        ids, positions = prm.token_ids(problem, steps)
        assert ids == prm.tokenizer.encode(text)[:len(ids)] and len(positions) == len(steps)
        torch.testing.assert_close(scores[offsets[i]:offsets[i + 1]].double(), expected, atol=2e-6, rtol=1e-5)
    return scores, offsets


@pytest.mark.parametrize("mlp_head", [False, True])
@pytest.mark.parametrize("system", [QWEN_SYSTEM, None])
def test_qwen_equals_full_model(qwen_tokenizer, mlp_head, system):
    model = tiny_qwen_classifier(len(qwen_tokenizer), seed=3, mlp_head=mlp_head)
    last = model.score[-1] if mlp_head else model.score
    prm = QwenMathPRM(model, qwen_tokenizer, system=system, batch_size=2, aggregate="min")
    handle = last.register_forward_hook(lambda *_: pytest.fail("the 2-way head ran on every token"))
    scores, offsets = prm.score(PROBLEMS, STEP_LISTS)
    handle.remove()  # the reference runs the model's own head
    _check_against(prm, lambda p, s: qwen_reference(model, qwen_tokenizer, p, s, system), PROBLEMS, STEP_LISTS)
    candidates = prm.score_candidates(PROBLEMS, STEP_LISTS)
    assert torch.isnan(candidates[2])
    torch.testing.assert_close(candidates[3], scores[offsets[3]:offsets[4]].min())


def test_rlhflow_equals_full_model(llama_tokenizer):
    model = tiny_llama(len(llama_tokenizer), seed=4)
    prm = RLHFlowPRM(model, llama_tokenizer, batch_size=3)
    assert prm.trims  # Llama 3's template trims contents; the format follows it
    steps = [["first step ", " second"], ["only"], [], ["  a  ", "b", "c", "d", "e", "f", "g"]]
    handle = model.lm_head.register_forward_hook(lambda *_: pytest.fail("the [T, V] LM head ran"))
    prm.score(PROBLEMS, steps)
    handle.remove()
    _check_against(prm, lambda p, s: rlhflow_reference(model, llama_tokenizer, p, s), PROBLEMS, steps)


def test_rlhflow_without_trimming():
    tokenizer = char_tokenizer(LLAMA_TEMPLATE.replace(" | trim", ""))
    model = tiny_llama(len(tokenizer), seed=5)
    prm = RLHFlowPRM(model, tokenizer)
    assert not prm.trims
    steps = [[" lead", "trail "], ["x"], [], ["a", "b"]]
    _check_against(prm, lambda p, s: rlhflow_reference(model, tokenizer, p, s), PROBLEMS, steps)


def test_one_candidate_and_no_candidates(qwen_tokenizer):
    prm = QwenMathPRM(tiny_qwen_classifier(len(qwen_tokenizer), seed=1), qwen_tokenizer)
    scores, offsets = prm.score([], [])
    assert scores.shape == (0,) and offsets.tolist() == [0]
    scores, offsets = prm.score(["p"], [[]])
    assert scores.shape == (0,) and offsets.tolist() == [0, 0] and prm.forward_passes == 0
    one, _ = prm.score(["p"], [["s"]])
    assert one.shape == (1,) and 0 < float(one) < 1


def test_batch_size_does_not_change_scores(qwen_tokenizer, llama_tokenizer):
    qwen = tiny_qwen_classifier(len(qwen_tokenizer), seed=2)
    llama = tiny_llama(len(llama_tokenizer), seed=2)
    for make in (lambda b: QwenMathPRM(qwen, qwen_tokenizer, batch_size=b),
                 lambda b: RLHFlowPRM(llama, llama_tokenizer, batch_size=b)):
        together, offsets = make(16).score(PROBLEMS, STEP_LISTS)
        one_by_one, offsets_one = make(1).score(PROBLEMS, STEP_LISTS)
        assert torch.equal(offsets, offsets_one)
        torch.testing.assert_close(together, one_by_one, atol=2e-6, rtol=1e-5)


def test_errors(qwen_tokenizer, llama_tokenizer):
    qwen = tiny_qwen_classifier(len(qwen_tokenizer), seed=0)
    llama = tiny_llama(len(llama_tokenizer), seed=0)
    prm = QwenMathPRM(qwen, qwen_tokenizer)
    with pytest.raises(ValueError, match=r"step_lists\[1\]\[0\] contains the separator token '<extra_0>'"):
        prm.score(["a", "b"], [["x"], ["y <extra_0> z"]])
    with pytest.raises(ValueError, match=r"problems\[0\] contains the separator token"):
        prm.score(["a<extra_0>"], [["x"]])
    with pytest.raises(TypeError, match="2-way score head .* got LlamaForCausalLM"):
        QwenMathPRM(llama, qwen_tokenizer)
    with pytest.raises(TypeError, match="of 3 outputs"):
        QwenMathPRM(tiny_qwen_classifier(len(qwen_tokenizer), seed=0, num_labels=3), qwen_tokenizer)
    with pytest.raises(TypeError, match="get_output_embeddings"):
        RLHFlowPRM(qwen, llama_tokenizer)
    with pytest.raises(ValueError, match="separator='<im>' must be exactly one token"):
        QwenMathPRM(qwen, qwen_tokenizer, separator="<im>")
    with pytest.raises(ValueError, match=r"good_token='\+\+' must be exactly one token"):
        RLHFlowPRM(llama, llama_tokenizer, good_token="++")
    no_template = char_tokenizer(QWEN_TEMPLATE)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        QwenMathPRM(qwen, no_template)
    mangling = char_tokenizer(QWEN_TEMPLATE.replace("m['content']", "m['content'] | lower"))
    with pytest.raises(ValueError, match="does not place message contents verbatim"):
        QwenMathPRM(qwen, mangling)
    short = QwenMathPRM(tiny_qwen_classifier(len(qwen_tokenizer), seed=0, max_positions=120), qwen_tokenizer)
    with pytest.raises(ValueError, match=r"candidate 1 is \d+ tokens long, more than the model's "
                                         r"max_position_embeddings=120; the PRM truncates nothing"):
        short.score(["a", "b"], [["x"], ["y" * 80]])
    with pytest.raises(ValueError, match="one problem per candidate"):
        prm.score(["a", "b"], [["x"]])
    with pytest.raises(TypeError, match="incremental must be a bool"):
        QwenMathPRM(qwen, qwen_tokenizer, incremental="yes")


def test_math_shepherd_segments_keep_the_leading_special_tokens():
    """Per-segment ids start with what the tokenizer puts before a text (BOS) and drop what it appends (EOS,
    after the last tag: it cannot change a score); the rest equals tokenizing the whole text."""
    from fastsearch.integrations.transformers import HFProcessRewardModel

    tokenizer = char_tokenizer(QWEN_TEMPLATE)
    tokenizer._tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A <|eot_id|>", special_tokens=[("<|begin_of_text|>", 5), ("<|eot_id|>", 8)])
    model = tiny_llama(len(tokenizer), seed=6)
    prm = HFProcessRewardModel(model, tokenizer, "<extra_0>", "+", "-")
    assert prm.leading_ids == (5,)
    problem, steps = "2+3?", ["2+3 = 5", "so 5"]
    whole = tokenizer(prm.format(problem, steps))["input_ids"]
    ids, positions = prm.token_ids(problem, steps)
    assert whole[0] == 5 and whole[-1] == 8 and ids == whole[:-1]
    assert [ids[p] for p in positions] == [tokenizer.convert_tokens_to_ids("<extra_0>")] * 2
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0]
    plus, minus = tokenizer.convert_tokens_to_ids("+"), tokenizer.convert_tokens_to_ids("-")
    expected = torch.softmax(logits[positions][:, [plus, minus]].double(), -1)[:, 0]
    torch.testing.assert_close(prm.score([problem], [steps])[0].double(), expected, atol=2e-6, rtol=1e-5)
