"""Selection over groups of candidates in Triton: top-k, beam pruning, resampling, ESS, voting, sequence
keys (semantics: csrc/README.md, "Selection ops").

One program per group. A group lives in a register block of ``BLOCK`` entries, the next power of two at
or above the largest group (the ragged launchers read the sizes once for it), so every group of a batch
goes in one launch. A batch whose largest group is over ``LARGE_GROUP`` takes the tiled kernels of
``select_large.py`` instead (sequence_keys always loops), compiled once for every size past it.
Orderings (top-k, beams) come from a bitonic sort of (key, index) pairs: the key is
an int64 whose signed order is the score's order, the index breaks ties toward the lower one, so any
float dtype (float64 too) sorts exactly in its own precision. Same-key questions (beam dedup, votes)
compare the whole block against chunks of the group, ``BLOCK x CHUNK`` at a time.

Float results round as the reference's do: divisions are IEEE (``div_rn``; a GPU's ``/`` is approximate),
exp and pow are computed in fp64 and rounded, and the kernels with float arithmetic launch with
``enable_fp_fusion=False`` (a fused multiply-add skips a rounding, and could leave a residual weight of
residual resampling below zero).
"""

import math

import torch
import triton
import triton.language as tl

from ._device import launches_on_tensor_device
from .philox import _unit_open

# Register tile of the pairwise (block x chunk) comparisons: 16 entries a thread on a GPU (twice that
# spills at 1 warp); the interpreter pays per op and per loop trip, not per element, so big tiles there.
GPU_PAIR_TILE_PER_WARP = 512
INTERPRETER_PAIR_TILE = 1 << 16
# Samples (resample) or tokens (sequence_keys) a program handles per loop trip.
GPU_STRIP_MAX = 1024
INTERPRETER_STRIP_MAX = 1 << 16
# A batch whose largest group is larger takes the tiled kernels of select_large.py: one compile for every size
# past it (a register block of the whole group would be compiled per power of two, slowly, and not at all past
# 2^20). 2048 is the largest block compiled here (as CUDA's kCapacity).
LARGE_GROUP = 2048
# Below the sort key of every selectable entry, -inf included.
_UNSELECTABLE = tl.constexpr(-(2**63))


# -- groups ---------------------------------------------------------------------------------------------


@triton.jit
def _group_bounds(offsets_ptr, group_size, total, RAGGED: tl.constexpr):
    """This program's group: (group, first flat element, size, what a local index adds when reported).

    Reported indices are flat for ragged input and row-local for dense input. Ragged bounds are clamped
    into [0, total], as the CUDA kernels clamp them: offsets that were not value-checked (on a GPU)
    never make a program read outside the data.
    """
    group = tl.program_id(0)
    if RAGGED:
        start = tl.minimum(tl.maximum(tl.load(offsets_ptr + group), 0), total)
        end = tl.minimum(tl.maximum(tl.load(offsets_ptr + group + 1), start), total)
        size = (end - start).to(tl.int32)
        index_base = start
    else:
        start = group.to(tl.int64) * group_size
        size = group_size
        index_base = 0
    return group, start, size, index_base


@triton.jit
def _store_row(ptr, row_start, rank, k, value, pad, BLOCK: tl.constexpr):
    """Ranks 0 .. k - 1 of an output row: ``value`` at the block's ranks, ``pad`` past the block (k > BLOCK)."""
    tl.store(ptr + row_start + rank, value, mask=rank < k)
    for first in range(BLOCK, k, BLOCK):
        tl.store(ptr + row_start + first + rank, tl.full([BLOCK], pad, value.dtype), mask=first + rank < k)


# -- ordering -------------------------------------------------------------------------------------------


@triton.jit
def _order_key(value):
    """int64 with the signed order of ``value`` (fp32 or fp64, not NaN); -0.0 and 0.0 get the same key."""
    value = tl.where(value == 0, 0.0, value)
    if value.dtype == tl.float64:
        bits = value.to(tl.int64, bitcast=True)
    else:
        bits = value.to(tl.int32, bitcast=True).to(tl.int64)
    # Negative floats order backwards as integers: flip all but the sign bit.
    return tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


