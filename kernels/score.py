"""Verifier scoring in Triton: PRM step scores from a few head rows, step aggregation, cosine and ensemble
scores (semantics: csrc/README.md, "Scoring ops").

PRM step scores are a gather of S hidden rows and C <= 8 dot products per row, so they are bound by reading
the S x H rows: a program takes a block of steps and walks H in ``BLOCK_H`` chunks of its rows and of all C
head rows at once, so every hidden row is read once. Partial sums stay per thread ([BLOCK_S, BLOCK_C,
BLOCK_H] of them) and are reduced across threads once, after the loop. There is no split of H across
programs: when S is small the whole read is a few microseconds of latency, and a split would need a second
cross-program combine.

``prm_scores`` adds the aggregation to the same launch. A program stores its steps' scores, then adds how
many steps of each candidate it covered to that candidate's counter (an atomic on a zeroed int32 per
candidate, only for candidates that run past its block); the program that completes a candidate reads
the candidate's step scores back and aggregates them. The steps are spread evenly over the programs
whatever the candidates' sizes (one long candidate or many short ones), and each candidate is aggregated
by one program in one fixed order, so results do not depend on which program finishes last. A candidate
without steps is written by the program whose ``EMPTY_BLOCK`` slice of the candidates holds it.

The launchers validate nothing: the Python layer has checked every argument, values included, on every
device (step_positions in range, step_offsets from 0 to S, non-decreasing, no empty candidate without
``empty``), so a candidate without steps gets ``empty`` here, or NaN when the op is called directly.
"""

import functools

import torch
import triton
import triton.language as tl

from ._device import launches_on_tensor_device

# GPU PRM programs: warps side by side along H, one 16-byte vector of a hidden row per thread and H chunk,
# every step row and head row of the program in each thread, so the loop over H is loads and FMAs only (no
# shuffles, no shared memory). Steps per program are bounded by the per-thread partial sums (steps x head
# rows x values a thread takes per row) and by spreading the steps over a few programs per SM first.
GPU_MAX_WARPS = 4
GPU_ACCUMULATORS_PER_THREAD = 64
GPU_MAX_STEPS_PER_PROGRAM = 16
GPU_PROGRAMS_PER_SM = 4
# Other GPU tiles, per thread: fp32 values (aggregation, cosine sums) and member pairs (ensemble ranks).
GPU_VALUES_PER_THREAD = 8
GPU_PAIRS_PER_THREAD = 16
GPU_MAX_MEMBERS = 256
# The interpreter pays per program, op and loop trip, not per element: big tiles, but few enough steps a
# program (and members a block) that the tests' longer candidates (larger groups) run across programs
# (blocks) and the counters (loops) are exercised.
INTERPRETER_STEPS_PER_PROGRAM = 16
INTERPRETER_MAX_BLOCK_H = 512
INTERPRETER_TILE = 1 << 14
INTERPRETER_MAX_MEMBERS = 64
INTERPRETER_PROGRAMS = 4


# -- shared pieces --------------------------------------------------------------------------------------


