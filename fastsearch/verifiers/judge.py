"""A vision-language model as a verifier, over an OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API).

Each image goes in its own chat request (servers batch concurrent requests): the rubric as text and the image as a
base64 PNG data URL in an ``image_url`` content part. The model must reply with a JSON object holding the score,
which is parsed strictly; a malformed reply is asked again, and after ``retries`` more tries it is an error that
shows the reply.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from fastsearch.checks import check_int
from fastsearch.verifiers.base import MeteredVerifier
from fastsearch.verifiers.images import as_unit_rgb, check_image_range, png_data_url

DEFAULT_RUBRIC = (
    "You are judging an image made by a text-to-image model for the prompt: \"{prompt}\".\n"
    "Rate how faithfully the image shows the prompt (objects, attributes, counts, relations) and its visual "
    "quality, as one number from {low} to {high}, higher being better.\n"
    "Reply with a JSON object and nothing else, exactly of the form {{\"score\": <number>}}."
)
# a reply may be the JSON object alone or one fenced code block holding it, nothing else
_FENCED = re.compile(r"\A```(?:json)?\s*\n?(.*?)\n?```\Z", re.S)


class VLMReplyError(ValueError):
    """The judge's replies for an image stayed malformed after every retry."""


def _reply_text(response) -> str:
    """The first choice's message content of a chat completion (an openai object or a plain dict)."""
    choices = response.get("choices") if isinstance(response, dict) else getattr(response, "choices", None)
    if not choices:
        raise ValueError("the response has no choices")
    message = choices[0].get("message") if isinstance(choices[0], dict) else getattr(choices[0], "message", None)
    content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
    if not isinstance(content, str):
        raise ValueError(f"the response's message content is {type(content).__name__}, not text")
    return content


