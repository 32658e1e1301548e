"""Step verifiers for the chat-format PRMs people use, scored on hidden states without vocabulary logits.

- :class:`QwenMathPRM`: the Qwen2.5-Math-PRM format. A chat (system prompt, the problem as the user turn,
  the steps as the assistant turn, each step followed by the separator token ``<extra_0>``) read by a
  token-classification model; the score of step i is ``softmax(head(h))[1]`` at the i-th separator, h the
  last hidden state. The 2-way head (a ``Linear(H, 2)``, or an MLP ending in one, as the released model's
  is) is applied to the S separator rows only: no [T, 2] logits, let alone [T, V].
- :class:`RLHFlowPRM`: the RLHFlow format (e.g. ``RLHFlow/Llama3.1-8B-PRM-Deepseek-Data``). One chat turn
  per step: the user says the step (the first turn is ``problem + " " + step_1``), the assistant answers
  ``"+"``; the score of step i is ``softmax(l_+, l_-)[+]`` at the last token of the i-th assistant-turn
  header (where the model predicts its "+"), from two rows of the causal LM's head.

Both read the chat layout from the tokenizer's own chat template (rendered once with marker texts) and
score through :func:`fastsearch.prm_scores`; both take ``incremental=True`` (the KV cache of
:mod:`fastsearch.integrations.prm_engine`). Like the rest of the adapters, this module never imports
``transformers``.
"""

from __future__ import annotations

import torch

from fastsearch.integrations.prm_engine import SegmentPRM
from fastsearch.integrations.transformers import lm_head_rows, single_token

QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# Marker texts: rendered into a conversation to find where the contents go (no whitespace, no template syntax).
_MARKS = tuple(f"FSMARK{index}X" for index in range(6))


def _render(tokenizer, messages, what: str) -> str:
    if not callable(getattr(tokenizer, "apply_chat_template", None)) or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer has no chat template; {what} reads its chat layout from one")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def _split(text: str, marks, what: str) -> list[str]:
    """``text`` cut at each marker in order (each must occur exactly once): len(marks) + 1 pieces."""
    pieces = []
    for mark in marks:
        if text.count(mark) != 1:
            raise ValueError(f"the tokenizer's chat template does not place message contents verbatim, as {what} "
                             f"needs (rendered {text!r})")
        before, text = text.split(mark)
        pieces.append(before)
    return pieces + [text]


class QwenMathPRM(SegmentPRM):
    """A ``StepVerifier`` for the Qwen2.5-Math-PRM format (``Qwen/Qwen2.5-Math-PRM-7B`` / ``-72B``).

    The text of a candidate is the tokenizer's chat template applied to ``[system, user: problem,
    assistant: sep.join(steps) + sep]`` (``sep = separator``), as the model card builds it; the score of
    step i is the positive-class probability ``softmax(head(h_i))[1]`` at the i-th separator.

    Tokenization: the chat up to the assistant's content and each ``step + sep`` are tokenized separately
    (the separator is a special token, so this equals tokenizing the whole text); the end of the chat
    after the last separator is not run (it cannot change a score). A step or problem that contains the
    separator is an error.

    Args:
        model: a token-classification model with a 2-way ``score`` head: transformers'
            ``Qwen2ForTokenClassification`` (``num_labels=2``) or the released model's
            ``Qwen2ForProcessRewardModel`` (``score`` an MLP ending in ``Linear(H, 2)``).
        tokenizer: its tokenizer, with a chat template and ``separator`` as one token.
        separator: the step separator token.
        system: the system prompt (None: no system message; the template may add its default).
        batch_size, aggregate, incremental: as in :class:`~fastsearch.integrations.transformers.HFProcessRewardModel`.
    """

    positive_index = 1

    def __init__(self, model, tokenizer, *, separator: str = "<extra_0>", system: str | None = QWEN_SYSTEM,
                 batch_size: int = 16, aggregate: str = "last", incremental: bool = False):
        self._setup(model, tokenizer, batch_size=batch_size, incremental=incremental, aggregate=aggregate)
        head = getattr(model, "score", None)
        if isinstance(head, torch.nn.Sequential) and len(head) > 1:
            self.features, head = head[:-1], head[-1]
        if not isinstance(head, torch.nn.Linear) or head.out_features != 2:
            outputs = getattr(head, "out_features", None)
            raise TypeError(f"model must be a token-classification model with a 2-way score head (num_labels=2, "
                            f"e.g. Qwen2ForTokenClassification), got {type(model).__name__} with score "
                            f"{type(head).__name__}" + ("" if outputs is None else f" of {outputs} outputs"))
        self.head = head.weight.detach()
        self.head_bias = None if head.bias is None else head.bias.detach()
        self.separator = separator
        self.marker_id, self.marker_text = single_token(tokenizer, "separator", separator), separator
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages += [{"role": "user", "content": _MARKS[0]}, {"role": "assistant", "content": _MARKS[1]}]
        self._before, self._between, self.suffix_text = _split(_render(tokenizer, messages, "QwenMathPRM"),
                                                               _MARKS[:2], "QwenMathPRM")

    def _prefix_text(self, problem: str) -> str:
        return self._before + problem + self._between

    def _segment_texts(self, index: int, step: str) -> tuple[str, str]:
        return step + self.separator, ""