@triton.jit
def _owner(offsets_ptr, count, target, levels):
    """Per ``target``, the last n in [0, count) with ``offsets[n] <= target``: the group (or candidate) that
    holds flat index ``target``, skipping empty ones. A branch-free binary search; ``levels`` is the bit
    length of ``count - 1``."""
    owner = target * 0
    for level in range(levels):
        probe = owner + (1 << (levels - 1 - level))
        inside = probe < count
        start = tl.load(offsets_ptr + probe, mask=inside, other=0)
        owner = tl.where(inside & (start <= target), probe, owner)
    return owner


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def _log1p(x):
    """log(1 + x) to within rounding for small x too: log(u) x / (u - 1) with u = 1 + x rounded (Goldberg)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _aggregate(scores_ptr, start, size, live, HOW: tl.constexpr, BLOCK_K: tl.constexpr, CACHE: tl.constexpr):
    """Per lane, one fp32 score from ``scores[start : start + size]`` (live lanes with ``size > 0``).

    ``BLOCK_K`` steps of every lane per loop trip; NaN propagates through every ``HOW``.
    """
    if HOW == 0:
        result = tl.load(scores_ptr + start + size - 1, mask=live & (size > 0), other=0.0,
                         cache_modifier=CACHE).to(tl.float32)
    else:
        column = tl.arange(0, BLOCK_K)
        if HOW == 1:
            result = tl.full(start.shape, float("inf"), tl.float32)
        elif HOW == 4:
            result = tl.full(start.shape, float("-inf"), tl.float32)
        elif HOW == 2:
            result = tl.full(start.shape, 1.0, tl.float32)
        else:
            result = tl.zeros(start.shape, tl.float32)
        seen_nan = tl.zeros(start.shape, tl.int32)
        longest = tl.max(tl.where(live, size, 0))
        for first in range(0, longest, BLOCK_K):
            index = first + column
            inside = live[:, None] & (index[None, :] < size[:, None])
            value = tl.load(scores_ptr + start[:, None] + index[None, :], mask=inside, other=0.0,
                            cache_modifier=CACHE).to(tl.float32)
            if HOW == 1 or HOW == 4:
                # A GPU's min / max drop NaN: count it on the side.
                nan = inside & (value != value)
                seen_nan |= tl.max(nan.to(tl.int32), 1)
                if HOW == 1:
                    result = tl.minimum(result, tl.min(tl.where(inside & ~nan, value, float("inf")), 1))
                else:
                    result = tl.maximum(result, tl.max(tl.where(inside & ~nan, value, float("-inf")), 1))
            elif HOW == 2:
                result *= tl.reduce(tl.where(inside, value, 1.0), 1, _multiply)
            elif HOW == 3:
                result += tl.sum(tl.where(inside, value, 0.0), 1)
            else:
                clipped = tl.clamp(value, 1e-7, 1.0 - 1e-7, propagate_nan=tl.PropagateNan.ALL)
                result += tl.sum(tl.where(inside, tl.log(clipped) - _log1p(-clipped), 0.0), 1)
        if HOW == 1 or HOW == 4:
            result = tl.where(seen_nan != 0, float("nan"), result)
        if HOW == 3:
            result = tl.math.div_rn(result, tl.maximum(size, 1).to(tl.float32))
    return result


# -- prm_step_scores and prm_scores ------------------------------------------------------------------------


@triton.jit
def _step_scores(hidden_ptr, positions_ptr, weight_ptr, bias_ptr, step, inside, row_stride, hidden_size, head_rows,
                 positive_index, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """fp32 scores of the steps at ``step`` (a [BLOCK_S] block; ``inside`` masks its ragged end)."""
    row_start = tl.load(positions_ptr + step, mask=inside, other=0) * row_stride
    head_row = tl.arange(0, BLOCK_C)
    head_live = head_row < head_rows
    column = tl.arange(0, BLOCK_H)
    # Per-thread partial sums, reduced across threads once after the loop.
    products = tl.zeros([step.shape[0], BLOCK_C, BLOCK_H], tl.float32)
    for first in range(0, hidden_size, BLOCK_H):
        index = first + column
        in_row = index < hidden_size
        # Loaded as [BLOCK_S, 1, BLOCK_H] and [1, BLOCK_C, BLOCK_H] slices of the product's layout.
        hidden = tl.load(hidden_ptr + row_start[:, None, None] + index[None, None, :],
                         mask=inside[:, None, None] & in_row[None, None, :], other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + head_row[None, :, None] * hidden_size + index[None, None, :],
                         mask=head_live[None, :, None] & in_row[None, None, :], other=0.0).to(tl.float32)
        products += hidden * weight
    logits = tl.sum(products, 2)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + head_row, mask=head_live, other=0.0).to(tl.float32)[None, :]
    positive = head_row[None, :] == positive_index
    if ACTIVATION == 0:
        # A NaN logit makes the sum NaN whether or not the max skipped it.
        logits = tl.where(head_live[None, :], logits, float("-inf"))
        shifted = tl.exp(logits - tl.max(logits, 1)[:, None])
        score = tl.math.div_rn(tl.sum(tl.where(positive, shifted, 0.0), 1), tl.sum(shifted, 1))
    else:
        logit = tl.sum(tl.where(positive, logits, 0.0), 1)
        score = tl.math.div_rn(1.0, 1.0 + tl.exp(-logit))
    return score


@triton.jit
def _finish_candidates(step_scores_ptr, offsets_ptr, counters_ptr, scores_ptr, block_start, block_end,
                       num_candidates, levels, HOW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Count this program's steps [block_start, block_end) into their candidates; aggregate the candidates
    this completes."""
    first = _owner(offsets_ptr, num_candidates, block_start, levels)
    last = _owner(offsets_ptr, num_candidates, block_end - 1, levels)
    # All of this program's step-score stores come before the counters announce them.
    tl.debug_barrier()
    for chunk in range(first, last + 1, BLOCK_N):
        candidate = chunk + tl.arange(0, BLOCK_N)
        live = candidate <= last
        start = tl.load(offsets_ptr + candidate, mask=live, other=0)
        end = tl.load(offsets_ptr + candidate + 1, mask=live, other=0)
        covered = (tl.minimum(end, block_end) - tl.maximum(start, block_start)).to(tl.int32)
        shared = live & (covered > 0) & ((start < block_start) | (end > block_end))
        counted_before = tl.atomic_add(counters_ptr + candidate, covered, mask=shared, sem="acq_rel")
        complete = live & (covered > 0) & (~shared | (counted_before + covered == (end - start).to(tl.int32)))
        # The acquiring threads' view reaches every thread; the reads bypass L1, which may hold lines
        # other programs have written since.
        tl.debug_barrier()
        value = _aggregate(step_scores_ptr, start, end - start, complete, HOW, BLOCK_K, ".cg")
        tl.store(scores_ptr + candidate, value, mask=complete)