@triton.jit
def _position_bit(LOG_BLOCK: tl.constexpr, BIT: tl.constexpr):
    """Bit ``BIT`` of the position, laid out along its axis of the [2] * LOG_BLOCK hypercube."""
    return tl.reshape(tl.arange(0, 2), [1] * (LOG_BLOCK - BIT - 1) + [2] + [1] * BIT)


@triton.jit
def _compare_exchange(key, index, descending_run, BIT: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """One bitonic step between the positions that differ in bit ``BIT``."""
    axis: tl.constexpr = LOG_BLOCK - 1 - BIT
    # A pair sums to the same value on both sides, so the sum less oneself is the partner (integer
    # arithmetic wraps, so this is exact); a plain sum is also fast under the interpreter.
    other_key = tl.sum(key, axis, keep_dims=True) - key
    other_index = tl.sum(index, axis, keep_dims=True) - index
    better = (key > other_key) | ((key == other_key) & (index < other_index))
    # The lower position of a pair keeps the better entry, unless its run is reversed.
    keep = better != ((_position_bit(LOG_BLOCK, BIT) ^ descending_run) != 0)
    return tl.where(keep, key, other_key), tl.where(keep, index, other_index)


@triton.jit
def _sort_pairs(key, index, LOG_BLOCK: tl.constexpr):
    """The [2 ** LOG_BLOCK] (key, index) pairs sorted larger key first, lower index first on ties."""
    BLOCK: tl.constexpr = 2**LOG_BLOCK
    key = tl.reshape(key, [2] * LOG_BLOCK)
    index = tl.reshape(index, [2] * LOG_BLOCK)
    for stage in tl.static_range(1, LOG_BLOCK + 1):
        # Sorted runs of 2 ** stage entries alternate in direction until the last stage merges them all.
        if stage < LOG_BLOCK:
            descending_run = _position_bit(LOG_BLOCK, stage)
        else:
            descending_run = 0
        for step in tl.static_range(stage):
            key, index = _compare_exchange(key, index, descending_run, stage - 1 - step, LOG_BLOCK)
    return tl.reshape(key, [BLOCK]), tl.reshape(index, [BLOCK])


@triton.jit
def _sort_best_first(key, LOG_BLOCK: tl.constexpr):
    """Positions of the [2 ** LOG_BLOCK] ``key`` block, larger key first, lower position first on ties."""
    _, index = _sort_pairs(key, tl.arange(0, 2**LOG_BLOCK), LOG_BLOCK)
    return index


# -- segmented_topk -------------------------------------------------------------------------------------


@triton.jit
def _segmented_topk_kernel(scores_ptr, offsets_ptr, mask_ptr, values_ptr, indices_ptr, group_size, total, k,
                           RAGGED: tl.constexpr, HAS_MASK: tl.constexpr, LARGEST: tl.constexpr,
                           BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr):
    group, start, size, index_base = _group_bounds(offsets_ptr, group_size, total, RAGGED)
    column = tl.arange(0, BLOCK)
    inside = column < size
    score = tl.load(scores_ptr + start + column, mask=inside, other=0.0)
    # Compared in fp32, float64 in fp64; fp16 / bf16 widen exactly.
    if score.dtype != tl.float64:
        score = score.to(tl.float32)
    selectable = inside & (score == score)
    if HAS_MASK:
        selectable &= tl.load(mask_ptr + start + column, mask=inside, other=0) != 0
    if not LARGEST:
        score = -score
    order = _sort_best_first(tl.where(selectable, _order_key(score), _UNSELECTABLE), LOG_BLOCK)

    chosen = column < tl.sum(selectable.to(tl.int32))
    pad: tl.constexpr = float("-inf") if LARGEST else float("inf")
    value = tl.load(scores_ptr + start + order, mask=chosen, other=pad)
    row_start = group.to(tl.int64) * k
    _store_row(values_ptr, row_start, column, k, value, pad, BLOCK)
    _store_row(indices_ptr, row_start, column, k, tl.where(chosen, order + index_base, -1), -1, BLOCK)


# -- beam_prune -----------------------------------------------------------------------------------------


@triton.jit
def _beam_candidates(scores_ptr, finished_ptr, lengths_ptr, start, column, inside, length_penalty,
                     negative_length_sign, HAS_FINISHED: tl.constexpr, PENALISED: tl.constexpr):
    """Length-adjusted fp32 scores of the candidates at ``column``, and which of them may be kept."""
    adjusted = tl.load(scores_ptr + start + column, mask=inside, other=0.0).to(tl.float32)
    if PENALISED:
        length = tl.load(lengths_ptr + start + column, mask=inside, other=1).to(tl.float32)
        # length ** penalty in fp64 and rounded: powf to within rounding (the interpreter has no libdevice
        # pow). A negative length has a power only for an integral penalty, whose sign the launcher gives.
        power = tl.exp2(length_penalty * tl.log2(tl.abs(length).to(tl.float64))).to(tl.float32)
        adjusted = tl.math.div_rn(adjusted, tl.where(length < 0, power * negative_length_sign, power))
    selectable = inside & (adjusted == adjusted)
    if HAS_FINISHED:
        selectable &= tl.load(finished_ptr + start + column, mask=inside, other=1) == 0
    return adjusted, selectable


@triton.jit
def _beaten_by_key(scores_ptr, finished_ptr, lengths_ptr, dedup_keys_ptr, start, size, column, inside, adjusted,
                   length_penalty, negative_length_sign, HAS_FINISHED: tl.constexpr, PENALISED: tl.constexpr,
                   WIDTH: tl.constexpr, CHUNK: tl.constexpr):
    """[WIDTH] int32: for each candidate at ``column`` (adjusted score ``adjusted``), how many selectable
    candidates of the group share its dedup key and beat it (score higher, or as high and earlier). A candidate
    is a duplicate to drop where this is not 0."""
    key = tl.load(dedup_keys_ptr + start + column, mask=inside, other=0)
    beaten = tl.zeros([WIDTH], tl.int32)
    for first in range(0, size, CHUNK):
        other = first + tl.arange(0, CHUNK)
        other_inside = other < size
        other_adjusted, other_selectable = _beam_candidates(
            scores_ptr, finished_ptr, lengths_ptr, start, other, other_inside, length_penalty,
            negative_length_sign, HAS_FINISHED, PENALISED)
        other_key = tl.load(dedup_keys_ptr + start + other, mask=other_inside, other=0)
        beats = (other_adjusted[None, :] > adjusted[:, None]) | (
            (other_adjusted[None, :] == adjusted[:, None]) & (other[None, :] < column[:, None]))
        beats &= other_selectable[None, :] & (other_key[None, :] == key[:, None])
        beaten += tl.sum(beats.to(tl.int32), 1)
    return beaten


@triton.jit
def _beam_prune_kernel(scores_ptr, offsets_ptr, finished_ptr, lengths_ptr, dedup_keys_ptr,
                       indices_ptr, values_ptr, counts_ptr, parents_ptr,
                       length_penalty, negative_length_sign, group_size, total, k, refill_to,
                       RAGGED: tl.constexpr, HAS_FINISHED: tl.constexpr, PENALISED: tl.constexpr,
                       DEDUP: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    group, start, size, index_base = _group_bounds(offsets_ptr, group_size, total, RAGGED)
    column = tl.arange(0, BLOCK)
    inside = column < size
    adjusted, selectable = _beam_candidates(scores_ptr, finished_ptr, lengths_ptr, start, column, inside,
                                            length_penalty, negative_length_sign, HAS_FINISHED, PENALISED)
    if DEDUP:
        selectable &= _beaten_by_key(scores_ptr, finished_ptr, lengths_ptr, dedup_keys_ptr, start, size, column,
                                     inside, adjusted, length_penalty, negative_length_sign, HAS_FINISHED, PENALISED,
                                     BLOCK, CHUNK) == 0
    order = _sort_best_first(tl.where(selectable, _order_key(adjusted), _UNSELECTABLE), LOG_BLOCK)

    count = tl.minimum(tl.sum(selectable.to(tl.int32)), k)
    chosen = column < count
    value, _ = _beam_candidates(scores_ptr, finished_ptr, lengths_ptr, start, order, chosen, length_penalty,
                                negative_length_sign, False, PENALISED)
    index = tl.where(chosen, order + index_base, -1)
    row_start = group.to(tl.int64) * k
    _store_row(values_ptr, row_start, column, k, tl.where(chosen, value, float("-inf")), float("-inf"), BLOCK)
    _store_row(indices_ptr, row_start, column, k, index, -1, BLOCK)
    tl.store(counts_ptr + group, count.to(tl.int64))
    # Survivor j fills slots j, j + count, j + 2 count, ...
    parents_start = group.to(tl.int64) * refill_to
    for first in range(0, refill_to, BLOCK):
        slot = first + column
        parent = tl.gather(index, slot % tl.maximum(count, 1), 0)
        tl.store(parents_ptr + parents_start + slot, tl.where(count > 0, parent, -1), mask=slot < refill_to)


# -- resample and effective_sample_size -----------------------------------------------------------------


@triton.jit
def _shifted_weights(log_weights_ptr, start, column, inside):
    """exp(lw - max) over the block (0 outside the group), and whether the max is finite (else it shifts
    by 0)."""
    log_weight = tl.load(log_weights_ptr + start + column, mask=inside, other=float("-inf")).to(tl.float32)
    top = tl.max(log_weight)
    finite = (top > float("-inf")) & (top < float("inf"))
    # exp in fp64, rounded: expf to within rounding on every device (the GPU's fp32 exp is approximate).
    shifted = log_weight - tl.where(finite, top, 0.0)
    return tl.exp(shifted.to(tl.float64)).to(tl.float32), finite


@triton.jit
def _cdf(weights, column):
    """Inclusive prefix sum of normalised ``weights``, exactly 1 from the last positive weight on, and
    that last position (-1 if none)."""
    # Summed in fp64 and rounded per entry, as torch's CPU cumsum does.
    cdf = tl.cumsum(weights.to(tl.float64), 0).to(tl.float32)
    last = tl.max(tl.where(weights > 0, column, -1))
    return tl.where(column >= last, 1.0, cdf), last


@triton.jit
def _count_at_most(ascending, target, LOG_BLOCK: tl.constexpr):
    """Per target, how many entries of the non-decreasing [2 ** LOG_BLOCK] block are <= it (at most
    2 ** LOG_BLOCK - 1): a branch-free binary search."""
    position = tl.zeros(target.shape, tl.int32)
    for level in tl.static_range(LOG_BLOCK):
        step = 2 ** (LOG_BLOCK - 1 - level)
        probe = tl.gather(ascending, position + (step - 1), 0)
        position = tl.where(probe <= target, position + step, position)
    return position


@triton.jit
def _stream_uniform(seed, position):
    """Uniform ``position`` of the Philox stream: u(word position % 4 of block position // 4)."""
    r0, r1, r2, r3 = tl.randint4x(seed, position // 4)
    word = position % 4
    return _unit_open(tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3))))


