"""Selection over large groups in Triton: the tiled kernels that take a batch whose largest group is over
``LARGE_GROUP`` candidates (semantics: csrc/README.md, "Selection ops"; the one-block kernels: select.py).

The one-block kernels hold a whole group in a register block of the next power of two above the largest
group: one compile per power of two, a compile time that grows with it (46 s for 8192 on sm_90) and no
compile at all past 2^20. Here every kernel is compiled for a fixed tile (a constexpr that does not depend on
the group sizes) and walks each group tile by tile with run-time trip counts, so one compiled kernel serves
every group size past the threshold. Results are the one-block kernels' (the same keys, ties and roundings),
except where noted.

- segmented_topk / beam_prune: rounds of a streaming top-``TILE``. A round walks the group and merges each
  tile into the best ``TILE`` so far (a bitonic sort of the 2 x ``TILE`` pairs, best first, lower index first
  on ties); the round's best are the next ``TILE`` ranks of the output, and the next round takes only the
  entries that come after the round's last one in that order. Rounds stop at min(k, selectable).
  beam_prune's dedup is settled first, once, into a scratch flag per candidate (each tile against the whole
  group, ``TILE x CHUNK`` pairs at a time); the parents are read back from the stored indices.
- vote: each voter's tally over the whole group (chunks of ``CHUNK``), tile by tile, keeping the winner so
  far; the chunks are the same for every voter, so the voters of one answer get bitwise equal sums. Then one
  walk finds the winning answer's first voter.
- resample: passes over the group: the max, the sum of the shifted weights, then the CDF (an fp64 running
  sum rounded per entry) into a scratch array the launcher allocates (and, for residual resampling, the
  copy counts and the residual CDF); each draw is a binary search in global memory.
- effective_sample_size: the max, then the two sums.
Weights are summed tile by tile, so a group's weight sum may differ from the one-block kernel's in the last
bit (a resampling draw then moves across a CDF boundary in rare cases, as between any two backends).
"""

import torch
import triton
import triton.language as tl

from .select import (
    _UNSELECTABLE,
    GPU_PAIR_TILE_PER_WARP,
    INTERPRETER_PAIR_TILE,
    _answer_tallies,
    _beam_candidates,
    _beaten_by_key,
    _group_bounds,
    _order_key,
    _sort_pairs,
    _stream_uniform,
    _voters,
)

# log2 of the top-k tile. GPU: 1024 entries merged with the best 1024 so far (a 2048-entry sort, as the largest
# one-block kernel's). The interpreter pays per sort step, not per element: 4096.
GPU_LOG_TILE = 10
INTERPRETER_LOG_TILE = 12
# Voters a vote program tallies per tile on a GPU (the pairwise tile is TILE x CHUNK), and under the
# interpreter (which pays per op, not per element).
GPU_VOTE_TILE = 256
INTERPRETER_VOTE_TILE = 1024  # under the tests' large groups (2100 and more): several tiles there too
# Candidates per tile of resample / effective_sample_size (the same under the interpreter, so that the tests'
# large groups take several tiles there too).
WEIGHT_TILE = 1024
_NO_LOCAL = tl.constexpr(2**31 - 1)
_LAST_KEY = tl.constexpr(2**63 - 1)


# -- top-k by rounds ------------------------------------------------------------------------------------


@triton.jit
def _merge_best(best_key, best_local, key, local, LOG_TILE: tl.constexpr):
    """The best ``2 ** LOG_TILE`` of two sets of (key, local) pairs, best first (larger key, then lower local)."""
    TILE: tl.constexpr = 2**LOG_TILE
    merged_key, merged_local = _sort_pairs(tl.reshape(tl.join(best_key, key), [2 * TILE]),
                                           tl.reshape(tl.join(best_local, local), [2 * TILE]), LOG_TILE + 1)
    first_half = tl.arange(0, 2)[:, None] == 0
    return (tl.sum(tl.where(first_half, tl.reshape(merged_key, [2, TILE]), 0), 0),
            tl.sum(tl.where(first_half, tl.reshape(merged_local, [2, TILE]), 0), 0))