class RLHFlowPRM(SegmentPRM):
    """A ``StepVerifier`` for the RLHFlow PRM format: one chat turn per step, "+" / "-" at each turn's end.

    The text of a candidate is the tokenizer's chat template applied to ``[user: problem + " " + step_1,
    assistant: "+", user: step_2, assistant: "+", ...]``; the score of step i is ``softmax(l_good,
    l_bad)[good]`` from the causal LM's logits at the last token of the i-th assistant-turn header (the
    position that predicts the assistant's answer), computed from two rows of the LM head.

    Tokenization: the chat up to the end of the problem, then per step the user turn with the assistant
    header (scored at its last token) and the assistant's answer with the turn's end, each tokenized
    separately. A chat template that trims contents (Llama 3's does) is followed: the problem's leading
    and the steps' surrounding whitespace is dropped as the template would.

    Args:
        model: a transformers causal LM (e.g. ``RLHFlow/Llama3.1-8B-PRM-Deepseek-Data``).
        tokenizer: its tokenizer, with a chat template; ``good_token`` and ``bad_token`` one token each.
        good_token, bad_token: the assistant's answers for a good and a bad step.
        batch_size, aggregate, incremental: as in :class:`~fastsearch.integrations.transformers.HFProcessRewardModel`.
    """

    def __init__(self, model, tokenizer, *, good_token: str = "+", bad_token: str = "-", batch_size: int = 16,
                 aggregate: str = "last", incremental: bool = False):
        self._setup(model, tokenizer, batch_size=batch_size, incremental=incremental, aggregate=aggregate)
        self.good_id = single_token(tokenizer, "good_token", good_token)
        bad_id = single_token(tokenizer, "bad_token", bad_token)
        self.head, self.head_bias = lm_head_rows(model, [self.good_id, bad_id], with_bias=True)
        self.good_token = good_token
        problem, first, answer1, second, answer2 = _MARKS[:5]
        text = _render(tokenizer, [{"role": "user", "content": f"{problem} {first}"},
                                   {"role": "assistant", "content": answer1},
                                   {"role": "user", "content": second},
                                   {"role": "assistant", "content": answer2}], "RLHFlowPRM")
        before, space, header, between, header2, end = _split(text, _MARKS[:5], "RLHFlowPRM")
        if space != " " or header2 != header or not between.startswith(end):
            raise ValueError(f"the tokenizer's chat template does not lay out every user / assistant turn alike, "
                             f"as RLHFlowPRM needs (rendered {text!r})")
        padded = _render(tokenizer, [{"role": "user", "content": f" {first} "}], "RLHFlowPRM")
        self.trims = f" {first} " not in padded
        self._before, self._header, self._end, self._next_turn = before, header, end, between[len(end):]
        self.suffix_text = ""

    def _prefix_text(self, problem: str) -> str:
        return self._before + (problem.lstrip() if self.trims else problem)

    def _segment_texts(self, index: int, step: str) -> tuple[str, str]:
        if self.trims:
            step = step.rstrip() if index == 0 else step.strip()
        opening = " " if index == 0 else self._next_turn
        return opening + step + self._header, self.good_token + self._end

    def _tokenize(self, problems, step_lists, first_steps=None, need_prefix=None):
        prefixes, segments = super()._tokenize(problems, step_lists, first_steps, need_prefix)
        for i, parts in enumerate(segments):
            for offset, (ids, scored_at) in enumerate(parts):
                if scored_at + 1 >= len(ids) or ids[scored_at + 1] != self.good_id:
                    step = (first_steps[i] if first_steps else 0) + offset
                    raise ValueError(f"step_lists[{i}][{step}]: the assistant's {self.good_token!r} is not a token "
                                     "of its own after the turn header (the tokenizer merges it)")
        return prefixes, segments