@triton.jit(do_not_specialize=["seed", "num_samples"])
def _resample_kernel(log_weights_ptr, offsets_ptr, ancestors_ptr, seed: tl.int64, group_size, total, num_samples,
                     METHOD: tl.constexpr, RAGGED: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr,
                     SAMPLE_BLOCK: tl.constexpr):
    group, start, size, _ = _group_bounds(offsets_ptr, group_size, total, RAGGED)
    column = tl.arange(0, BLOCK)
    weights, _ = _shifted_weights(log_weights_ptr, start, column, column < size)
    weights = tl.math.div_rn(weights, tl.sum(weights))
    cdf, last = _cdf(weights, column)
    first_position = group.to(tl.int64) * num_samples
    if METHOD == 1:
        first_uniform = _stream_uniform(seed, first_position)
    if METHOD == 3:
        expected = weights * num_samples
        copies = tl.floor(expected)
        residual = expected - copies
        residual_cdf, residual_last = _cdf(tl.math.div_rn(residual, tl.maximum(tl.sum(residual), 1e-30)), column)
        copies_end = tl.cumsum(copies.to(tl.int32), 0)
        copied = tl.sum(copies.to(tl.int32))
    slot = tl.arange(0, SAMPLE_BLOCK)
    for first in range(0, num_samples, SAMPLE_BLOCK):
        sample = first + slot
        if METHOD == 3:
            # The first `copied` slots hold floor(N w_j) copies of each j in index order; the rest are
            # multinomial draws from the residual weights with the group's uniforms 0, 1, ...
            draw = tl.maximum(sample - copied, 0)
            uniform = _stream_uniform(seed, first_position + draw)
            drawn = tl.minimum(_count_at_most(residual_cdf, uniform, LOG_BLOCK), residual_last)
            ancestor = tl.where(sample < copied, _count_at_most(copies_end, sample, LOG_BLOCK), drawn)
        else:
            if METHOD == 0:
                position = _stream_uniform(seed, first_position + sample)
            elif METHOD == 1:
                position = tl.math.div_rn(first_uniform + sample.to(tl.float32), num_samples.to(tl.float32))
            else:
                uniform = _stream_uniform(seed, first_position + sample)
                position = tl.math.div_rn(uniform + sample.to(tl.float32), num_samples.to(tl.float32))
            # The first CDF value above the position; a position rounded up to 1 takes the last live one.
            ancestor = tl.minimum(_count_at_most(cdf, position, LOG_BLOCK), last)
        tl.store(ancestors_ptr + first_position + sample, start + ancestor, mask=sample < num_samples)


