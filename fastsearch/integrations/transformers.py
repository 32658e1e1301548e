"""transformers adapters for the LLM search algorithms (:mod:`fastsearch.search`).

- :class:`HFGenerator`: the ``Generator`` protocol over a causal LM's ``generate``, batched over all prompts
  and samples at once, stopping at stop strings (the step delimiter).
- :class:`HFProcessRewardModel`: the ``StepVerifier`` protocol for a Math-Shepherd-style PRM (a step tag
  after each step, scored by the softmax of a "good" and a "bad" token's logits at the tag). It runs the
  base model for hidden states only and scores the tags with :func:`fastsearch.prm_scores` on two rows of
  the LM head: no [tokens, vocabulary] logit matrix is ever formed. With ``incremental=True`` it keeps
  each live candidate's key/value cache between calls (:mod:`fastsearch.integrations.prm_engine`).
- :mod:`fastsearch.integrations.prms`: the Qwen2.5-Math-PRM and RLHFlow PRM formats, scored the same way.
- :func:`lm_head_rows`: those rows, read from a causal LM's output embedding and config, for use with
  :func:`fastsearch.prm_step_scores` / :func:`fastsearch.prm_scores` directly.

The adapters work on transformers models and tokenizers through their methods and attributes only, so
this module never imports ``transformers`` itself; running them needs the ``transformers`` extra
(``pip install fastsearch[transformers]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastsearch.checks import check_int
from fastsearch.integrations.prm_engine import SegmentPRM
from fastsearch.integrations.prm_engine import model_device as _model_device
from fastsearch.search import CompletionBatch
from fastsearch.search.types import check_generate_args


def single_token(tokenizer, name: str, text: str) -> int:
    """The id of ``text``, which must be exactly one token of ``tokenizer`` (ValueError naming ``name``)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{name}={text!r} must be exactly one token of the tokenizer, got ids {ids}")
    return ids[0]


def leading_special_ids(tokenizer) -> tuple[int, ...]:
    """The special tokens the tokenizer puts before a text (e.g. BOS), found by encoding a probe both ways."""
    plain = tokenizer.encode("x", add_special_tokens=False)
    framed = tokenizer.encode("x", add_special_tokens=True)
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return tuple(framed[:start])
    return ()


def lm_head_rows(model, token_ids, *, with_bias: bool = False):
    """The rows of a causal LM's output embedding for the given tokens: a PRM head without the vocabulary.

    Handles tied and untied heads and the linear logit scalings some configs apply after the head
    (``logit_scale`` multiplies, ``logits_scaling`` divides), which change the softmax over the rows.
    A model that soft-caps its logits (``final_logit_softcapping``) is refused: a cap is not linear, so
    no pair of rows reproduces it.

    Args:
        model: a transformers causal LM (anything with ``get_output_embeddings()`` returning a module with
            ``weight`` [V, H]).
        token_ids: C token ids (ints or a 1-D integer tensor), e.g. ``[good_id, bad_id]``.
        with_bias: also return the head's bias rows (None when the head has no bias).

    Returns:
        [C, H] rows in the head's dtype and device, detached; ``(rows, bias)`` with ``with_bias=True``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"model must have get_output_embeddings() with a [V, H] weight, got "
                        f"{type(model).__name__} (head {type(head).__name__})")
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__} soft-caps its logits (final_logit_softcapping="
                         f"{config.final_logit_softcapping}); head rows cannot reproduce a non-linear cap")
    ids = torch.as_tensor(token_ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be a 1-D sequence of integer ids, got {token_ids!r}")
    ids = ids.to(device=weight.device, dtype=torch.int64)
    vocab = weight.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token_ids must be in [0, V={vocab}), got {ids.tolist()}")
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    with torch.no_grad():
        rows = weight.index_select(0, ids) * scale if scale != 1.0 else weight.index_select(0, ids).clone()
        bias = getattr(head, "bias", None)
        bias = None if bias is None else bias.index_select(0, ids) * scale
    return (rows, bias) if with_bias else rows


class HFGenerator:
    """A ``Generator`` over a transformers causal LM: one batched ``generate`` for all prompts x samples.

    Sampling is plain temperature sampling (no top-k / top-p), greedy at ``temperature == 0``. A
    completion that stops at a stop string ends with it (the search cuts steps there); ``finished`` is
    True only when the model emitted its end-of-sequence token. ``num_tokens`` counts the generated
    tokens up to the stop string or through the end-of-sequence token.

    Args:
        model: a ``transformers`` causal LM (``GenerationMixin``).
        tokenizer: its tokenizer (fast or slow); it needs a pad token or an EOS token to pad with.
        batch_size: most rows (prompts x n) per ``generate`` call; larger requests are split.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = check_int("batch_size", batch_size)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token to pad prompts with")
        self.eos_token_id = tokenizer.eos_token_id

    def generate(self, prompts: Sequence[str], *, n: int = 1, stop: Sequence[str] | None = None,
                 temperature: float = 1.0, max_tokens: int = 256, seed: int | None = None):
        """Sample ``n`` completions of every prompt.

        Args:
            prompts: P prompt strings.
            n: completions per prompt.
            stop: stop strings (e.g. the step delimiter ``"\\n\\n"``).
            temperature: 0 decodes greedily.
            max_tokens: most new tokens per completion.
            seed: makes the call deterministic (torch's global RNG is restored afterwards).

        Returns:
            a :class:`fastsearch.search.CompletionBatch`: for each of the P prompts, n completions
            (``batch[p]`` is prompt p's list of :class:`fastsearch.search.Completion`).
        """
        prompts, n, stop, temperature, max_tokens, seed = check_generate_args(prompts, n, stop, temperature,
                                                                              max_tokens, seed)
        per_call = max(1, self.batch_size // n)
        devices = [_model_device(self.model)] if _model_device(self.model).type == "cuda" else []
        samples = []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), per_call):
                rows = self._generate_rows(prompts[start:start + per_call], n, stop, temperature, max_tokens)
                samples += (self._completion(row, stop) for row in rows)
        texts, tokens, finished = zip(*samples, strict=True) if samples else ((), (), ())
        return CompletionBatch(list(texts), tokens, finished, n)

    def _generate_rows(self, prompts, n, stop, temperature, max_tokens) -> list[list[int]]:
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # decoder-only models continue from the right end
        try:
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True).to(_model_device(self.model))
        finally:
            self.tokenizer.padding_side = side
        options = dict(max_new_tokens=max_tokens, num_return_sequences=n, pad_token_id=self.pad_token_id,
                       eos_token_id=self.eos_token_id)
        if temperature > 0:
            options.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
        else:
            options.update(do_sample=False)
        if stop:
            options.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(**batch, **options)
        return out[:, batch["input_ids"].shape[1]:].tolist()

    def _completion(self, tokens: list[int], stop: list[str]) -> tuple[str, int, bool]:
        end = tokens.index(self.eos_token_id) if self.eos_token_id in tokens else len(tokens)
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        cut = min(((text.find(s) + len(s), s) for s in stop if s in text), default=None)
        if cut is not None:
            # the fewest tokens whose text holds the stop string: that is where generation stopped
            low, high = 1, end
            while low < high:
                mid = (low + high) // 2
                if cut[1] in self.tokenizer.decode(tokens[:mid], skip_special_tokens=True):
                    high = mid
                else:
                    low = mid + 1
            return text[:cut[0]], low, False
        if end < len(tokens):
            return text, end + 1, True
        return text, len(tokens), False


