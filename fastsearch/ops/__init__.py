"""Op families: schema, reference, fake implementation, checks and public function, one module each."""

from fastsearch.ops.noise import randn, zo_neighbors
from fastsearch.ops.score import (
    aggregate_steps,
    cosine_scores,
    ensemble_scores,
    lm_head_rows,
    prm_scores,
    prm_step_scores,
)
from fastsearch.ops.select import (
    BeamSelection,
    beam_prune,
    effective_sample_size,
    resample,
    segmented_topk,
    sequence_keys,
    vote,
)
from fastsearch.ops.steps import ddim_step, flow_euler_step, flow_heun_step, renoise

__all__ = [
    "BeamSelection",
    "aggregate_steps",
    "beam_prune",
    "cosine_scores",
    "ddim_step",
    "effective_sample_size",
    "ensemble_scores",
    "flow_euler_step",
    "flow_heun_step",
    "lm_head_rows",
    "prm_scores",
    "prm_step_scores",
    "randn",
    "renoise",
    "resample",
    "segmented_topk",
    "sequence_keys",
    "vote",
    "zo_neighbors",
]