@triton.jit
def _effective_sample_size_kernel(log_weights_ptr, offsets_ptr, ess_ptr, group_size, total, RAGGED: tl.constexpr,
                                  BLOCK: tl.constexpr):
    group, start, size, _ = _group_bounds(offsets_ptr, group_size, total, RAGGED)
    column = tl.arange(0, BLOCK)
    inside = column < size
    weights, finite = _shifted_weights(log_weights_ptr, start, column, inside)
    total = tl.sum(weights)
    # With a finite max the largest weight is 1, so the denominator is at least 1.
    squares = tl.where(finite, tl.sum(weights * weights), 1.0)
    ess = tl.where(finite, tl.math.div_rn(total * total, squares), 0.0)
    # A NaN or +inf log-weight is not a weight: the group's ESS is NaN. Counted explicitly, since tl.max
    # drops NaN on a GPU (and keeps it under the interpreter).
    log_weight = tl.load(log_weights_ptr + start + column, mask=inside, other=0.0).to(tl.float32)
    not_weights = tl.sum(((log_weight != log_weight) | (log_weight == float("inf"))).to(tl.int32))
    tl.store(ess_ptr + group, tl.where(not_weights > 0, float("nan"), ess))


# -- vote -----------------------------------------------------------------------------------------------


@triton.jit
def _voters(answer_keys_ptr, scores_ptr, mask_ptr, start, column, inside, HAS_MASK: tl.constexpr,
            MODE: tl.constexpr):
    """Answer keys, fp32 scores (0 in majority mode) and which candidates vote, at ``column``."""
    key = tl.load(answer_keys_ptr + start + column, mask=inside, other=0)
    voter = inside
    if HAS_MASK:
        voter &= tl.load(mask_ptr + start + column, mask=inside, other=0) != 0
    if MODE == 0:
        score = tl.zeros(column.shape, tl.float32)
    else:
        score = tl.load(scores_ptr + start + column, mask=inside, other=0.0).to(tl.float32)
        voter &= score == score
    return key, score, voter


