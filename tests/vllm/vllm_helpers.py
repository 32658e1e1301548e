"""Test doubles around the real engines: call counters and recorders, and a deterministic step verifier."""

from __future__ import annotations

from collections.abc import Sequence


class CountingLLM:
    """A ``vllm.LLM`` proxy that counts ``generate`` and ``encode`` calls and keeps what ``generate`` returned."""

    def __init__(self, llm):
        self.llm = llm
        self.runner_type = llm.runner_type
        self.generate_calls = 0
        self.encode_calls = 0
        self.requests: list[int] = []  # requests per generate call
        self.outputs: list = []  # per generate call: the RequestOutputs

    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    def generate(self, prompts, params, **options):
        self.generate_calls += 1
        self.requests.append(len(prompts))
        outputs = self.llm.generate(prompts, params, **options)
        self.outputs.append(outputs)
        return outputs

    def encode(self, *args, **options):
        self.encode_calls += 1
        return self.llm.encode(*args, **options)

    def generated_token_ids(self) -> list[list[int]]:
        """The token ids of every completion vLLM returned, all calls."""
        return [list(sample.token_ids) for call in self.outputs for request in call for sample in request.outputs]


class RecordingGenerator:
    """Wraps a generator and keeps every completion it returned."""

    def __init__(self, generator):
        self.generator = generator
        self.completions = []

    def generate(self, prompts, **options):
        out = self.generator.generate(prompts, **options)
        self.completions.extend(completion for samples in out for completion in samples)
        return out


class RecordingVerifier:
    """Wraps a step verifier and keeps every call's candidates and packed scores."""

    def __init__(self, verifier):
        self.verifier = verifier
        self.calls = []

    def score(self, problems, step_lists):
        scores, offsets = self.verifier.score(problems, step_lists)
        self.calls.append((list(problems), [list(steps) for steps in step_lists], scores.clone(), offsets.clone()))
        return scores, offsets


class LetterVerifier:
    """A deterministic PRM stand-in: a step's score is the share of its characters that are letters, in
    (0, 1) (an empty step scores 0.5)."""

    def __init__(self):
        self.calls = 0

    def score(self, problems: Sequence[str], step_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        self.calls += 1
        return [[(sum(char.isalpha() for char in step) + 0.5) / (len(step) + 1.0) for step in steps]
                for steps in step_lists]


def token_count(tokenizer, completion) -> int:
    """A completion's tokens from its text: re-tokenized (one token per character for the tiny tokenizer), plus
    the EOS token when it ended with one (vLLM counts it; the text does not show it)."""
    return len(tokenizer.encode(completion.text, add_special_tokens=False)) + int(completion.finished)
