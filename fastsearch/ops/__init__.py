"""Op families: schema, reference, fake implementation, checks and public function, one module each."""

from fastsearch.ops.noise import randn, zo_neighbors
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
    "beam_prune",
    "ddim_step",
    "effective_sample_size",
    "flow_euler_step",
    "flow_heun_step",
    "randn",
    "renoise",
    "resample",
    "segmented_topk",
    "sequence_keys",
    "vote",
    "zo_neighbors",
]
