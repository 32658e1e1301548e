"""Image verifiers for the noise searches and :func:`~fastsearch.integrations.diffusers.search_pipeline`.

Every verifier is a ``verifier(images, **kwargs) -> [B]`` callable (higher is better) that reports what it spent
(:class:`VerifierCost` in ``.cost``: calls, images, seconds); the searches put that beside their NFEs.

- :class:`Ensemble`: verifiers combined by rank, z-score or weighted mean, per prompt (Ma et al. 2025).
- :class:`VLMJudge`: a vision-language model over an OpenAI-compatible chat endpoint, scoring by a rubric.
- :class:`AestheticMLP`, :func:`load_aesthetic_mlp`: the LAION aesthetic predictor's head.
- :class:`Metered`: any callable with its compute counted.

The verifiers on transformers models (CLIPScore, the aesthetic predictor on its CLIP encoder) are in
:mod:`fastsearch.integrations.verifiers`.
"""

from fastsearch.verifiers.aesthetic import AestheticMLP, load_aesthetic_mlp
from fastsearch.verifiers.base import Metered, MeteredVerifier, VerifierCost, cost_of
from fastsearch.verifiers.ensemble import Ensemble
from fastsearch.verifiers.images import as_unit_rgb, png_data_url, resize_crop_normalize
from fastsearch.verifiers.judge import DEFAULT_RUBRIC, VLMJudge, VLMReplyError

__all__ = [
    "DEFAULT_RUBRIC",
    "AestheticMLP",
    "Ensemble",
    "Metered",
    "MeteredVerifier",
    "VLMJudge",
    "VLMReplyError",
    "VerifierCost",
    "as_unit_rgb",
    "cost_of",
    "load_aesthetic_mlp",
    "png_data_url",
    "resize_crop_normalize",
]