@triton.jit
def _topk_key(scores_ptr, mask_ptr, start, local, size, HAS_MASK: tl.constexpr, LARGEST: tl.constexpr):
    """segmented_topk's order key at ``local`` (``_UNSELECTABLE`` where not selectable)."""
    inside = local < size
    score = tl.load(scores_ptr + start + local, mask=inside, other=0.0)
    if score.dtype != tl.float64:  # compared in fp32, float64 in fp64
        score = score.to(tl.float32)
    selectable = inside & (score == score)
    if HAS_MASK:
        selectable &= tl.load(mask_ptr + start + local, mask=inside, other=0) != 0
    if not LARGEST:
        score = -score
    return tl.where(selectable, _order_key(score), _UNSELECTABLE)


@triton.jit
def _beam_key(scores_ptr, finished_ptr, lengths_ptr, kept_ptr, start, local, size, length_penalty,
              negative_length_sign, HAS_FINISHED: tl.constexpr, PENALISED: tl.constexpr, DEDUP: tl.constexpr):
    """beam_prune's order key at ``local`` (``_UNSELECTABLE`` where not selectable or dropped by the dedup)."""
    inside = local < size
    adjusted, selectable = _beam_candidates(scores_ptr, finished_ptr, lengths_ptr, start, local, inside,
                                            length_penalty, negative_length_sign, HAS_FINISHED, PENALISED)
    if DEDUP:
        selectable &= tl.load(kept_ptr + start + local, mask=inside, other=0) != 0
    return tl.where(selectable, _order_key(adjusted), _UNSELECTABLE)


@triton.jit
def _next_best(scores_ptr, finished_ptr, lengths_ptr, kept_ptr, mask_ptr, start, size, last_key, last_local,
               length_penalty, negative_length_sign, BEAM: tl.constexpr, HAS_MASK: tl.constexpr,
               LARGEST: tl.constexpr, HAS_FINISHED: tl.constexpr, PENALISED: tl.constexpr, DEDUP: tl.constexpr,
               LOG_TILE: tl.constexpr):
    """One round: the best ``2 ** LOG_TILE`` entries that come after (last_key, last_local), best first."""
    TILE: tl.constexpr = 2**LOG_TILE
    lane = tl.arange(0, TILE)
    best_key = tl.full([TILE], _UNSELECTABLE, tl.int64)
    best_local = tl.full([TILE], _NO_LOCAL, tl.int32)
    for first in range(0, size, TILE):
        local = first + lane
        if BEAM:
            key = _beam_key(scores_ptr, finished_ptr, lengths_ptr, kept_ptr, start, local, size, length_penalty,
                            negative_length_sign, HAS_FINISHED, PENALISED, DEDUP)
        else:
            key = _topk_key(scores_ptr, mask_ptr, start, local, size, HAS_MASK, LARGEST)
        later = (key < last_key) | ((key == last_key) & (local > last_local))
        best_key, best_local = _merge_best(best_key, best_local, tl.where(later, key, _UNSELECTABLE), local,
                                           LOG_TILE)
    return best_key, best_local


@triton.jit
def _count_selectable(scores_ptr, finished_ptr, lengths_ptr, kept_ptr, mask_ptr, start, size, length_penalty,
                      negative_length_sign, BEAM: tl.constexpr, HAS_MASK: tl.constexpr, LARGEST: tl.constexpr,
                      HAS_FINISHED: tl.constexpr, PENALISED: tl.constexpr, DEDUP: tl.constexpr,
                      LOG_TILE: tl.constexpr):
    TILE: tl.constexpr = 2**LOG_TILE
    lane = tl.arange(0, TILE)
    count = tl.sum(tl.zeros([TILE], tl.int32))
    for first in range(0, size, TILE):
        if BEAM:
            key = _beam_key(scores_ptr, finished_ptr, lengths_ptr, kept_ptr, start, first + lane, size,
                            length_penalty, negative_length_sign, HAS_FINISHED, PENALISED, DEDUP)
        else:
            key = _topk_key(scores_ptr, mask_ptr, start, first + lane, size, HAS_MASK, LARGEST)
        count += tl.sum((key != _UNSELECTABLE).to(tl.int32))
    return count