class VLMJudge(MeteredVerifier):
    """Scores images with a VLM behind an OpenAI-compatible chat endpoint, by a rubric with a JSON reply.

    The rubric is formatted with ``prompt`` (the image's prompt), ``low`` and ``high`` (the score range) and sent
    with the image; the reply must be a JSON object (alone, or as the only content of one fenced code block) whose
    ``key`` holds a number in ``score_range``. Anything else (prose around it, a missing key, a string, a number
    out of range) is malformed: the request is sent again up to ``retries`` times, then :class:`VLMReplyError`
    (a ValueError) names the image and quotes the last reply. Errors of the client itself (connection, HTTP status)
    propagate: the openai client retries those itself (its ``max_retries``).

    Args:
        client: anything with ``client.chat.completions.create(model=..., messages=..., **options)`` returning a
            chat completion (``openai.OpenAI(base_url=..., api_key=...)`` is the maintained one).
        model: the served model's name (e.g. ``"Qwen/Qwen2.5-VL-7B-Instruct"``).
        rubric: the instruction, a ``str.format`` template with ``{prompt}``, ``{low}`` and ``{high}`` available.
        score_range: ``(low, high)`` the score must lie in.
        key: the JSON key of the score.
        retries: extra tries per image after a malformed reply.
        max_workers: requests in flight at once.
        image_range: the value range of float image tensors, (0, 1) or (-1, 1).
        request_options: more arguments of every ``create`` call (default ``{"temperature": 0.0, "max_tokens":
            256}``).

    Cost: :attr:`cost` counts calls, images and seconds; :attr:`requests` counts chat requests (retries included).

    Example:
        >>> from openai import OpenAI
        >>> judge = VLMJudge(OpenAI(base_url="http://localhost:8000/v1", api_key="none"), "Qwen/Qwen2.5-VL-7B-Instruct")
        >>> judge(images, prompts=["a red fox"] * len(images))      # [B] float32 in [0, 10]
    """

    def __init__(self, client, model: str, rubric: str = DEFAULT_RUBRIC, *, score_range=(0.0, 10.0),
                 key: str = "score", retries: int = 2, max_workers: int = 8, image_range=(0.0, 1.0),
                 request_options: dict | None = None):
        super().__init__()
        create = getattr(getattr(getattr(client, "chat", None), "completions", None), "create", None)
        if not callable(create):
            raise TypeError(f"client must have client.chat.completions.create(...) (e.g. openai.OpenAI), got "
                            f"{type(client).__name__}")
        if not isinstance(model, str) or not model:
            raise TypeError(f"model must be the served model's name (a non-empty str), got {model!r}")
        if not isinstance(rubric, str) or not rubric.strip():
            raise TypeError(f"rubric must be a non-empty str, got {type(rubric).__name__}")
        low, high = check_image_range(score_range, "score_range")
        try:
            rubric.format(prompt="", low=low, high=high)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"rubric must be a str.format template using only {{prompt}}, {{low}} and {{high}} "
                             f"(double other braces): {error!r}") from error
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        if request_options is not None and not isinstance(request_options, dict):
            raise TypeError(f"request_options must be a dict, got {type(request_options).__name__}")
        self.client, self.model, self.rubric, self.key = client, model, rubric, key
        self.score_range = (low, high)
        self.retries = check_int("retries", retries, minimum=0)
        self.max_workers = check_int("max_workers", max_workers)
        self.image_range = check_image_range(image_range)
        self.request_options = {"temperature": 0.0, "max_tokens": 256} if request_options is None \
            else dict(request_options)
        self.uses_prompt = "{prompt}" in rubric
        self.requests = 0
        self._lock = threading.Lock()  # requests are counted from the worker threads

    def parse(self, reply: str) -> float:
        """The score in ``reply``, or a ValueError saying why the reply is malformed."""
        text = reply.strip()
        fenced = _FENCED.match(text)
        if fenced:
            text = fenced.group(1).strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a JSON object ({error.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"the JSON is a {type(value).__name__}, not an object")
        if self.key not in value:
            raise ValueError(f"the JSON object has no {self.key!r} key")
        score = value[self.key]
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise ValueError(f"{self.key!r} is {score!r}, not a finite number")
        low, high = self.score_range
        if not low <= score <= high:
            raise ValueError(f"{self.key!r} is {score}, outside [{low:g}, {high:g}]")
        return float(score)

    def messages(self, image: torch.Tensor, prompt: str | None) -> list[dict]:
        """The chat messages for one image [3, H, W] in [0, 1]: one user turn, rubric text then the image."""
        low, high = self.score_range
        text = self.rubric.format(prompt=prompt if prompt is not None else "", low=f"{low:g}", high=f"{high:g}")
        return [{"role": "user", "content": [{"type": "text", "text": text},
                                             {"type": "image_url", "image_url": {"url": png_data_url(image)}}]}]

    def judge(self, image: torch.Tensor, prompt: str | None, index: int) -> float:
        """One image's score, asking again after malformed replies."""
        messages = self.messages(image, prompt)
        reasons = []
        for _ in range(self.retries + 1):
            with self._lock:
                self.requests += 1
            response = self.client.chat.completions.create(model=self.model, messages=messages,
                                                           **self.request_options)
            reply = ""
            try:
                reply = _reply_text(response)
                return self.parse(reply)
            except ValueError as error:
                reasons.append(f"{error}; reply: {reply[:200]!r}")
        raise VLMReplyError(f"the judge's reply for image {index} stayed malformed after {self.retries + 1} tries; "
                            f"expected a JSON object like {{\"{self.key}\": <number in [{self.score_range[0]:g}, "
                            f"{self.score_range[1]:g}]>}}; last: {reasons[-1]}")

    def _prompts(self, prompts, count: int) -> list[str | None]:
        if prompts is None:
            if self.uses_prompt:
                raise ValueError("prompts is required: the rubric uses {prompt} (pass prompts=[...], one per image)")
            return [None] * count
        if isinstance(prompts, str):
            return [prompts] * count
        if not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a str or a sequence of str, got {type(prompts).__name__}")
        if len(prompts) != count:
            raise ValueError(f"prompts has {len(prompts)} entries but there are {count} images")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{index}] must be a str, got {type(prompt).__name__}")
        return list(prompts)

    def score(self, images, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores of ``images`` ([B, 3, H, W] tensor, array or PIL images), ``prompts`` one per image (or one str
        for all): [B] float32 on the images' device (CPU for PIL images)."""
        pixels = as_unit_rgb(images, image_range=self.image_range)
        count = len(pixels)
        prompts = self._prompts(prompts, count)
        device = pixels[0].device
        with ThreadPoolExecutor(max_workers=min(self.max_workers, count)) as pool:
            scores = list(pool.map(self.judge, list(pixels), prompts, range(count)))
        return torch.tensor(scores, dtype=torch.float32, device=device)

    def __repr__(self) -> str:
        return f"VLMJudge(model={self.model!r}, score_range={self.score_range}, key={self.key!r})"