@triton.jit
def _answer_tallies(answer_keys_ptr, scores_ptr, mask_ptr, start, size, key, column, HAS_MASK: tl.constexpr,
                    MODE: tl.constexpr, WIDTH: tl.constexpr, CHUNK: tl.constexpr):
    """For each of the [WIDTH] candidates ``key`` at ``column``, over the group's voters of its answer: the
    count and how many come at or before it (MODE 0, majority), or the score sum (MODE 1, weighted; members of
    one answer get bitwise equal sums). ``(tally, reached)``; ``reached`` is 0 in weighted mode."""
    if MODE == 0:
        tally = tl.zeros([WIDTH], tl.int32)
    else:
        tally = tl.zeros([WIDTH], tl.float32)
    reached = tl.zeros([WIDTH], tl.int32)
    for first in range(0, size, CHUNK):
        other = first + tl.arange(0, CHUNK)
        other_key, other_score, other_voter = _voters(answer_keys_ptr, scores_ptr, mask_ptr, start, other,
                                                      other < size, HAS_MASK, MODE)
        same = (other_key[None, :] == key[:, None]) & other_voter[None, :]
        if MODE == 0:
            tally += tl.sum(same.to(tl.int32), 1)
            reached += tl.sum((same & (other[None, :] <= column[:, None])).to(tl.int32), 1)
        else:
            tally += tl.sum(tl.where(same, other_score[None, :], 0.0), 1)
    return tally, reached