@triton.jit
def _store_padding(values_ptr, indices_ptr, row_start, filled, k, pad, LOG_TILE: tl.constexpr):
    """Ranks [filled, k) of an output row, past the selectable entries: value ``pad``, index -1."""
    TILE: tl.constexpr = 2**LOG_TILE
    lane = tl.arange(0, TILE)
    for first in range(0, k, TILE):
        rank = first + lane
        padding = (rank >= filled) & (rank < k)
        tl.store(values_ptr + row_start + rank, tl.full([TILE], pad, values_ptr.dtype.element_ty), mask=padding)
        tl.store(indices_ptr + row_start + rank, tl.full([TILE], -1, tl.int64), mask=padding)


@triton.jit
def _segmented_topk_tiles_kernel(scores_ptr, offsets_ptr, mask_ptr, values_ptr, indices_ptr, group_size, total, k,
                                 RAGGED: tl.constexpr, HAS_MASK: tl.constexpr, LARGEST: tl.constexpr,
                                 LOG_TILE: tl.constexpr):
    TILE: tl.constexpr = 2**LOG_TILE
    group, start, size, index_base = _group_bounds(offsets_ptr, group_size, total, RAGGED)
    lane = tl.arange(0, TILE)
    row_start = group.to(tl.int64) * k
    pad: tl.constexpr = float("-inf") if LARGEST else float("inf")
    chosen_total = tl.minimum(_count_selectable(scores_ptr, scores_ptr, scores_ptr, scores_ptr, mask_ptr, start,
                                                size, 0.0, 0.0, False, HAS_MASK, LARGEST, False, False, False,
                                                LOG_TILE), k)
    last_key = tl.max(tl.full([TILE], _LAST_KEY, tl.int64))
    last_local = tl.max(tl.full([TILE], -1, tl.int32))
    for round_start in range(0, chosen_total, TILE):
        best_key, best_local = _next_best(scores_ptr, scores_ptr, scores_ptr, scores_ptr, mask_ptr, start, size,
                                          last_key, last_local, 0.0, 0.0, False, HAS_MASK, LARGEST, False, False,
                                          False, LOG_TILE)
        rank = round_start + lane
        chosen = rank < chosen_total
        value = tl.load(scores_ptr + start + best_local, mask=chosen, other=pad)
        tl.store(values_ptr + row_start + rank, value, mask=rank < k)
        tl.store(indices_ptr + row_start + rank, tl.where(chosen, best_local + index_base, -1), mask=rank < k)
        last_key = tl.sum(tl.where(lane == TILE - 1, best_key, 0))
        last_local = tl.sum(tl.where(lane == TILE - 1, best_local, 0))
    _store_padding(values_ptr, indices_ptr, row_start, chosen_total, k, pad, LOG_TILE)


@triton.jit
def _beam_dedup_pass(scores_ptr, finished_ptr, lengths_ptr, dedup_keys_ptr, kept_ptr, start, size, length_penalty,
                     negative_length_sign, HAS_FINISHED: tl.constexpr, PENALISED: tl.constexpr,
                     LOG_TILE: tl.constexpr, CHUNK: tl.constexpr):
    """kept[local] = 1 where a candidate is selectable and the best of its key (first on ties), else 0."""
    TILE: tl.constexpr = 2**LOG_TILE
    for first in range(0, size, TILE):
        column = first + tl.arange(0, TILE)
        inside = column < size
        adjusted, selectable = _beam_candidates(scores_ptr, finished_ptr, lengths_ptr, start, column, inside,
                                                length_penalty, negative_length_sign, HAS_FINISHED, PENALISED)
        beaten = _beaten_by_key(scores_ptr, finished_ptr, lengths_ptr, dedup_keys_ptr, start, size, column, inside,
                                adjusted, length_penalty, negative_length_sign, HAS_FINISHED, PENALISED, TILE, CHUNK)
        tl.store(kept_ptr + start + column, (selectable & (beaten == 0)).to(tl.int8), mask=inside)


