// CPU kernels of the selection ops proper: segmented top-k and beam pruning. Semantics: csrc/README.md
// ("Selection ops"); oracle: fastsearch/ops/select.py.
//
// Both give each candidate of a group a rank code (rank_keys.h), one integer whose order is the contract's,
// with unselectable candidates (masked, finished, NaN) last, and order the best k with std::partial_sort or
// std::nth_element. beam_prune without dedup keys and k <= 8 (a beam search's usual call) finds its few best
// with best_few.h's vector network instead, where the build has AVX2. Both ways select alike, and the vector
// paths only compare, convert and divide, so every capability build gives the same bits.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/select_checks.h"
#include "cpu/best_few.h"
#include "cpu/groups.h"
#include "cpu/key_hash.h"
#include "cpu/length_penalty.h"
#include "cpu/rank_keys.h"
#include "cpu/tensor_args.h"

namespace fastsearch::cpu {
namespace {

constexpr float kInfinity = std::numeric_limits<float>::infinity();

// -- segmented_topk --------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> segmented_topk(const at::Tensor& scores, const std::optional<at::Tensor>& offsets,
                                                  const std::optional<at::Tensor>& mask, int64_t k, bool largest) {
  check_segmented_topk_args(scores, offsets, mask, k);
  const Contiguous x = scores.expect_contiguous();
  const Contiguous bounds = contiguous_or_none(offsets);
  const Contiguous selectable = contiguous_or_none(mask);
  const Groups groups = groups_of(*x, *bounds);
  at::Tensor values = empty_output({groups.count, k}, x->scalar_type());
  at::Tensor indices = empty_output({groups.count, k}, at::kLong);
  const uint8_t* mask_data = flags_or_null(selectable);

  AT_DISPATCH_V2(x->scalar_type(), "segmented_topk", AT_WRAP([&] {
    using Key = Compared<scalar_t>;
    const scalar_t* in = x->const_data_ptr<scalar_t>();
    scalar_t* values_out = values.mutable_data_ptr<scalar_t>();
    int64_t* indices_out = indices.mutable_data_ptr<int64_t>();
    const scalar_t pad = static_cast<scalar_t>(largest ? -kInfinity : kInfinity);
    for_each_group(groups, {1.25, 30.0}, [&](int64_t group, int64_t begin, int64_t size) {
      RankCode<Key>* candidates = room_for(thread_scratch<std::vector<RankCode<Key>>>(), size);
      const int64_t selectable = with_optional(mask_data != nullptr, [&](auto has_mask) {
        int64_t chosen_count = 0;
        for (int64_t local = 0; local < size; ++local) {
          const Key value = static_cast<Key>(in[begin + local]);
          const uint32_t unmasked = has_mask ? mask_data[begin + local] : 1;
          const uint32_t chosen = unmasked & static_cast<uint32_t>(value == value);  // not NaN
          candidates[local] = rank_code_if(chosen, largest ? value : -value, local);  // smallest first: -value
          chosen_count += chosen;
        }
        return chosen_count;
      });
      const int64_t count = std::min(k, selectable);
      order_best(candidates, size, count);
      scalar_t* row_values = values_out + group * k;
      int64_t* row_indices = indices_out + group * k;
      for (int64_t position = 0; position < count; ++position) {
        const int64_t local = local_of(candidates[position]);
        row_values[position] = in[begin + local];
        row_indices[position] = groups.reported(begin, local);
      }
      std::fill(row_values + count, row_values + k, pad);
      std::fill(row_indices + count, row_indices + k, int64_t{-1});
    });
  }), AT_EXPAND(AT_FLOATING_TYPES), at::kHalf, at::kBFloat16);
  return {values, indices};
}

// -- beam_prune ------------------------------------------------------------------------------------------
//
// Per thread, its groups a batch at a time; per batch (phase 1) the adjusted scores, and the rank keys where
// the best few come from take_best; per group (phase 2) the survivors, written to the outputs as they are
// found, with the parents they refill (phase 3).

// Candidates prepared at a time: the fp32 scores, divisors and rank keys of a batch of whole groups stay in
// L1. Each pass over a batch runs as one vector loop; per group, vector loads then read data stored long
// before (a load over the partly stored tail of a group just written would wait for those stores).
constexpr int64_t kBatchCandidates = 2048;

struct BeamScratch {
  std::vector<float> adjusted;  // of a batch
  std::vector<float> divisors;
  std::vector<int32_t> keys;  // rank keys of a batch (few_best)
  std::vector<RankCode<float>> candidates;
  std::vector<RankCode<float>> best_of_key;  // indexed by dedup-key id
  KeyIds key_ids;
  std::vector<float> length_table;  // the calling thread's, read by every thread of the call
};

// What the phases of one beam_prune call read.
struct BeamInputs {
  Groups groups;
  int64_t k;
  at::ScalarType score_type;
  const void* scores;
  const uint8_t* finished;  // null: none
  LengthPenalty penalty;
  const int64_t* dedup_keys;  // null: none
  // The best few of each group come from take_best on rank keys, not from order_best on rank codes.
  bool few_best;
};

// Whether a call takes take_best (best_few.h): without dedup keys and for k <= kMaxNetworkK, where the build
// has AVX2.
bool uses_best_few(bool has_dedup_keys, int64_t k) {
#if defined(__AVX2__)
  return !has_dedup_keys && k <= kMaxNetworkK;
#else
  return false;
#endif
}

// -- phase 1: adjusted scores and rank keys of a batch ----------------------------------------------------

// adjusted[i] = score / divisor of candidate first + i, for i in [from, count): pass by pass.
void adjust_scores(const BeamInputs& in, BeamScratch& s, int64_t first, int64_t from, int64_t count,
                   float* adjusted) {
  const int64_t rest = count - from;
  to_float(in.score_type, in.scores, first + from, rest, adjusted + from);
  if (in.penalty.form == PenaltyForm::kNone) return;
  float* divisors = room_for(s.divisors, count);
  in.penalty.divisors_for(first + from, rest, divisors + from);
  for (int64_t i = from; i < count; ++i) adjusted[i] /= divisors[i];
}

#if defined(__AVX2__)
// The fp32 adjusted scores and the rank keys of `count` candidates (a multiple of 8) in one vector loop:
// scores converted, divided by their divisors (those of `lengths`, int64, when given; else those in
// `divisors` when given; else none), keys kNoKey where `finished` (when given) or NaN.
template <typename scalar_t>
void adjust_and_rank(const scalar_t* scores, const LengthPenalty& penalty, const int64_t* lengths,
                     const float* divisors, const uint8_t* finished, int64_t count, float* adjusted, int32_t* keys) {
  for (int64_t start = 0; start < count; start += kKeyLanes) {
    __m256 value = load_scores(scores + start);
    if (lengths != nullptr) {
      value = _mm256_div_ps(value, penalty.divisor(load_lengths(lengths + start)));
    } else if (divisors != nullptr) {
      value = _mm256_div_ps(value, _mm256_loadu_ps(divisors + start));
    }
    _mm256_storeu_ps(adjusted + start, value);
    store_rank_keys(value, finished == nullptr ? nullptr : finished + start, keys + start);
  }
}

// Phase 1 for take_best: adjusted scores and rank keys (8 more readable past the end) of the candidates
// [first, first + count), whole vectors in one loop, the rest pass by pass.
void adjust_and_rank_batch(const BeamInputs& in, BeamScratch& s, int64_t first, int64_t count, float* adjusted) {
  const LengthPenalty& penalty = in.penalty;
  const uint8_t* flags = in.finished == nullptr ? nullptr : in.finished + first;
  float* divisors = penalty.form == PenaltyForm::kNone ? nullptr : room_for(s.divisors, count);
  int32_t* keys = room_for(s.keys, count + kKeyLanes);
  const int64_t whole = count / kKeyLanes * kKeyLanes;
  // int64 lengths without a table (token counts, the usual lengths) are converted and raised in the loop;
  // other divisors are computed first.
  const bool int64_lengths = divisors != nullptr && penalty.table == nullptr && penalty.length_type == at::kLong;
  const int64_t* lengths = int64_lengths ? static_cast<const int64_t*>(penalty.lengths) + first : nullptr;
  if (divisors != nullptr && !int64_lengths) penalty.divisors_for(first, whole, divisors);
  AT_DISPATCH_V2(in.score_type, "beam_prune", AT_WRAP([&] {
    adjust_and_rank(static_cast<const scalar_t*>(in.scores) + first, penalty, lengths,
                    int64_lengths ? nullptr : divisors, flags, whole, adjusted, keys);
  }), AT_EXPAND(AT_FLOATING_TYPES), at::kHalf, at::kBFloat16);
  adjust_scores(in, s, first, whole, count, adjusted);
  rank_keys_of(adjusted + whole, flags == nullptr ? nullptr : flags + whole, count - whole, keys + whole);
}
#endif

// Phase 1: the batch arrays of the candidates [first, first + count).
void prepare_batch(const BeamInputs& in, BeamScratch& s, int64_t first, int64_t count) {
  float* adjusted = room_for(s.adjusted, count);
#if defined(__AVX2__)
  if (in.few_best) {
    adjust_and_rank_batch(in, s, first, count, adjusted);
    return;
  }
#endif
  adjust_scores(in, s, first, 0, count, adjusted);
}

// -- phase 2: one group's survivors -----------------------------------------------------------------------

// The rank codes of a group's candidates, kUnselectable where finished (null: none) or NaN; returns how many
// are selectable.
int64_t rank_codes(const float* adjusted, const uint8_t* finished, int64_t size, RankCode<float>* codes) {
  return with_optional(finished != nullptr, [&](auto has_finished) {
    int64_t selectable = 0;
    for (int64_t local = 0; local < size; ++local) {
      const uint32_t running = has_finished ? 1u ^ finished[local] : 1u;
      const uint32_t chosen = running & static_cast<uint32_t>(adjusted[local] == adjusted[local]);  // not NaN
      codes[local] = rank_code_if(chosen, adjusted[local], local);
      selectable += chosen;
    }
    return selectable;
  });
}

// Dedup: the best code of each dedup key (the first of equally good ones) among the `selectable` codes of
// codes[0, size), into s.best_of_key in order of first appearance; returns how many keys there are.
int64_t best_of_each_key(const RankCode<float>* codes, const int64_t* keys, int64_t size, int64_t selectable,
                         BeamScratch& s) {
  RankCode<float>* best_of_key = room_for(s.best_of_key, selectable);
  s.key_ids.reset(selectable);
  int64_t distinct = 0;
  for (int64_t local = 0; local < size; ++local) {
    if (codes[local] == kUnselectable<RankCode<float>>) continue;
    const int64_t id = s.key_ids.id(keys[local]);
    if (id == distinct) {
      best_of_key[distinct++] = codes[local];
    } else {
      best_of_key[id] = std::min(best_of_key[id], codes[local]);
    }
  }
  return distinct;
}

// Phase 2 on rank codes: the group [begin, begin + size)'s survivors, best first, emit(place, local, count)
// for every place < count; returns count.
template <typename Emit>
int64_t order_survivors(const BeamInputs& in, BeamScratch& s, int64_t begin, int64_t size, const float* adjusted,
                        const Emit& emit) {
  RankCode<float>* codes = room_for(s.candidates, size);
  int64_t selectable = rank_codes(adjusted, in.finished == nullptr ? nullptr : in.finished + begin, size, codes);
  int64_t ranked = size;
  if (in.dedup_keys != nullptr) {
    ranked = selectable = best_of_each_key(codes, in.dedup_keys + begin, size, selectable, s);
    codes = s.best_of_key.data();
  }
  const int64_t count = std::min(in.k, selectable);
  order_best(codes, ranked, count);
  for (int64_t place = 0; place < count; ++place) emit(place, local_of(codes[place]), count);
  return count;
}

// Phase 2: the survivors of the group [begin, begin + size), which starts at `batch_offset` in the batch
// arrays, as order_survivors gives them.
template <typename Emit>
int64_t select_survivors(const BeamInputs& in, BeamScratch& s, int64_t begin, int64_t size, int64_t batch_offset,
                         const Emit& emit) {
#if defined(__AVX2__)
  if (in.few_best) {
    return take_best_few(s.keys.data() + batch_offset, size, in.k, room_for(s.candidates, size), emit);
  }
#endif
  return order_survivors(in, s, begin, size, s.adjusted.data() + batch_offset, emit);
}

// -- phase 3: one group's row of the outputs --------------------------------------------------------------

// A group's row of indices, values and parents, and its count: the emit of phase 2, then finish.
struct SurvivorRow {
  int64_t* indices;
  float* values;
  int64_t* parents;
  int64_t* count;
  int64_t k;
  int64_t refill_to;
  const float* adjusted;  // the group's
  int64_t first_index;    // the index reported for the group's first candidate

