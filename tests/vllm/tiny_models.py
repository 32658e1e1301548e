"""Tiny random models saved to a folder that vLLM loads like any checkpoint (no download).

- :func:`save_generator`: a Llama causal LM over a character-level tokenizer whose only special token is
  its EOS ``</s>`` (so every sampled token but EOS is one character of the text: re-tokenizing a completion
  gives its token count back).
- :func:`save_prm`: a Qwen2.5-Math-PRM-shaped model (``Qwen2ForProcessRewardModel``: a Qwen2 body and a
  ``score`` head Linear(H, H) -> ReLU -> Linear(H, 2)) with a ChatML chat template and the ``<extra_0>``
  step separator, and :func:`prm_reference_scores`, its step scores computed directly with transformers'
  ``Qwen2Model`` and the same head in torch.

head_dim is 64: vLLM's CPU attention refuses smaller heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +-=.,:?\n")
EOS = "</s>"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PRM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]


def _char_tokenizer(specials: list[str], *, eos: str, chat_template: str | None = None):
    """A fast tokenizer: one token per character of CHARS, the special tokens matched whole first."""
    import tokenizers
    import transformers

    vocab = {token: index for index, token in enumerate(specials)}
    for char in CHARS:
        vocab[char] = len(vocab)
    # "?" stands for characters outside CHARS, so that no <unk> special token exists to be sampled
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="?"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = tokenizers.decoders.Fuse()
    core.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos,
                                                     additional_special_tokens=[t for t in specials if t != eos])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_generator(folder: Path, *, seed: int = 0, eos_bias: float = 0.0, newline_bias: float = 0.0) -> Path:
    """A random 2-layer Llama (hidden 128, 2 heads of 64) and its character tokenizer, saved in ``folder``.

    ``eos_bias`` / ``newline_bias`` add the final norm's weight, times the value, to the LM-head rows of
    ``</s>`` and ``"\\n"``, which makes them likelier (and so stops within a few tokens).
    """
    import transformers

    tokenizer = _char_tokenizer([EOS], eos=EOS)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False,
                                      bos_token_id=None, eos_token_id=eos_id, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        norm = model.model.norm.weight
        model.lm_head.weight[eos_id] += eos_bias * norm
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("\n")] += newline_bias * norm
    model.generation_config = transformers.GenerationConfig(eos_token_id=eos_id)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _prm_config(tokenizer):
    import transformers

    return transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=1024, tie_word_embeddings=False,
                                    eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                    architectures=["Qwen2ForProcessRewardModel"], num_labels=2)


def save_prm(folder: Path, *, seed: int = 1, head_scale: float = 2.0) -> Path:
    """A random Qwen2.5-Math-PRM-shaped model (2 layers, hidden 128, head_dim 64) saved in ``folder``.

    The weights are a transformers ``Qwen2Model``'s under ``model.`` and the head's under ``score.0`` /
    ``score.2`` (the names of Qwen2.5-Math-PRM's checkpoints); config.json names the architecture
    ``Qwen2ForProcessRewardModel``. The head's weights are scaled by ``head_scale`` so that step scores
    differ from one candidate to the next by more than float32 noise.
    """
    import transformers
    from safetensors.torch import save_file

    tokenizer = _char_tokenizer(PRM_SPECIALS, eos="<|im_end|>", chat_template=CHATML)
    config = _prm_config(tokenizer)
    torch.manual_seed(seed)
    body = transformers.Qwen2Model(config).eval()
    head = _prm_head(config.hidden_size)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.mul_(head_scale)
    state = {f"model.{name}": tensor.contiguous() for name, tensor in body.state_dict().items()}
    state.update({f"score.{name}": tensor.contiguous() for name, tensor in head.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _prm_head(hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))


def prm_reference_scores(folder: Path, texts: list[str], separator: str = "<extra_0>") -> list[list[float]]:
    """Step scores computed without vLLM: transformers' ``Qwen2Model`` forward on each text, the head on the
    last hidden states, ``softmax(logits)[:, 1]`` at every separator token (Qwen2.5-Math-PRM's recipe)."""
    import transformers
    from safetensors.torch import load_file

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    body = transformers.Qwen2Model(config).eval()
    body.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    head = _prm_head(config.hidden_size)
    head.load_state_dict({k.removeprefix("score."): v for k, v in state.items() if k.startswith("score.")})
    separator_id = tokenizer.convert_tokens_to_ids(separator)
    scores = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
            hidden = body(input_ids=ids).last_hidden_state[0]
            probabilities = head(hidden.float()).softmax(-1)[:, 1]
            scores.append(probabilities[ids[0] == separator_id].tolist())
    return scores


def describe(folder: Path) -> dict:
    """config.json of a saved model (for messages)."""
    return json.loads((folder / "config.json").read_text())