@triton.jit
def _beam_prune_tiles_kernel(scores_ptr, offsets_ptr, finished_ptr, lengths_ptr, dedup_keys_ptr, kept_ptr,
                             indices_ptr, values_ptr, counts_ptr, parents_ptr,
                             length_penalty, negative_length_sign, group_size, total, k, refill_to,
                             RAGGED: tl.constexpr, HAS_FINISHED: tl.constexpr, PENALISED: tl.constexpr,
                             DEDUP: tl.constexpr, LOG_TILE: tl.constexpr, CHUNK: tl.constexpr):
    TILE: tl.constexpr = 2**LOG_TILE
    group, start, size, index_base = _group_bounds(offsets_ptr, group_size, total, RAGGED)
    lane = tl.arange(0, TILE)
    if DEDUP:
        _beam_dedup_pass(scores_ptr, finished_ptr, lengths_ptr, dedup_keys_ptr, kept_ptr, start, size,
                         length_penalty, negative_length_sign, HAS_FINISHED, PENALISED, LOG_TILE, CHUNK)
        tl.debug_barrier()  # every thread's flags are written before any thread reads them
    count = tl.minimum(_count_selectable(scores_ptr, finished_ptr, lengths_ptr, kept_ptr, scores_ptr, start, size,
                                         length_penalty, negative_length_sign, True, False, True, HAS_FINISHED,
                                         PENALISED, DEDUP, LOG_TILE), k)
    row_start = group.to(tl.int64) * k
    last_key = tl.max(tl.full([TILE], _LAST_KEY, tl.int64))
    last_local = tl.max(tl.full([TILE], -1, tl.int32))
    for round_start in range(0, count, TILE):
        best_key, best_local = _next_best(scores_ptr, finished_ptr, lengths_ptr, kept_ptr, scores_ptr, start, size,
                                          last_key, last_local, length_penalty, negative_length_sign, True, False,
                                          True, HAS_FINISHED, PENALISED, DEDUP, LOG_TILE)
        rank = round_start + lane
        chosen = rank < count
        value, _ = _beam_candidates(scores_ptr, finished_ptr, lengths_ptr, start, best_local, chosen,
                                    length_penalty, negative_length_sign, False, PENALISED)
        tl.store(values_ptr + row_start + rank, tl.where(chosen, value, float("-inf")), mask=rank < k)
        tl.store(indices_ptr + row_start + rank, tl.where(chosen, best_local + index_base, -1), mask=rank < k)
        last_key = tl.sum(tl.where(lane == TILE - 1, best_key, 0))
        last_local = tl.sum(tl.where(lane == TILE - 1, best_local, 0))
    _store_padding(values_ptr, indices_ptr, row_start, count, k, float("-inf"), LOG_TILE)
    tl.store(counts_ptr + group, count.to(tl.int64))
    tl.debug_barrier()  # the indices are stored before they are read back as parents
    # Survivor j fills slots j, j + count, j + 2 count, ...
    parents_start = group.to(tl.int64) * refill_to
    for first in range(0, refill_to, TILE):
        slot = first + lane
        inside = slot < refill_to
        parent = tl.load(indices_ptr + row_start + slot % tl.maximum(count, 1), mask=inside, other=-1)
        tl.store(parents_ptr + parents_start + slot, tl.where(count > 0, parent, -1), mask=inside)


# -- vote -----------------------------------------------------------------------------------------------


