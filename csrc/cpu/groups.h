// How the selection kernels walk their groups: dense rows or CSR offsets (csrc/README.md, "Selection ops"),
// in parallel over groups, one group at a time per thread, in thread-local scratch space that stays
// allocated between calls (a warm call allocates its outputs and nothing else).
//
// Its code lives in the inline namespace CPU_CAPABILITY, named per capability build (csrc/README.md, "Layout").
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fastsearch::cpu {
inline namespace CPU_CAPABILITY {

// -- scratch ---------------------------------------------------------------------------------------------

// Per-thread scratch space of one kind, kept from call to call.
template <typename Scratch>
Scratch& thread_scratch() {
  static thread_local Scratch scratch;
  return scratch;
}

// Room for `size` elements in a scratch vector. It only ever grows, so that refills are not zeroed; the
// loops write through the raw pointer (push_back's reloads of the end pointer cost more than the work).
template <typename T>
T* room_for(std::vector<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// values[begin, begin + size) of a tensor of `dtype`, as fp32 (lengths.float(), scores.float()).
inline void to_float(at::ScalarType dtype, const void* values, int64_t begin, int64_t size, float* out) {
  AT_DISPATCH_V2(dtype, "to_float", AT_WRAP([&] {
    const scalar_t* in = static_cast<const scalar_t*>(values) + begin;
    for (int64_t i = 0; i < size; ++i) out[i] = static_cast<float>(in[i]);
  }), AT_EXPAND(AT_ALL_TYPES), at::kHalf, at::kBFloat16);
}

// body(std::true_type{}) when `present`, else body(std::false_type{}): a loop over an optional input then
// tests its presence at compile time (a test per element keeps the loop from vectorising).
template <typename Body>
auto with_optional(bool present, const Body& body) {
  return present ? body(std::true_type{}) : body(std::false_type{});
}

// -- groups ----------------------------------------------------------------------------------------------

// Where each group's candidates lie: rows of a dense [G, C] tensor, or CSR offsets into a flat one.
struct Groups {
  const int64_t* offsets;  // nullptr for dense groups
  int64_t count;
  int64_t dense_size;
  int64_t total;

  int64_t begin(int64_t group) const { return offsets == nullptr ? group * dense_size : offsets[group]; }
  int64_t size(int64_t group) const {
    return offsets == nullptr ? dense_size : offsets[group + 1] - offsets[group];
  }
  // The index an op reports: row-local for dense groups, flat for ragged ones.
  int64_t reported(int64_t begin, int64_t local) const { return offsets == nullptr ? local : begin + local; }
};

// Rank codes (rank_keys.h) hold a candidate's index within its group in 32 bits.
constexpr int64_t kMaxGroupSize = int64_t{1} << 32;

// The groups of checked `values`; `offsets` (contiguous, or undefined for dense input) must outlive them.
inline Groups groups_of(const at::Tensor& values, const at::Tensor& offsets) {
  const Groups groups = offsets.defined()
                            ? Groups{offsets.const_data_ptr<int64_t>(), offsets.numel() - 1, 0, values.numel()}
                            : Groups{nullptr, values.size(0), values.size(1), values.numel()};
  if (groups.total >= kMaxGroupSize) {  // only then can a group be too large
    for (int64_t group = 0; group < groups.count; ++group) {
      TORCH_CHECK_VALUE(groups.size(group) < kMaxGroupSize, "groups must hold fewer than 2^32 candidates, got ",
                        groups.size(group), " in group ", group);
    }
  }
  return groups;
}

// -- the parallel loop over groups -----------------------------------------------------------------------

// Work, in nanoseconds, that each thread of a parallel loop gets at least. A fork-join of at::parallel_for
// costs 1 to 2 us while the pool's threads spin, and 10 to 20 us once they sleep, as they usually have
// between the steps of a search (a step waits for the model); below this, one thread does it all.
constexpr double kGrainNanoseconds = 20000.0;

// About what a group costs on one core, in nanoseconds: per candidate, and per group (measured with AVX2).
struct GroupCost {
  double per_candidate;
  double per_group;
};

// The grain (in groups) of a parallel loop over `groups`.
inline int64_t group_grain(const Groups& groups, GroupCost cost) {
  const double mean_size = static_cast<double>(groups.total) / static_cast<double>(std::max<int64_t>(groups.count, 1));
  const double per_group = std::max(cost.per_candidate * mean_size + cost.per_group, 1.0);
  return std::max<int64_t>(1, static_cast<int64_t>(kGrainNanoseconds / per_group));
}

// Calls body(group, begin, size) for every group, in parallel over groups.
template <typename Body>
void for_each_group(const Groups& groups, GroupCost cost, const Body& body) {
  if (groups.count == 0) return;
  at::parallel_for(0, groups.count, group_grain(groups, cost), [&](int64_t first, int64_t last) {
    for (int64_t group = first; group < last; ++group) body(group, groups.begin(group), groups.size(group));
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastsearch::cpu