@triton.jit
def _prm_kernel(hidden_ptr, positions_ptr, weight_ptr, bias_ptr, offsets_ptr, counters_ptr, step_scores_ptr,
                scores_ptr, num_steps, num_candidates, row_stride, hidden_size, head_rows, positive_index, empty_value,
                levels, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, AGGREGATE: tl.constexpr, HOW: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EMPTY_BLOCK: tl.constexpr):
    program = tl.program_id(0)
    block_start = program * BLOCK_S
    if block_start < num_steps:
        step = block_start + tl.arange(0, BLOCK_S)
        inside = step < num_steps
        score = _step_scores(hidden_ptr, positions_ptr, weight_ptr, bias_ptr, step, inside, row_stride, hidden_size,
                             head_rows, positive_index, HAS_BIAS, ACTIVATION, BLOCK_C, BLOCK_H)
        tl.store(step_scores_ptr + step, score, mask=inside)
        if AGGREGATE:
            _finish_candidates(step_scores_ptr, offsets_ptr, counters_ptr, scores_ptr, block_start,
                               tl.minimum(block_start + BLOCK_S, num_steps), num_candidates, levels, HOW, BLOCK_N,
                               BLOCK_K)
    if AGGREGATE:
        candidate = program * EMPTY_BLOCK + tl.arange(0, EMPTY_BLOCK)
        live = candidate < num_candidates
        size = tl.load(offsets_ptr + candidate + 1, mask=live, other=0) - tl.load(offsets_ptr + candidate, mask=live,
                                                                                  other=0)
        tl.store(scores_ptr + candidate, tl.full([EMPTY_BLOCK], empty_value, tl.float32), mask=live & (size == 0))


# -- aggregate_steps -----------------------------------------------------------------------------------