@triton.jit
def _vote_kernel(answer_keys_ptr, scores_ptr, offsets_ptr, mask_ptr, winners_ptr, group_size, total,
                 MODE: tl.constexpr, RAGGED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNK: tl.constexpr):
    group, start, size, index_base = _group_bounds(offsets_ptr, group_size, total, RAGGED)
    column = tl.arange(0, BLOCK)
    key, score, voter = _voters(answer_keys_ptr, scores_ptr, mask_ptr, start, column, column < size, HAS_MASK,
                                MODE)
    if MODE == 2:
        best = tl.max(tl.where(voter, score, float("-inf")))
        winner = tl.min(tl.where(voter & (score == best), column, BLOCK))
    else:
        tally, reached = _answer_tallies(answer_keys_ptr, scores_ptr, mask_ptr, start, size, key, column, HAS_MASK,
                                         MODE, BLOCK, CHUNK)
        if MODE == 0:
            # The answer whose count reaches the top count at the earliest candidate.
            best = tl.max(tl.where(voter, tally, -1))
            winner = tl.min(tl.where(voter & (reached == best), column, BLOCK))
        else:
            # The earliest voter with the top sum is the first voter of the tied answer seen first. A NaN
            # sum (+inf and -inf in one answer) loses to every number; with only NaN sums the first
            # answer wins. NaN is masked out explicitly: tl.max drops it on a GPU, keeps it interpreted.
            numeric = voter & (tally == tally)
            best = tl.max(tl.where(numeric, tally, float("-inf")))
            any_numeric = tl.sum(numeric.to(tl.int32)) > 0
            winner = tl.min(tl.where(tl.where(any_numeric, numeric & (tally == best), voter), column, BLOCK))
    # Report the winning answer's first voter.
    winner_key = tl.load(answer_keys_ptr + start + winner, mask=winner < size, other=0)
    first_voter = tl.min(tl.where(voter & (key == winner_key), column, BLOCK))
    tl.store(winners_ptr + group, tl.where(first_voter < size, first_voter + index_base, -1))


# -- sequence_keys --------------------------------------------------------------------------------------


