"""Search past one device: candidates sharded over a ``torch.distributed`` process group, selected exactly.

Each rank holds a contiguous shard of every group's candidates; the ops here return, on every rank, what the
single-process ops of :mod:`fastsearch.ops` return for the concatenated candidates (indices bit for bit), and
:func:`exchange_rows` moves resampled particles so that every rank keeps an equal share. The searches of
:mod:`fastsearch.diffusion` and :mod:`fastsearch.search` take ``group=`` and are built on these.

Any backend torch.distributed offers works: NCCL between GPUs, gloo on CPUs. Every function is a collective:
all ranks of the group call it, in the same order.
"""

from fastsearch.distributed.ops import (
    beam_prune,
    effective_sample_size,
    exchange_rows,
    resample,
    segmented_topk,
    vote,
)
from fastsearch.distributed.rows import Rows
from fastsearch.distributed.shards import RankFailed, Shards, check_same_arguments, run_guarded

__all__ = [
    "RankFailed",
    "Rows",
    "Shards",
    "beam_prune",
    "check_same_arguments",
    "effective_sample_size",
    "exchange_rows",
    "resample",
    "run_guarded",
    "segmented_topk",
    "vote",
]