@triton.jit
def _aggregate_steps_kernel(step_scores_ptr, offsets_ptr, scores_ptr, num_candidates, dense_size, empty_value,
                            HOW: tl.constexpr, RAGGED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    candidate = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = candidate < num_candidates
    if RAGGED:
        start = tl.load(offsets_ptr + candidate, mask=live, other=0)
        size = tl.load(offsets_ptr + candidate + 1, mask=live, other=0) - start
    else:
        start = candidate.to(tl.int64) * dense_size
        size = tl.full([BLOCK_N], dense_size, tl.int64)
    value = _aggregate(step_scores_ptr, start, size, live, HOW, BLOCK_K, "")
    tl.store(scores_ptr + candidate, tl.where(size > 0, value, empty_value), mask=live)


# -- cosine_scores ---------------------------------------------------------------------------------------


@triton.jit
def _cosine_kernel(embeddings_ptr, references_ptr, offsets_ptr, scores_ptr, num_rows, dim, embedding_stride,
                   reference_stride, num_groups, levels, LAYOUT: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    row = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = row < num_rows
    # LAYOUT 0: one reference (stride 0); 1: pairwise; 2: the reference of the row's group.
    if LAYOUT == 2:
        reference = _owner(offsets_ptr, num_groups, row, levels)
    else:
        reference = row
    embedding_start = row.to(tl.int64) * embedding_stride
    reference_start = reference.to(tl.int64) * reference_stride
    column = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    embedding_squares = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    reference_squares = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for first in range(0, dim, BLOCK_D):
        index = first + column
        inside = live[:, None] & (index[None, :] < dim)
        embedding = tl.load(embeddings_ptr + embedding_start[:, None] + index[None, :], mask=inside,
                            other=0.0).to(tl.float32)
        reference_value = tl.load(references_ptr + reference_start[:, None] + index[None, :], mask=inside,
                                  other=0.0).to(tl.float32)
        dot += embedding * reference_value
        embedding_squares += embedding * embedding
        reference_squares += reference_value * reference_value
    embedding_norm = tl.maximum(tl.sqrt_rn(tl.sum(embedding_squares, 1)), 1e-12)
    reference_norm = tl.maximum(tl.sqrt_rn(tl.sum(reference_squares, 1)), 1e-12)
    tl.store(scores_ptr + row, tl.math.div_rn(tl.sum(dot, 1), embedding_norm * reference_norm), mask=live)


# -- ensemble_scores -------------------------------------------------------------------------------------


@triton.jit
def _ranks(row_ptr, value, size, CHUNK: tl.constexpr):
    """Mid-ranks of ``value`` (a [BLOCK] block) among the ``size`` entries at ``row_ptr``; NaN ranks lowest."""
    value_nan = value != value
    below = tl.zeros(value.shape, tl.int32)
    equal = tl.zeros(value.shape, tl.int32)
    for first in range(0, size, CHUNK):
        index = first + tl.arange(0, CHUNK)
        inside = index < size
        other = tl.load(row_ptr + index, mask=inside, other=0.0).to(tl.float32)
        other_nan = (other != other)[None, :]
        lower = (other[None, :] < value[:, None]) | (other_nan & ~value_nan[:, None])
        same = (other[None, :] == value[:, None]) | (other_nan & value_nan[:, None])
        below += tl.sum((lower & inside[None, :]).to(tl.int32), 1)
        equal += tl.sum((same & inside[None, :]).to(tl.int32), 1)
    return 1.0 + below.to(tl.float32) + (equal - 1).to(tl.float32) * 0.5


@triton.jit
def _wide_scores(row_ptr, index, size):
    """The scores at ``index`` rounded to fp32 (as every backend reads them), widened to fp64; NaN past
    ``size``."""
    return tl.load(row_ptr + index, mask=index < size, other=float("nan")).to(tl.float32).to(tl.float64)


@triton.jit
def _zscores(row_ptr, value, size, CHUNK: tl.constexpr):
    """z-scores of ``value`` against the finite entries of the ``size`` at ``row_ptr`` (two passes).

    The sums are fp64: fp32 sums of many equal scores miss their mean, which would leave z != 0.
    """
    count = tl.zeros([CHUNK], tl.int32)
    total = tl.zeros([CHUNK], tl.float64)
    for first in range(0, size, CHUNK):
        other = _wide_scores(row_ptr, first + tl.arange(0, CHUNK), size)
        finite = tl.abs(other) < float("inf")
        count += finite.to(tl.int32)
        total += tl.where(finite, other, 0.0)
    count_value = tl.maximum(tl.sum(count), 1).to(tl.float64)
    mean = tl.sum(total) / count_value
    squares = tl.zeros([CHUNK], tl.float64)
    for first in range(0, size, CHUNK):
        other = _wide_scores(row_ptr, first + tl.arange(0, CHUNK), size)
        deviation = other - mean
        squares += tl.where(tl.abs(other) < float("inf"), deviation * deviation, 0.0)
    std = tl.sqrt(tl.sum(squares) / count_value)
    z = tl.where(std > 0, (value.to(tl.float64) - mean) / tl.where(std > 0, std, 1.0), 0.0).to(tl.float32)
    z = tl.where(value == float("inf"), float("inf"), z)
    return tl.where((value != value) | (value == float("-inf")), float("-inf"), z)


@triton.jit
def _ensemble_kernel(scores_ptr, offsets_ptr, weights_ptr, out_ptr, num, score_stride, num_verifiers,
                     HOW: tl.constexpr, RAGGED: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program (g, p) scores member blocks p, p + P, ... of group g, every verifier in turn."""
    if RAGGED:
        # Clamped into [0, num], as the CUDA kernel clamps them: offsets on a GPU are not value-checked,
        # and bad ones must not make a program read or write outside the scores.
        group = tl.program_id(0)
        start = tl.minimum(tl.maximum(tl.load(offsets_ptr + group), 0), num)
        size = tl.minimum(tl.maximum(tl.load(offsets_ptr + group + 1), start), num) - start
    else:
        start = 0
        size = num
    all_verifiers = tl.arange(0, BLOCK_V)
    if HAS_WEIGHTS:
        # Zero weights add nothing, so the sum over all is the sum over the verifiers used.
        weight_sum = tl.sum(tl.load(weights_ptr + all_verifiers, mask=all_verifiers < num_verifiers, other=0.0))
    else:
        weight_sum = tl.sum(tl.where(all_verifiers < num_verifiers, 1.0, 0.0))
    member = tl.arange(0, BLOCK)
    for first in range(tl.program_id(1) * BLOCK, size, tl.num_programs(1) * BLOCK):
        index = first + member
        inside = index < size
        total = tl.zeros([BLOCK], tl.float32)
        row_ptr = scores_ptr + start
        for verifier in range(num_verifiers):
            if HAS_WEIGHTS:
                weight = tl.load(weights_ptr + verifier)
            else:
                weight = 1.0
            # A verifier with weight 0 is left out (0 times an infinite score would be NaN).
            if weight != 0:
                value = tl.load(row_ptr + index, mask=inside, other=0.0).to(tl.float32)
                if HOW == 0:
                    total += weight * _ranks(row_ptr, value, size, CHUNK)
                else:
                    total += weight * _zscores(row_ptr, value, size, CHUNK)
            row_ptr += score_stride
        tl.store(out_ptr + start + index, tl.math.div_rn(total, weight_sum), mask=inside)


# -- launchers ------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    """Programs that keep every SM busy (a few each), or a handful under the interpreter."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return GPU_PROGRAMS_PER_SM * _sm_count(device.index or 0)


def _power_of_2_at_most(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def _num_warps(tile: int, per_thread: int, on_gpu: bool) -> int:
    """Warps for a program holding ``tile`` values, ``per_thread`` a thread."""
    return max(1, min(GPU_MAX_WARPS, tile // (32 * per_thread))) if on_gpu else 1


def _tile(num_warps: int, per_thread: int, on_gpu: bool) -> int:
    return 32 * num_warps * per_thread if on_gpu else INTERPRETER_TILE


def _levels(count: int) -> int:
    """Binary-search levels that reach index ``count - 1`` (see ``_owner``)."""
    return max(count - 1, 0).bit_length()


def _rows(tensor):
    """A 2-D tensor whose rows are contiguous (a view when they already are), and its row stride."""
    if tensor.dim() == 2 and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        tensor = tensor.contiguous()
    return tensor, tensor.stride(0)


def _aggregate_blocks(num_steps: int, num_candidates: int, tile: int) -> tuple[int, int]:
    """(candidates, steps of each) an aggregation loop trip covers, shaped by the mean candidate size."""
    mean = -(-num_steps // max(num_candidates, 1))
    block_k = min(tile, triton.next_power_of_2(max(mean, 1)))
    return max(1, min(tile // block_k, triton.next_power_of_2(max(num_candidates, 1)))), block_k


def _prm_blocks(num_steps: int, hidden_size: int, head_rows: int, element_size: int,
                device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_S, BLOCK_C, BLOCK_H, num_warps) of the PRM kernel."""
    block_c = triton.next_power_of_2(head_rows)
    row = triton.next_power_of_2(max(hidden_size, 1))
    if device.type != "cuda":
        return INTERPRETER_STEPS_PER_PROGRAM, block_c, min(row, INTERPRETER_MAX_BLOCK_H), 1
    vector = 16 // element_size
    num_warps = max(1, min(GPU_MAX_WARPS, row // (32 * vector)))
    block_h = min(row, 32 * num_warps * vector)
    per_thread = max(1, block_h // (32 * num_warps))
    block_s = min(GPU_MAX_STEPS_PER_PROGRAM,
                  _power_of_2_at_most(GPU_ACCUMULATORS_PER_THREAD // (block_c * per_thread)),
                  _power_of_2_at_most(num_steps // _programs_wanted(device)))
    return block_s, block_c, block_h, num_warps


def _launch_prm(hidden_states, step_positions, step_offsets, head_weight, head_bias, positive_index, activation, how,
                empty):
    """Step scores [S], and with ``step_offsets`` the candidate scores [N] in the same launch."""
    on_gpu = hidden_states.is_cuda
    hidden_states, row_stride = _rows(hidden_states)
    step_positions, head_weight = step_positions.contiguous(), head_weight.contiguous()
    num_steps = step_positions.numel()
    head_rows, hidden_size = head_weight.shape
    step_scores = torch.empty(num_steps, dtype=torch.float32, device=hidden_states.device)
    aggregate = step_offsets is not None
    num_candidates = step_offsets.numel() - 1 if aggregate else 0
    scores = torch.empty(num_candidates, dtype=torch.float32, device=hidden_states.device)

    block_s, block_c, block_h, num_warps = _prm_blocks(num_steps, hidden_size, head_rows,
                                                       hidden_states.element_size(), hidden_states.device)
    step_programs = triton.cdiv(num_steps, block_s)
    empty_block = triton.next_power_of_2(max(1, triton.cdiv(num_candidates, max(step_programs, 1))))
    grid = max(step_programs, triton.cdiv(num_candidates, empty_block))
    if grid == 0:
        return scores, step_scores
    block_n, block_k = _aggregate_blocks(num_steps, num_candidates, _tile(num_warps, GPU_VALUES_PER_THREAD, on_gpu))
    if aggregate:
        step_offsets = step_offsets.contiguous()
        counters = torch.zeros(num_candidates, dtype=torch.int32, device=hidden_states.device)
    else:
        step_offsets = counters = step_positions
    _prm_kernel[(grid,)](hidden_states, step_positions, head_weight,
                         head_weight if head_bias is None else head_bias.contiguous(), step_offsets, counters,
                         step_scores, scores, num_steps, num_candidates, row_stride, hidden_size, head_rows,
                         positive_index, float("nan") if empty is None else float(empty), _levels(num_candidates),
                         HAS_BIAS=head_bias is not None, ACTIVATION=activation, AGGREGATE=aggregate, HOW=how,
                         BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_K=block_k,
                         EMPTY_BLOCK=empty_block, num_warps=num_warps)
    return scores, step_scores


@launches_on_tensor_device
def prm_step_scores(hidden_states, step_positions, head_weight, head_bias, positive_index, activation):
    return _launch_prm(hidden_states, step_positions, None, head_weight, head_bias, positive_index, activation, 0,
                       None)[1]


@launches_on_tensor_device
def prm_scores(hidden_states, step_positions, step_offsets, head_weight, head_bias, positive_index, activation, how,
               empty):
    return _launch_prm(hidden_states, step_positions, step_offsets, head_weight, head_bias, positive_index,
                       activation, how, empty)


@launches_on_tensor_device
def aggregate_steps(step_scores, step_offsets, how, empty):
    on_gpu = step_scores.is_cuda
    step_scores = step_scores.contiguous()
    if step_offsets is None:
        num_candidates, dense_size = step_scores.shape
    else:
        num_candidates, dense_size = step_offsets.numel() - 1, 0
        step_offsets = step_offsets.contiguous()
    scores = torch.empty(num_candidates, dtype=torch.float32, device=step_scores.device)
    if num_candidates == 0:
        return scores
    block_n, block_k = _aggregate_blocks(step_scores.numel(), num_candidates,
                                         _tile(GPU_MAX_WARPS, GPU_VALUES_PER_THREAD, on_gpu))
    _aggregate_steps_kernel[(triton.cdiv(num_candidates, block_n),)](
        step_scores, step_scores if step_offsets is None else step_offsets, scores, num_candidates, dense_size,
        float("nan") if empty is None else float(empty), HOW=how, RAGGED=step_offsets is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=_num_warps(block_n * block_k, GPU_VALUES_PER_THREAD, on_gpu))
    return scores


@launches_on_tensor_device
def cosine_scores(embeddings, references, offsets):
    on_gpu = embeddings.is_cuda
    embeddings, embedding_stride = _rows(embeddings)
    num_rows, dim = embeddings.shape
    scores = torch.empty(num_rows, dtype=torch.float32, device=embeddings.device)
    if num_rows == 0:
        return scores
    if references.dim() == 1:
        layout, references, reference_stride = 0, references.contiguous(), 0
    else:
        layout = 1 if offsets is None else 2
        references, reference_stride = _rows(references)
    num_groups = 0 if offsets is None else offsets.numel() - 1
    if layout == 2 and num_groups == 0:  # rows but no group: offsets only a GPU leaves unchecked, no reference
        return scores.fill_(float("nan"))
    tile = _tile(GPU_MAX_WARPS, GPU_VALUES_PER_THREAD, on_gpu)
    # On a GPU a row chunk is a warp's worth of 16-byte vectors; the rows fill the other warps.
    row_chunk = 32 * (16 // embeddings.element_size()) if on_gpu else INTERPRETER_MAX_BLOCK_H
    block_d = min(triton.next_power_of_2(max(dim, 1)), row_chunk)
    block_n = max(1, min(tile // block_d, triton.next_power_of_2(num_rows)))
    _cosine_kernel[(triton.cdiv(num_rows, block_n),)](
        embeddings, references, embeddings if offsets is None else offsets.contiguous(), scores, num_rows, dim,
        embedding_stride, reference_stride, num_groups, _levels(num_groups), LAYOUT=layout, BLOCK_N=block_n,
        BLOCK_D=block_d, num_warps=_num_warps(block_n * block_d, GPU_VALUES_PER_THREAD, on_gpu))
    return scores


@launches_on_tensor_device
def ensemble_scores(scores, offsets, how, weights):
    on_gpu = scores.is_cuda
    scores, score_stride = _rows(scores)
    num_verifiers, num = scores.shape
    out = torch.empty(num, dtype=torch.float32, device=scores.device)
    if num == 0:
        return out
    tile = _tile(GPU_MAX_WARPS, GPU_PAIRS_PER_THREAD, on_gpu)
    if offsets is None:
        groups, group_size = 1, num
    else:
        groups = offsets.numel() - 1
        if groups == 0:  # no group holds a candidate: offsets the checks refuse where they can read them
            return out.fill_(float("nan"))
        group_size = -(-num // groups)
    block = max(16, min(GPU_MAX_MEMBERS if on_gpu else INTERPRETER_MAX_MEMBERS, triton.next_power_of_2(group_size)))
    chunk = max(1, tile // block)
    # Each group's member blocks are spread over programs; with few groups, several a group (those past a
    # group's end return at once), which needs no sync to read the group sizes.
    member_programs = max(1, min(triton.cdiv(num, block), triton.cdiv(_programs_wanted(scores.device), groups)))
    _ensemble_kernel[(groups, member_programs)](
        scores, scores if offsets is None else offsets.contiguous(),
        scores if weights is None else weights.contiguous(), out, num, score_stride, num_verifiers, HOW=how,
        RAGGED=offsets is not None, HAS_WEIGHTS=weights is not None, BLOCK=block, CHUNK=chunk,
        BLOCK_V=triton.next_power_of_2(num_verifiers),
        num_warps=_num_warps(block * chunk, GPU_PAIRS_PER_THREAD, on_gpu))
    return out