@triton.jit
def _mix64(z):
    """The splitmix64 finaliser on uint64 (multiplications wrap, shifts are logical)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _sequence_keys_kernel(token_ids_ptr, offsets_ptr, keys_ptr, total, BLOCK: tl.constexpr):
    sequence, start, length, _ = _group_bounds(offsets_ptr, 0, total, True)
    step = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], tl.uint64)
    for first in range(0, length, BLOCK):
        position = first + step
        inside = position < length
        token = tl.load(token_ids_ptr + start + position, mask=inside, other=0).to(tl.int64)
        term = _mix64(token.to(tl.uint64, bitcast=True) * 0x9E3779B97F4A7C15
                      + position.to(tl.uint64) * 0xC2B2AE3D27D4EB4F + 1)
        total += tl.where(inside, term, 0)
    # Kept as a one-entry block: the interpreter warns on wrapping scalar arithmetic, not on arrays.
    key = _mix64(tl.sum(total, 0, keep_dims=True) ^ length.to(tl.uint64))
    tl.store(keys_ptr + sequence + tl.arange(0, 1), key.to(tl.int64, bitcast=True))


# -- launchers ------------------------------------------------------------------------------------------


def _groups(values, offsets):
    """(groups, largest group size, dense group size) of dense [G, C] or ragged [T] + offsets input."""
    if offsets is None:
        return values.shape[0], values.shape[1], values.shape[1]
    sizes = offsets[1:] - offsets[:-1]
    # One read to the host (a device sync on a GPU) sizes the register block of every group and checks
    # the offsets on every device: first and last offset, smallest and largest size.
    spread = torch.stack([sizes.min(), sizes.max()]) if sizes.numel() else sizes.new_zeros(2)
    first, last, smallest, largest = torch.cat([offsets[[0, -1]], spread]).tolist()
    if first != 0 or last != values.numel():
        raise ValueError(f"offsets must start at 0 and end at T={values.numel()}, got {first} ... {last}")
    if smallest < 0:
        raise ValueError("offsets must be non-decreasing")
    return sizes.numel(), largest, 0


def _large():
    """The tiled kernels of batches with a group over LARGE_GROUP (imported here: they import this module)."""
    from . import select_large

    return select_large


def _block(largest_group):
    """The power-of-two block a group lives in; at least 2, so the sort has a dimension to work on."""
    return max(2, triton.next_power_of_2(largest_group))


def _num_warps(block, on_gpu):
    return max(1, min(8, block // 128)) if on_gpu else 1


def _pair_chunk(block, num_warps, on_gpu):
    tile = GPU_PAIR_TILE_PER_WARP * num_warps if on_gpu else INTERPRETER_PAIR_TILE
    return max(1, min(block, tile // block))


def _strip(count, on_gpu):
    return min(GPU_STRIP_MAX if on_gpu else INTERPRETER_STRIP_MAX, triton.next_power_of_2(max(count, 16)))


def _optional(tensor, stand_in):
    """A tensor argument, or ``stand_in`` as an unread pointer."""
    return stand_in if tensor is None else tensor.contiguous()


@launches_on_tensor_device
def segmented_topk(scores, offsets, mask, k, largest):
    scores = scores.contiguous()
    groups, largest_group, group_size = _groups(scores, offsets)
    values = scores.new_empty((groups, k))
    indices = scores.new_empty((groups, k), dtype=torch.int64)
    if groups == 0:
        return values, indices
    if largest_group > LARGE_GROUP:
        _large().segmented_topk(scores, offsets, mask, k, largest, groups, group_size, values, indices)
        return values, indices
    block = _block(largest_group)
    _segmented_topk_kernel[(groups,)](scores, _optional(offsets, scores), _optional(mask, scores), values, indices,
                                      group_size, scores.numel(), k, RAGGED=offsets is not None,
                                      HAS_MASK=mask is not None,
                                      LARGEST=largest, BLOCK=block, LOG_BLOCK=block.bit_length() - 1,
                                      num_warps=_num_warps(block, scores.is_cuda))
    return values, indices


@launches_on_tensor_device
def beam_prune(scores, offsets, k, finished, lengths, length_penalty, dedup_keys, refill_to):
    scores = scores.contiguous()
    groups, largest_group, group_size = _groups(scores, offsets)
    indices = scores.new_empty((groups, k), dtype=torch.int64)
    values = scores.new_empty((groups, k), dtype=torch.float32)
    counts = scores.new_empty((groups,), dtype=torch.int64)
    parents = scores.new_empty((groups, refill_to), dtype=torch.int64)
    if groups == 0:
        return indices, values, counts, parents
    penalised = lengths is not None and length_penalty != 0
    # A negative base has a real power only for an integral exponent: (-1) ** p gives its sign.
    negative_length_sign = (-1.0) ** length_penalty if float(length_penalty).is_integer() else math.nan
    if largest_group > LARGE_GROUP:
        _large().beam_prune(scores, offsets, finished, lengths, length_penalty, negative_length_sign, dedup_keys, k,
                            refill_to, penalised, groups, group_size, (indices, values, counts, parents))
        return indices, values, counts, parents
    block = _block(largest_group)
    num_warps = _num_warps(block, scores.is_cuda)
    _beam_prune_kernel[(groups,)](scores, _optional(offsets, scores), _optional(finished, scores),
                                  _optional(lengths, scores), _optional(dedup_keys, scores),
                                  indices, values, counts, parents, float(length_penalty), negative_length_sign,
                                  group_size, scores.numel(), k, refill_to, RAGGED=offsets is not None,
                                  HAS_FINISHED=finished is not None, PENALISED=penalised,
                                  DEDUP=dedup_keys is not None, BLOCK=block, LOG_BLOCK=block.bit_length() - 1,
                                  CHUNK=_pair_chunk(block, num_warps, scores.is_cuda), num_warps=num_warps,
                                  enable_fp_fusion=False)
    return indices, values, counts, parents


@launches_on_tensor_device
def resample(log_weights, offsets, num_samples, method, seed):
    log_weights = log_weights.contiguous()
    groups, largest_group, group_size = _groups(log_weights, offsets)
    ancestors = log_weights.new_empty((groups, num_samples), dtype=torch.int64)
    if groups == 0:
        return ancestors
    sample_block = _strip(num_samples, log_weights.is_cuda)
    if largest_group > LARGE_GROUP:
        _large().resample(log_weights, offsets, num_samples, method, seed, groups, largest_group, group_size,
                          sample_block, ancestors)
        return ancestors
    block = _block(largest_group)
    _resample_kernel[(groups,)](log_weights, _optional(offsets, log_weights), ancestors, seed, group_size,
                                log_weights.numel(), num_samples, METHOD=method, RAGGED=offsets is not None,
                                BLOCK=block,
                                LOG_BLOCK=block.bit_length() - 1, SAMPLE_BLOCK=sample_block,
                                num_warps=_num_warps(max(block, sample_block), log_weights.is_cuda),
                                enable_fp_fusion=False)
    return ancestors


@launches_on_tensor_device
def effective_sample_size(log_weights, offsets):
    log_weights = log_weights.contiguous()
    groups, largest_group, group_size = _groups(log_weights, offsets)
    ess = log_weights.new_empty((groups,), dtype=torch.float32)
    if groups == 0:
        return ess
    if largest_group > LARGE_GROUP:
        _large().effective_sample_size(log_weights, offsets, groups, group_size, ess)
        return ess
    block = _block(largest_group)
    _effective_sample_size_kernel[(groups,)](log_weights, _optional(offsets, log_weights), ess, group_size,
                                             log_weights.numel(), RAGGED=offsets is not None, BLOCK=block,
                                             num_warps=_num_warps(block, log_weights.is_cuda), enable_fp_fusion=False)
    return ess


@launches_on_tensor_device
def vote(answer_keys, scores, offsets, mask, mode):
    answer_keys = answer_keys.contiguous()
    groups, largest_group, group_size = _groups(answer_keys, offsets)
    winners = answer_keys.new_empty((groups,))
    if groups == 0:
        return winners
    if largest_group > LARGE_GROUP:
        _large().vote(answer_keys, scores, offsets, mask, mode, groups, group_size, winners)
        return winners
    block = _block(largest_group)
    num_warps = _num_warps(block, answer_keys.is_cuda)
    _vote_kernel[(groups,)](answer_keys, _optional(scores, answer_keys), _optional(offsets, answer_keys),
                            _optional(mask, answer_keys), winners, group_size, answer_keys.numel(),
                            MODE=mode,
                            RAGGED=offsets is not None, HAS_MASK=mask is not None, BLOCK=block,
                            CHUNK=_pair_chunk(block, num_warps, answer_keys.is_cuda), num_warps=num_warps)
    return winners


@launches_on_tensor_device
def sequence_keys(token_ids, offsets):
    # The kernel reads both as dense arrays: a strided or expanded (stride-0) tensor is copied first.
    token_ids, offsets = token_ids.contiguous(), offsets.contiguous()
    sequences = offsets.shape[0] - 1
    keys = token_ids.new_empty((sequences,), dtype=torch.int64)
    if sequences == 0:
        return keys
    # Sized by the mean length, known without reading the offsets; longer sequences loop.
    block = _strip(triton.cdiv(token_ids.numel(), sequences), token_ids.is_cuda)
    _sequence_keys_kernel[(sequences,)](token_ids, offsets, keys, token_ids.numel(), BLOCK=block,
                                        num_warps=_num_warps(block, token_ids.is_cuda))
    return keys