@triton.jit
def _vote_tiles_kernel(answer_keys_ptr, scores_ptr, offsets_ptr, mask_ptr, winners_ptr, group_size, total,
                       MODE: tl.constexpr, RAGGED: tl.constexpr, HAS_MASK: tl.constexpr, TILE: tl.constexpr,
                       CHUNK: tl.constexpr):
    group, start, size, index_base = _group_bounds(offsets_ptr, group_size, total, RAGGED)
    lane = tl.arange(0, TILE)
    # The winner so far (a voter's local index), and what it won with.
    winner = tl.max(tl.full([TILE], _NO_LOCAL, tl.int32))
    best_count = tl.max(tl.full([TILE], -1, tl.int32))
    best_score = tl.max(tl.full([TILE], float("-inf"), tl.float32))
    first_voter = winner
    for first in range(0, size, TILE):
        column = first + lane
        key, score, voter = _voters(answer_keys_ptr, scores_ptr, mask_ptr, start, column, column < size, HAS_MASK,
                                    MODE)
        first_voter = tl.minimum(first_voter, tl.min(tl.where(voter, column, _NO_LOCAL)))
        if MODE == 2:
            # max: the best single score, the earliest on ties (earlier tiles hold earlier voters).
            tile_best = tl.max(tl.where(voter, score, float("-inf")))
            tile_winner = tl.min(tl.where(voter & (score == tile_best), column, _NO_LOCAL))
            take = (tile_winner != _NO_LOCAL) & ((winner == _NO_LOCAL) | (tile_best > best_score))
            best_score = tl.where(take, tile_best, best_score)
            winner = tl.where(take, tile_winner, winner)
        else:
            tally, reached = _answer_tallies(answer_keys_ptr, scores_ptr, mask_ptr, start, size, key, column,
                                             HAS_MASK, MODE, TILE, CHUNK)
            if MODE == 0:
                # The answer whose count reaches the top count at the earliest candidate: a tile's top count
                # is a full count, but the voter where it is reached may come in a later tile.
                tile_best = tl.max(tl.where(voter, tally, -1))
                tile_winner = tl.min(tl.where(voter & (reached == tile_best), column, _NO_LOCAL))
                take = (tile_best > best_count) | ((tile_best == best_count) & (winner == _NO_LOCAL))
                winner = tl.where(take, tile_winner, winner)
                best_count = tl.maximum(best_count, tile_best)
            else:
                # weighted: the earliest voter with the top sum; a NaN sum loses to every number (masked out
                # explicitly: tl.max drops NaN on a GPU, keeps it interpreted).
                numeric = voter & (tally == tally)
                tile_best = tl.max(tl.where(numeric, tally, float("-inf")))
                tile_winner = tl.min(tl.where(numeric & (tally == tile_best), column, _NO_LOCAL))
                take = (tile_winner != _NO_LOCAL) & ((winner == _NO_LOCAL) | (tile_best > best_score))
                best_score = tl.where(take, tile_best, best_score)
                winner = tl.where(take, tile_winner, winner)
    if MODE == 1:  # only NaN sums: the first answer wins
        winner = tl.where(winner == _NO_LOCAL, first_voter, winner)
    # Report the winning answer's first voter.
    winner_key = tl.load(answer_keys_ptr + start + winner, mask=winner < size, other=0)
    first_of_winner = tl.max(tl.full([TILE], _NO_LOCAL, tl.int32))
    for first in range(0, size, TILE):
        column = first + lane
        key, _, voter = _voters(answer_keys_ptr, scores_ptr, mask_ptr, start, column, column < size, HAS_MASK, MODE)
        first_of_winner = tl.minimum(first_of_winner, tl.min(tl.where(voter & (key == winner_key), column,
                                                                       _NO_LOCAL)))
    found = (winner < size) & (first_of_winner < size)
    tl.store(winners_ptr + group, tl.where(found, first_of_winner.to(tl.int64) + index_base, -1))


# -- resample, effective_sample_size --------------------------------------------------------------------


@triton.jit
def _weight_stats(log_weights_ptr, start, size, TILE: tl.constexpr):
    """The group's largest log-weight (fp32) and how many entries are NaN or +inf."""
    lane = tl.arange(0, TILE)
    top = tl.max(tl.full([TILE], float("-inf"), tl.float32))
    not_weights = tl.sum(tl.zeros([TILE], tl.int32))
    for first in range(0, size, TILE):
        inside = first + lane < size
        log_weight = tl.load(log_weights_ptr + start + first + lane, mask=inside, other=float("-inf")).to(tl.float32)
        not_weights += tl.sum(((log_weight != log_weight) | (log_weight == float("inf"))).to(tl.int32))
        top = tl.maximum(top, tl.max(tl.where(log_weight == log_weight, log_weight, float("-inf"))))
    return top, not_weights