  // Survivor `local` takes place `place` of `survivors`.
  void operator()(int64_t place, int64_t local, int64_t survivors) const {
    const int64_t index = first_index + local;
    indices[place] = index;
    values[place] = adjusted[local];
    refill_parents(place, index, survivors);
  }

  // Survivor `place` of `survivors` is also the parent of next step's beams place, place + survivors, ...:
  // written from the index in hand (reading the row back would wait on stores to computed places).
  void refill_parents(int64_t place, int64_t index, int64_t survivors) const {
    for (int64_t slot = place; slot < refill_to; slot += survivors) parents[slot] = index;
  }

  // After `survivors` survivors: the padding, the count, and no parents where nothing survived.
  void finish(int64_t survivors) const {
    std::fill(indices + survivors, indices + k, int64_t{-1});
    std::fill(values + survivors, values + k, -kInfinity);
    *count = survivors;
    if (survivors == 0) std::fill(parents, parents + refill_to, int64_t{-1});
  }
};

// Where beam_prune's results go.
struct BeamOutputs {
  int64_t* indices;  // [G, k]
  float* values;     // [G, k]
  int64_t* counts;   // [G]
  int64_t* parents;  // [G, refill_to]
  int64_t refill_to;

  SurvivorRow row(const BeamInputs& in, int64_t group, int64_t begin, const float* adjusted) const {
    return SurvivorRow{indices + group * in.k, values + group * in.k, parents + group * refill_to, counts + group,
                       in.k, refill_to, adjusted, in.groups.reported(begin, 0)};
  }
};

// -- the phases over a thread's groups ------------------------------------------------------------------

// The end of the batch from group `first`: whole groups, up to kBatchCandidates candidates (at least one
// group), none at or past `last`.
int64_t batch_end(const Groups& groups, int64_t first, int64_t last) {
  const int64_t begin = groups.begin(first);
  int64_t end = first + 1;
  while (end < last && groups.begin(end) + groups.size(end) - begin <= kBatchCandidates) ++end;
  return end;
}

// The three phases for the groups [first_group, last_group) of one thread.
void prune_groups(const BeamInputs& in, const BeamOutputs& out, int64_t first_group, int64_t last_group) {
  const Groups& groups = in.groups;
  BeamScratch& s = thread_scratch<BeamScratch>();
  for (int64_t batch_first = first_group; batch_first < last_group;) {
    const int64_t batch_last = batch_end(groups, batch_first, last_group);
    const int64_t batch_begin = groups.begin(batch_first);
    prepare_batch(in, s, batch_begin, groups.begin(batch_last - 1) + groups.size(batch_last - 1) - batch_begin);
    for (int64_t group = batch_first; group < batch_last; ++group) {
      const int64_t begin = groups.begin(group);
      const int64_t batch_offset = begin - batch_begin;
      const SurvivorRow row = out.row(in, group, begin, s.adjusted.data() + batch_offset);
      row.finish(select_survivors(in, s, begin, groups.size(group), batch_offset, row));
    }
    batch_first = batch_last;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> beam_prune(
    const at::Tensor& scores, const std::optional<at::Tensor>& offsets, int64_t k,
    const std::optional<at::Tensor>& finished, const std::optional<at::Tensor>& lengths, double length_penalty,
    const std::optional<at::Tensor>& dedup_keys, int64_t refill_to) {
  check_beam_prune_args(scores, offsets, k, finished, lengths, length_penalty, dedup_keys, refill_to);
  const Contiguous x = scores.expect_contiguous();
  const Contiguous bounds = contiguous_or_none(offsets);
  const Contiguous done = contiguous_or_none(finished);
  const Contiguous length_values = contiguous_or_none(lengths);
  const Contiguous keys = contiguous_or_none(dedup_keys);
  const Groups groups = groups_of(*x, *bounds);
  at::Tensor indices = empty_output({groups.count, k}, at::kLong);
  at::Tensor values = empty_output({groups.count, k}, at::kFloat);
  at::Tensor counts = empty_output({groups.count}, at::kLong);
  at::Tensor parents = empty_output({groups.count, refill_to}, at::kLong);
  if (groups.count == 0) return {indices, values, counts, parents};

  const int64_t* key_data = data_or_null<int64_t>(keys);
  const BeamInputs in{groups,
                      k,
                      x->scalar_type(),
                      x->const_data_ptr(),
                      flags_or_null(done),
                      length_penalty_of(*length_values, length_penalty, thread_scratch<BeamScratch>().length_table),
                      key_data,
                      uses_best_few(key_data != nullptr, k)};
  const BeamOutputs out{indices.mutable_data_ptr<int64_t>(), values.mutable_data_ptr<float>(),
                        counts.mutable_data_ptr<int64_t>(), parents.mutable_data_ptr<int64_t>(), refill_to};
  const GroupCost cost = in.few_best ? GroupCost{0.6, 50.0} : GroupCost{6.0, 50.0};
  at::parallel_for(0, groups.count, group_grain(groups, cost),
                   [&](int64_t first_group, int64_t last_group) { prune_groups(in, out, first_group, last_group); });
  return {indices, values, counts, parents};
}

}  // namespace
}  // namespace fastsearch::cpu

TORCH_LIBRARY_IMPL(fastsearch, CPU, m) {
  m.impl("segmented_topk", &fastsearch::cpu::segmented_topk);
  m.impl("beam_prune", &fastsearch::cpu::beam_prune);
}