class HFProcessRewardModel(SegmentPRM):
    """A ``StepVerifier`` for a Math-Shepherd-style PRM, scored on hidden states without vocabulary logits.

    Each candidate becomes ``problem + sep + step_1 + " " + step_tag + sep + step_2 + " " + step_tag ...``
    (``sep = step_separator``; tags inside the texts are dropped first); the score of step i is
    ``softmax(l_good, l_bad)[good]`` at the i-th tag, computed by :func:`fastsearch.prm_scores` from the
    last hidden states of the base model and the two LM-head rows.

    Tokenization: the problem (after the tokenizer's leading special tokens, e.g. BOS) and each step's
    ``sep + step + " " + tag`` are tokenized separately and concatenated, so that a cached prefix is
    exactly the start of a longer candidate (:mod:`fastsearch.integrations.prm_engine`).

    Args:
        model: a transformers causal LM (the PRM).
        tokenizer: its tokenizer; ``step_tag``, ``good_token`` and ``bad_token`` must each be one token.
        step_tag: the tag placed after each step (Math-Shepherd uses ``"ки"``).
        good_token, bad_token: the tokens whose logits at the tag score the step (e.g. ``"+"``, ``"-"``).
        step_separator: text between the problem and the steps and between steps.
        batch_size: candidates per forward pass.
        aggregate: how :meth:`score_candidates` aggregates steps (``"last"``, ``"min"``, ``"prod"``, ...; the
            ``method`` of :func:`fastsearch.aggregate_steps`, named as the searches' ``aggregate`` option).
        incremental: keep each live candidate's key/value cache between calls and run only new steps'
            tokens (same scores to float tolerance; see :mod:`fastsearch.integrations.prm_engine`).
    """

    def __init__(self, model, tokenizer, step_tag: str, good_token: str, bad_token: str, *,
                 step_separator: str = "\n", batch_size: int = 16, aggregate: str = "last", incremental: bool = False):
        self._setup(model, tokenizer, batch_size=batch_size, incremental=incremental, aggregate=aggregate)
        self.step_tag = step_tag
        self.step_separator = step_separator
        self.tag_id = single_token(tokenizer, "step_tag", step_tag)
        good, bad = single_token(tokenizer, "good_token", good_token), single_token(tokenizer, "bad_token", bad_token)
        self.head, self.head_bias = lm_head_rows(model, [good, bad], with_bias=True)
        self.marker_id, self.marker_text = self.tag_id, step_tag
        self.leading_ids = leading_special_ids(tokenizer)

    def _prefix_text(self, problem: str) -> str:
        return problem.replace(self.step_tag, "")

    def _segment_texts(self, index: int, step: str) -> tuple[str, str]:
        # the tag is removed from the step (a generator can emit it), so that tag i is the end of step i
        return f"{self.step_separator}{step.replace(self.step_tag, '')} {self.step_tag}", ""