@triton.jit
def _shifted(log_weights_ptr, start, column, inside, shift):
    """exp(lw - shift) in fp64, rounded to fp32 (0 outside the group), as the one-block kernel computes it."""
    log_weight = tl.load(log_weights_ptr + start + column, mask=inside, other=float("-inf")).to(tl.float32)
    return tl.exp((log_weight - shift).to(tl.float64)).to(tl.float32)


@triton.jit
def _count_at_most_global(ptr, size, target, levels, above):
    """Per target, how many of the ``size`` non-decreasing values at ``ptr`` are <= it (at most
    2 ** levels - 1): a binary search in global memory; positions past ``size`` read as ``above``."""
    position = tl.zeros(target.shape, tl.int32)
    for level in range(levels):
        step = 1 << (levels - 1 - level)
        probe_at = position + (step - 1)
        probe = tl.load(ptr + probe_at, mask=probe_at < size, other=above)
        position = tl.where(probe <= target, position + step, position)
    return position


@triton.jit(do_not_specialize=["seed", "num_samples", "levels"])
def _resample_tiles_kernel(log_weights_ptr, offsets_ptr, ancestors_ptr, cdf_ptr, residual_cdf_ptr, copies_end_ptr,
                           seed: tl.int64, group_size, total, num_samples, levels, METHOD: tl.constexpr,
                           RAGGED: tl.constexpr, TILE: tl.constexpr, SAMPLE_BLOCK: tl.constexpr):
    group, start, size, _ = _group_bounds(offsets_ptr, group_size, total, RAGGED)
    lane = tl.arange(0, TILE)
    top, _ = _weight_stats(log_weights_ptr, start, size, TILE)
    shift = tl.where((top > float("-inf")) & (top < float("inf")), top, 0.0)
    weight_sum = tl.sum(tl.zeros([TILE], tl.float32))
    for first in range(0, size, TILE):
        weight_sum += tl.sum(_shifted(log_weights_ptr, start, first + lane, first + lane < size, shift))
    # The CDF: an fp64 running sum rounded per entry (as torch's CPU cumsum does); the last positive weight.
    carry = tl.sum(tl.zeros([TILE], tl.float64))
    last = tl.max(tl.full([TILE], -1, tl.int32))
    residual_sum = tl.sum(tl.zeros([TILE], tl.float32))
    copied = tl.sum(tl.zeros([TILE], tl.int32))
    for first in range(0, size, TILE):
        column = first + lane
        inside = column < size
        weights = tl.math.div_rn(_shifted(log_weights_ptr, start, column, inside, shift), weight_sum)
        running = tl.cumsum(weights.to(tl.float64), 0) + carry
        tl.store(cdf_ptr + start + column, running.to(tl.float32), mask=inside)
        carry = tl.sum(tl.where(lane == TILE - 1, running, 0.0))
        last = tl.maximum(last, tl.max(tl.where(inside & (weights > 0), column, -1)))
        if METHOD == 3:
            expected = weights * num_samples
            copies = tl.floor(expected)
            residual_sum += tl.sum(expected - copies)
            copies_end = tl.cumsum(copies.to(tl.int32), 0) + copied
            tl.store(copies_end_ptr + start + column, copies_end, mask=inside)
            copied = tl.max(tl.where(lane == TILE - 1, copies_end, 0))
    if METHOD == 3:
        residual_carry = tl.sum(tl.zeros([TILE], tl.float64))
        residual_last = tl.max(tl.full([TILE], -1, tl.int32))
        for first in range(0, size, TILE):
            column = first + lane
            inside = column < size
            weights = tl.math.div_rn(_shifted(log_weights_ptr, start, column, inside, shift), weight_sum)
            expected = weights * num_samples
            residual = tl.math.div_rn(expected - tl.floor(expected), tl.maximum(residual_sum, 1e-30))
            running = tl.cumsum(residual.to(tl.float64), 0) + residual_carry
            tl.store(residual_cdf_ptr + start + column, running.to(tl.float32), mask=inside)
            residual_carry = tl.sum(tl.where(lane == TILE - 1, running, 0.0))
            residual_last = tl.maximum(residual_last, tl.max(tl.where(inside & (residual > 0), column, -1)))
    tl.debug_barrier()  # the scratch arrays are written before the searches read them
    first_position = group.to(tl.int64) * num_samples
    if METHOD == 1:
        first_uniform = _stream_uniform(seed, first_position)
    slot = tl.arange(0, SAMPLE_BLOCK)
    for first in range(0, num_samples, SAMPLE_BLOCK):
        sample = first + slot
        if METHOD == 3:
            # The first `copied` slots hold floor(N w_j) copies of each j in index order; the rest are
            # multinomial draws from the residual weights with the group's uniforms 0, 1, ...
            draw = tl.maximum(sample - copied, 0)
            uniform = _stream_uniform(seed, first_position + draw)
            drawn = tl.minimum(_count_at_most_global(residual_cdf_ptr + start, size, uniform, levels, 2.0),
                               residual_last)
            copy_of = _count_at_most_global(copies_end_ptr + start, size, sample, levels, 2**31 - 1)
            ancestor = tl.where(sample < copied, copy_of, drawn)
        else:
            if METHOD == 0:
                position = _stream_uniform(seed, first_position + sample)
            elif METHOD == 1:
                position = tl.math.div_rn(first_uniform + sample.to(tl.float32), num_samples.to(tl.float32))
            else:
                uniform = _stream_uniform(seed, first_position + sample)
                position = tl.math.div_rn(uniform + sample.to(tl.float32), num_samples.to(tl.float32))
            # The first CDF value above the position; past the last live candidate the CDF counts as 1.
            ancestor = tl.minimum(_count_at_most_global(cdf_ptr + start, size, position, levels, 2.0), last)
        tl.store(ancestors_ptr + first_position + sample, start + ancestor, mask=sample < num_samples)


