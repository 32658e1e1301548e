"""Op families: schema, reference, fake implementation, checks and public function, one module each.

``_common`` holds the dispatch every op shares and ``groups`` the layout of candidate groups that the
selection, particle, vote and scoring ops share. Importing this package defines every op's schema, which
``fastsearch/__init__.py`` needs done before it loads the compiled kernels that implement them.

Every public op follows one calling and result convention:

- Tensors first; options are keyword-only. Ragged groups are always ``offsets=`` (int64 [G + 1], CSR
  style); without it a dense [G, C] tensor is G groups of C and a 1-D tensor is one group, whose
  results lose the group dimension (as ``torch.topk`` treats 1-D input).
- The variant of an op (which aggregation, vote, ensemble or resampling scheme) is always ``method=``,
  a name from the op's table (``AGGREGATIONS``, ``VOTE_MODES``, ``ENSEMBLES``, ``RESAMPLE_METHODS``).
- An op with more than one output returns a NamedTuple whose first field is the primary result;
  selections put values before indices, as ``torch.topk`` and ``torch.max`` do, then any per-group
  extras: :class:`TopK` ``(values, indices)``, :class:`BeamSelection` ``(values, indices, counts,
  parents)``, :class:`PRMScores` ``(scores, step_scores)``, :class:`DDIMStepOutput` ``(prev_sample,
  pred_original_sample)``. Fields unpack positionally and read by name.
"""

from fastsearch.ops.noise import randn, zo_neighbors
from fastsearch.ops.particles import effective_sample_size, resample
from fastsearch.ops.score import (
    PRMScores,
    aggregate_steps,
    cosine_scores,
    ensemble_scores,
    prm_scores,
    prm_step_scores,
)
from fastsearch.ops.select import BeamSelection, TopK, beam_prune, segmented_topk
from fastsearch.ops.steps import DDIMStepOutput, ddim_step, flow_euler_step, flow_heun_step, renoise
from fastsearch.ops.vote import sequence_keys, vote

__all__ = [
    "BeamSelection",
    "DDIMStepOutput",
    "PRMScores",
    "TopK",
    "aggregate_steps",
    "beam_prune",
    "cosine_scores",
    "ddim_step",
    "effective_sample_size",
    "ensemble_scores",
    "flow_euler_step",
    "flow_heun_step",
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