@triton.jit
def _effective_sample_size_tiles_kernel(log_weights_ptr, offsets_ptr, ess_ptr, group_size, total,
                                        RAGGED: tl.constexpr, TILE: tl.constexpr):
    group, start, size, _ = _group_bounds(offsets_ptr, group_size, total, RAGGED)
    lane = tl.arange(0, TILE)
    top, not_weights = _weight_stats(log_weights_ptr, start, size, TILE)
    finite = (top > float("-inf")) & (top < float("inf"))
    shift = tl.where(finite, top, 0.0)
    weight_sum = tl.sum(tl.zeros([TILE], tl.float32))
    squares = tl.sum(tl.zeros([TILE], tl.float32))
    for first in range(0, size, TILE):
        weights = _shifted(log_weights_ptr, start, first + lane, first + lane < size, shift)
        weight_sum += tl.sum(weights)
        squares += tl.sum(weights * weights)
    # With a finite max the largest weight is 1, so the denominator is at least 1.
    ess = tl.where(finite, tl.math.div_rn(weight_sum * weight_sum, tl.where(finite, squares, 1.0)), 0.0)
    tl.store(ess_ptr + group, tl.where(not_weights > 0, float("nan"), ess))


# -- launchers (called by select.py's, which read the group sizes) --------------------------------------


def _num_warps(on_gpu):
    return 8 if on_gpu else 1


def _log_tile(on_gpu):
    return GPU_LOG_TILE if on_gpu else INTERPRETER_LOG_TILE


def segmented_topk(scores, offsets, mask, k, largest, groups, group_size, values, indices):
    _segmented_topk_tiles_kernel[(groups,)](scores, scores if offsets is None else offsets.contiguous(),
                                            scores if mask is None else mask.contiguous(), values, indices,
                                            group_size, scores.numel(), k, RAGGED=offsets is not None,
                                            HAS_MASK=mask is not None, LARGEST=largest,
                                            LOG_TILE=_log_tile(scores.is_cuda),
                                            num_warps=_num_warps(scores.is_cuda))


def _pair_chunk(tile, num_warps, on_gpu):
    pairs = GPU_PAIR_TILE_PER_WARP * num_warps if on_gpu else INTERPRETER_PAIR_TILE
    return max(1, pairs // tile)


def beam_prune(scores, offsets, finished, lengths, length_penalty, negative_length_sign, dedup_keys, k, refill_to,
               penalised, groups, group_size, outputs):
    indices, values, counts, parents = outputs
    num_warps = _num_warps(scores.is_cuda)
    # One flag per candidate: which ones survive the dedup (written and read by their group's program).
    kept = torch.empty(scores.numel() if dedup_keys is not None else 1, dtype=torch.int8, device=scores.device)
    _beam_prune_tiles_kernel[(groups,)](scores, scores if offsets is None else offsets.contiguous(),
                                        scores if finished is None else finished.contiguous(),
                                        scores if lengths is None else lengths.contiguous(),
                                        scores if dedup_keys is None else dedup_keys.contiguous(), kept,
                                        indices, values, counts, parents, float(length_penalty),
                                        negative_length_sign, group_size, scores.numel(), k, refill_to,
                                        RAGGED=offsets is not None, HAS_FINISHED=finished is not None,
                                        PENALISED=penalised, DEDUP=dedup_keys is not None,
                                        LOG_TILE=_log_tile(scores.is_cuda),
                                        CHUNK=_pair_chunk(2 ** _log_tile(scores.is_cuda), num_warps, scores.is_cuda),
                                        num_warps=num_warps, enable_fp_fusion=False)


def vote(answer_keys, scores, offsets, mask, mode, groups, group_size, winners):
    on_gpu = answer_keys.is_cuda
    tile = GPU_VOTE_TILE if on_gpu else INTERPRETER_VOTE_TILE
    num_warps = _num_warps(on_gpu)
    _vote_tiles_kernel[(groups,)](answer_keys, answer_keys if scores is None else scores.contiguous(),
                                  answer_keys if offsets is None else offsets.contiguous(),
                                  answer_keys if mask is None else mask.contiguous(), winners, group_size,
                                  answer_keys.numel(), MODE=mode, RAGGED=offsets is not None,
                                  HAS_MASK=mask is not None, TILE=tile, CHUNK=_pair_chunk(tile, num_warps, on_gpu),
                                  num_warps=num_warps)


def resample(log_weights, offsets, num_samples, method, seed, groups, largest_group, group_size, sample_block,
             ancestors):
    on_gpu = log_weights.is_cuda
    total = log_weights.numel()
    cdf = torch.empty(total, dtype=torch.float32, device=log_weights.device)
    residual = method == 3
    residual_cdf = torch.empty(total if residual else 1, dtype=torch.float32, device=log_weights.device)
    copies_end = torch.empty(total if residual else 1, dtype=torch.int32, device=log_weights.device)
    _resample_tiles_kernel[(groups,)](log_weights, log_weights if offsets is None else offsets.contiguous(),
                                      ancestors, cdf, residual_cdf, copies_end, seed, group_size, total, num_samples,
                                      largest_group.bit_length(), METHOD=method, RAGGED=offsets is not None,
                                      TILE=WEIGHT_TILE,
                                      SAMPLE_BLOCK=sample_block, num_warps=_num_warps(on_gpu),
                                      enable_fp_fusion=False)


def effective_sample_size(log_weights, offsets, groups, group_size, ess):
    on_gpu = log_weights.is_cuda
    _effective_sample_size_tiles_kernel[(groups,)](log_weights,
                                                   log_weights if offsets is None else offsets.contiguous(), ess,
                                                   group_size, log_weights.numel(), RAGGED=offsets is not None,
                                                   TILE=WEIGHT_TILE,
                                                   num_warps=_num_warps(on_gpu), enable_fp_fusion=False)
