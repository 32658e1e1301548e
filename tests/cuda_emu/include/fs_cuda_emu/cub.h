// The CUB block collectives the kernels use, for the CUDA emulation: same interfaces, same contracts
// (every thread of the block calls; results where CUB defines them; TempStorage reused only after a
// barrier), written on the emulation's barriers. Their own correctness is assumed, as CUB's is: what these
// check is the kernels' use of them.
//
// - TempStorage holds the collective's data, as CUB's does: a kernel that reuses it (or a union member
//   over it) before every thread has read its result sees other data, as it would on a GPU.
// - BlockReduce gives its result to thread 0 only; the other threads get bytes 0xA5.
// - A collective whose block size differs from the class's is a launch error.
// - Float sums: BlockReduce combines in the order of CUB's warp reductions (a pairwise tree in each warp
//   of 32, then warp totals in order); BlockScan combines sequentially in thread order. The results are
//   exact where CUB's are (integers); floats may differ from a GPU's in the last bits.
#pragma once

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "fs_cuda_emu/runtime.h"

namespace cub {

struct NullType {};

enum BlockReduceAlgorithm { BLOCK_REDUCE_RAKING_COMMUTATIVE_ONLY, BLOCK_REDUCE_RAKING, BLOCK_REDUCE_WARP_REDUCTIONS };
enum BlockScanAlgorithm { BLOCK_SCAN_RAKING, BLOCK_SCAN_RAKING_MEMOIZE, BLOCK_SCAN_WARP_SCANS };
enum BlockScatterAlgorithm { BLOCK_SCATTER_DIRECT, BLOCK_SCATTER_WARP_TRANSPOSE };
enum BlockLoadAlgorithm { BLOCK_LOAD_DIRECT, BLOCK_LOAD_WARP_TRANSPOSE };
enum cudaSharedMemConfig { cudaSharedMemBankSizeDefault, cudaSharedMemBankSizeFourByte, cudaSharedMemBankSizeEightByte };

struct Sum {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return a + b;
  }
};
struct Max {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return a < b ? b : a;
  }
};
struct Min {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return b < a ? b : a;
  }
};

namespace emu {

inline int thread_rank() { return ::fs_emu::place().linear; }

template <int kThreads>
void check_block(const char* collective, ::fs_emu::Site site) {
  const dim3& d = ::fs_emu::place().block_dim;
  if (static_cast<int>(d.x * d.y * d.z) != kThreads) {
    ::fs_emu::fail((std::string(collective) + " for " + std::to_string(kThreads) + " threads used by a block of " +
                    std::to_string(d.x * d.y * d.z))
                       .c_str(),
                   site);
  }
}

template <typename T>
void poison(T& value) {
  std::memset(static_cast<void*>(&value), 0xA5, sizeof(T));
}

template <typename T, typename Op>
T fold(const T* values, int count, Op op) {
  T total = values[0];
  for (int i = 1; i < count; ++i) total = op(total, values[i]);
  return total;
}

// Radix order of a key: unsigned as is, signed with the sign bit flipped, floating point by its bits.
template <typename Key>
auto radix_bits(Key key) {
  static_assert(std::is_arithmetic_v<Key>, "BlockRadixSort sorts arithmetic keys");
  using Bits = std::conditional_t<sizeof(Key) == 8, uint64_t, std::conditional_t<sizeof(Key) == 4, uint32_t,
                                  std::conditional_t<sizeof(Key) == 2, uint16_t, uint8_t>>>;
  Bits bits;
  std::memcpy(&bits, &key, sizeof(Key));
  constexpr Bits kHigh = static_cast<Bits>(Bits{1} << (sizeof(Key) * 8 - 1));
  if constexpr (std::is_floating_point_v<Key>) {
    bits = (bits & kHigh) ? static_cast<Bits>(~bits) : static_cast<Bits>(bits | kHigh);
  } else if constexpr (std::is_signed_v<Key>) {
    bits = static_cast<Bits>(bits ^ kHigh);
  }
  return bits;
}

template <typename Op, typename T>
auto flag(Op op, const T& a, const T& b, int b_index) {
  if constexpr (std::is_invocable_v<Op, const T&, const T&, int>) {
    return op(a, b, b_index);
  } else {
    return op(a, b);
  }
}

}  // namespace emu

// ---- BlockReduce ---------------------------------------------------------------------------------------------

template <typename T, int BLOCK_DIM_X, BlockReduceAlgorithm ALGORITHM = BLOCK_REDUCE_WARP_REDUCTIONS,
          int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1, int LEGACY_PTX_ARCH = 0>
class BlockReduce {
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    alignas(T) unsigned char bytes[sizeof(T) * kThreads];
  };

  explicit BlockReduce(TempStorage& storage) : slots_(reinterpret_cast<T*>(storage.bytes)) {}

  template <typename Op>
  T Reduce(T input, Op op, ::fs_emu::Site site = FS_EMU_SITE) {
    return reduce(input, op, kThreads, site);
  }
  template <typename Op>
  T Reduce(T input, Op op, int num_valid, ::fs_emu::Site site = FS_EMU_SITE) {
    return reduce(input, op, num_valid, site);
  }
  template <int N, typename Op>
  T Reduce(T (&inputs)[N], Op op, ::fs_emu::Site site = FS_EMU_SITE) {
    return reduce(emu::fold(inputs, N, op), op, kThreads, site);
  }
  T Sum(T input, ::fs_emu::Site site = FS_EMU_SITE) { return reduce(input, cub::Sum{}, kThreads, site); }
  T Sum(T input, int num_valid, ::fs_emu::Site site = FS_EMU_SITE) { return reduce(input, cub::Sum{}, num_valid, site); }
  template <int N>
  T Sum(T (&inputs)[N], ::fs_emu::Site site = FS_EMU_SITE) {
    return reduce(emu::fold(inputs, N, cub::Sum{}), cub::Sum{}, kThreads, site);
  }

 private:
  template <typename Op>
  T reduce(T input, Op op, int valid, ::fs_emu::Site site) {
    emu::check_block<kThreads>("cub::BlockReduce", site);
    if (valid < 1 || valid > kThreads) ::fs_emu::fail("cub::BlockReduce num_valid out of range", site);
    const int rank = emu::thread_rank();
    if (rank < valid) std::memcpy(static_cast<void*>(&slots_[rank]), &input, sizeof(T));
    ::fs_emu::block_barrier(site);
    T result;
    if (rank != 0) {
      emu::poison(result);
      return result;
    }
    // Each warp: a shuffle-down tree (lane i takes op(own, lane i + offset)); then the warp totals in order.
    std::vector<T> lanes(32);
    for (int warp = 0; warp * 32 < valid; ++warp) {
      const int count = std::min(32, valid - warp * 32);
      for (int i = 0; i < count; ++i) std::memcpy(static_cast<void*>(&lanes[i]), &slots_[warp * 32 + i], sizeof(T));
      for (int offset = 1; offset < count; offset *= 2) {
        for (int i = 0; i + offset < count; i += 2 * offset) lanes[i] = op(lanes[i], lanes[i + offset]);
      }
      result = warp == 0 ? lanes[0] : op(result, lanes[0]);
    }
    return result;
  }

  T* slots_;
};

// ---- BlockScan -----------------------------------------------------------------------------------------------

template <typename T, int BLOCK_DIM_X, BlockScanAlgorithm ALGORITHM = BLOCK_SCAN_RAKING, int BLOCK_DIM_Y = 1,
          int BLOCK_DIM_Z = 1, int LEGACY_PTX_ARCH = 0>
class BlockScan {
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    alignas(T) unsigned char bytes[sizeof(T) * kThreads];
  };

  explicit BlockScan(TempStorage& storage) : slots_(reinterpret_cast<T*>(storage.bytes)) {}

  // -- one item per thread
  void ExclusiveSum(T input, T& output, ::fs_emu::Site site = FS_EMU_SITE) {
    T aggregate;
    ExclusiveSum(input, output, aggregate, site);
  }
  void ExclusiveSum(T input, T& output, T& aggregate, ::fs_emu::Site site = FS_EMU_SITE) {
    T items[1] = {input};
    T outputs[1];
    exclusive(items, outputs, T{}, cub::Sum{}, aggregate, site);
    output = outputs[0];
  }
  void InclusiveSum(T input, T& output, ::fs_emu::Site site = FS_EMU_SITE) {
    T aggregate;
    InclusiveSum(input, output, aggregate, site);
  }
  void InclusiveSum(T input, T& output, T& aggregate, ::fs_emu::Site site = FS_EMU_SITE) {
    T items[1] = {input};
    T outputs[1];
    inclusive(items, outputs, cub::Sum{}, aggregate, site);
    output = outputs[0];
  }
  template <typename Op>
  void InclusiveScan(T input, T& output, Op op, ::fs_emu::Site site = FS_EMU_SITE) {
    T aggregate;
    InclusiveScan(input, output, op, aggregate, site);
  }
  template <typename Op>
  void InclusiveScan(T input, T& output, Op op, T& aggregate, ::fs_emu::Site site = FS_EMU_SITE) {
    T items[1] = {input};
    T outputs[1];
    inclusive(items, outputs, op, aggregate, site);
    output = outputs[0];
  }
  template <typename Op>
  void ExclusiveScan(T input, T& output, T initial, Op op, ::fs_emu::Site site = FS_EMU_SITE) {
    T aggregate;
    ExclusiveScan(input, output, initial, op, aggregate, site);
  }
  template <typename Op>
  void ExclusiveScan(T input, T& output, T initial, Op op, T& aggregate, ::fs_emu::Site site = FS_EMU_SITE) {
    T items[1] = {input};
    T outputs[1];
    exclusive(items, outputs, initial, op, aggregate, site);
    output = outputs[0];
  }

  // -- N items per thread (blocked: thread t holds items t N ... t N + N - 1)
  template <int N>
  void ExclusiveSum(T (&input)[N], T (&output)[N], ::fs_emu::Site site = FS_EMU_SITE) {
    T aggregate;
    exclusive(input, output, T{}, cub::Sum{}, aggregate, site);
  }
  template <int N>
  void ExclusiveSum(T (&input)[N], T (&output)[N], T& aggregate, ::fs_emu::Site site = FS_EMU_SITE) {
    exclusive(input, output, T{}, cub::Sum{}, aggregate, site);
  }
  template <int N>
  void InclusiveSum(T (&input)[N], T (&output)[N], ::fs_emu::Site site = FS_EMU_SITE) {
    T aggregate;
    inclusive(input, output, cub::Sum{}, aggregate, site);
  }
  template <int N>
  void InclusiveSum(T (&input)[N], T (&output)[N], T& aggregate, ::fs_emu::Site site = FS_EMU_SITE) {
    inclusive(input, output, cub::Sum{}, aggregate, site);
  }
  template <int N, typename Op>
  void InclusiveScan(T (&input)[N], T (&output)[N], Op op, ::fs_emu::Site site = FS_EMU_SITE) {
    T aggregate;
    inclusive(input, output, op, aggregate, site);
  }
  template <int N, typename Op>
  void InclusiveScan(T (&input)[N], T (&output)[N], Op op, T& aggregate, ::fs_emu::Site site = FS_EMU_SITE) {
    inclusive(input, output, op, aggregate, site);
  }
  template <int N, typename Op>
  void ExclusiveScan(T (&input)[N], T (&output)[N], T initial, Op op, ::fs_emu::Site site = FS_EMU_SITE) {
    T aggregate;
    exclusive(input, output, initial, op, aggregate, site);
  }

 private:
  // Publishes this thread's partial (the fold of its items) and reads back the fold of the partials of the
  // threads before it (has_prefix false for thread 0) and of all threads.
  template <int N, typename Op>
  bool prefix_of(const T (&input)[N], Op op, T& prefix, T& aggregate, ::fs_emu::Site site) {
    emu::check_block<kThreads>("cub::BlockScan", site);
    const int rank = emu::thread_rank();
    const T partial = emu::fold(input, N, op);
    std::memcpy(static_cast<void*>(&slots_[rank]), &partial, sizeof(T));
    ::fs_emu::block_barrier(site);
    if (rank > 0) prefix = emu::fold(slots_, rank, op);
    aggregate = emu::fold(slots_, kThreads, op);
    return rank > 0;
  }

  template <int N, typename Op>
  void inclusive(const T (&input)[N], T (&output)[N], Op op, T& aggregate, ::fs_emu::Site site) {
    T prefix;
    const bool has_prefix = prefix_of(input, op, prefix, aggregate, site);
    T items[N];
    for (int j = 0; j < N; ++j) items[j] = input[j];  // output may be input
    output[0] = has_prefix ? op(prefix, items[0]) : items[0];
    for (int j = 1; j < N; ++j) output[j] = op(output[j - 1], items[j]);
  }

  template <int N, typename Op>
  void exclusive(const T (&input)[N], T (&output)[N], T initial, Op op, T& aggregate, ::fs_emu::Site site) {
    T prefix;
    const bool has_prefix = prefix_of(input, op, prefix, aggregate, site);
    T items[N];
    for (int j = 0; j < N; ++j) items[j] = input[j];
    output[0] = has_prefix ? op(initial, prefix) : initial;
    for (int j = 1; j < N; ++j) output[j] = op(output[j - 1], items[j - 1]);
  }

  T* slots_;
};

// ---- BlockRadixSort ------------------------------------------------------------------------------------------

template <typename Key, int BLOCK_DIM_X, int ITEMS_PER_THREAD, typename Value = NullType, int RADIX_BITS = 4,
          bool MEMOIZE_OUTER_SCAN = true, BlockScanAlgorithm INNER_SCAN_ALGORITHM = BLOCK_SCAN_WARP_SCANS,
          cudaSharedMemConfig SMEM_CONFIG = cudaSharedMemBankSizeFourByte, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1,
          int LEGACY_PTX_ARCH = 0>
class BlockRadixSort {
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;
  static constexpr int kItems = kThreads * ITEMS_PER_THREAD;
  static constexpr bool kKeysOnly = std::is_same_v<Value, NullType>;
  using Stored = std::conditional_t<kKeysOnly, char, Value>;

 public:
  struct TempStorage {
    alignas(16) unsigned char keys[sizeof(Key) * kItems];
    alignas(16) unsigned char values[sizeof(Stored) * kItems];
  };

  explicit BlockRadixSort(TempStorage& storage) : storage_(storage) {}

  void Sort(Key (&keys)[ITEMS_PER_THREAD], int begin_bit = 0, int end_bit = sizeof(Key) * 8,
            ::fs_emu::Site site = FS_EMU_SITE) {
    Stored none[ITEMS_PER_THREAD] = {};
    sort(keys, none, begin_bit, end_bit, false, site);
  }
  template <typename V = Value, typename = std::enable_if_t<!std::is_same_v<V, NullType>>>
  void Sort(Key (&keys)[ITEMS_PER_THREAD], V (&values)[ITEMS_PER_THREAD], int begin_bit = 0,
            int end_bit = sizeof(Key) * 8, ::fs_emu::Site site = FS_EMU_SITE) {
    sort(keys, values, begin_bit, end_bit, false, site);
  }
  void SortDescending(Key (&keys)[ITEMS_PER_THREAD], int begin_bit = 0, int end_bit = sizeof(Key) * 8,
                      ::fs_emu::Site site = FS_EMU_SITE) {
    Stored none[ITEMS_PER_THREAD] = {};
    sort(keys, none, begin_bit, end_bit, true, site);
  }
  template <typename V = Value, typename = std::enable_if_t<!std::is_same_v<V, NullType>>>
  void SortDescending(Key (&keys)[ITEMS_PER_THREAD], V (&values)[ITEMS_PER_THREAD], int begin_bit = 0,
                      int end_bit = sizeof(Key) * 8, ::fs_emu::Site site = FS_EMU_SITE) {
    sort(keys, values, begin_bit, end_bit, true, site);
  }

 private:
  // Blocked in, blocked out, stable: write every item to TempStorage, one thread sorts, every thread reads
  // back its ranks.
  void sort(Key (&keys)[ITEMS_PER_THREAD], Stored (&values)[ITEMS_PER_THREAD], int begin_bit, int end_bit,
            bool descending, ::fs_emu::Site site) {
    emu::check_block<kThreads>("cub::BlockRadixSort", site);
    if (begin_bit < 0 || end_bit > static_cast<int>(sizeof(Key) * 8) || begin_bit > end_bit) {
      ::fs_emu::fail("cub::BlockRadixSort bit range out of range", site);
    }
    Key* all_keys = reinterpret_cast<Key*>(storage_.keys);
    Stored* all_values = reinterpret_cast<Stored*>(storage_.values);
    const int rank = emu::thread_rank();
    for (int j = 0; j < ITEMS_PER_THREAD; ++j) {
      all_keys[rank * ITEMS_PER_THREAD + j] = keys[j];
      all_values[rank * ITEMS_PER_THREAD + j] = values[j];
    }
    ::fs_emu::block_barrier(site);
    if (rank == 0) {
      using Bits = decltype(emu::radix_bits(Key{}));
      const int width = end_bit - begin_bit;
      const Bits field = width >= static_cast<int>(sizeof(Bits) * 8) ? static_cast<Bits>(~Bits{0})
                                                                     : static_cast<Bits>((Bits{1} << width) - 1);
      std::vector<int> order(kItems);
      std::iota(order.begin(), order.end(), 0);
      const auto digit = [&](int i) { return static_cast<Bits>((emu::radix_bits(all_keys[i]) >> begin_bit) & field); };
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return descending ? digit(b) < digit(a) : digit(a) < digit(b); });
      std::vector<Key> sorted_keys(kItems);
      std::vector<Stored> sorted_values(kItems);
      for (int i = 0; i < kItems; ++i) {
        sorted_keys[i] = all_keys[order[i]];
        sorted_values[i] = all_values[order[i]];
      }
      std::copy(sorted_keys.begin(), sorted_keys.end(), all_keys);
      std::copy(sorted_values.begin(), sorted_values.end(), all_values);
    }
    ::fs_emu::block_barrier(site);
    for (int j = 0; j < ITEMS_PER_THREAD; ++j) {
      keys[j] = all_keys[rank * ITEMS_PER_THREAD + j];
      values[j] = all_values[rank * ITEMS_PER_THREAD + j];
    }
  }

  TempStorage& storage_;
};

// ---- BlockDiscontinuity --------------------------------------------------------------------------------------

template <typename T, int BLOCK_DIM_X, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1, int LEGACY_PTX_ARCH = 0>
class BlockDiscontinuity {
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    alignas(T) unsigned char first[sizeof(T) * kThreads];
    alignas(T) unsigned char last[sizeof(T) * kThreads];
  };

  explicit BlockDiscontinuity(TempStorage& storage) : storage_(storage) {}

  template <int N, typename Flag, typename Op>
  void FlagHeads(Flag (&heads)[N], T (&input)[N], Op op, ::fs_emu::Site site = FS_EMU_SITE) {
    Flag tails[N];
    flags(&heads, &tails, input, op, true, false, site);
  }
  template <int N, typename Flag, typename Op>
  void FlagTails(Flag (&tails)[N], T (&input)[N], Op op, ::fs_emu::Site site = FS_EMU_SITE) {
    Flag heads[N];
    flags(&heads, &tails, input, op, false, true, site);
  }
  template <int N, typename Flag, typename Op>
  void FlagHeadsAndTails(Flag (&heads)[N], Flag (&tails)[N], T (&input)[N], Op op, ::fs_emu::Site site = FS_EMU_SITE) {
    flags(&heads, &tails, input, op, true, true, site);
  }

 private:
  template <int N, typename Flag, typename Op>
  void flags(Flag (*heads)[N], Flag (*tails)[N], T (&input)[N], Op op, bool want_heads, bool want_tails,
             ::fs_emu::Site site) {
    emu::check_block<kThreads>("cub::BlockDiscontinuity", site);
    T* first = reinterpret_cast<T*>(storage_.first);
    T* last = reinterpret_cast<T*>(storage_.last);
    const int rank = emu::thread_rank();
    first[rank] = input[0];
    last[rank] = input[N - 1];
    ::fs_emu::block_barrier(site);
    const int base = rank * N;
    if (want_heads) {
      (*heads)[0] = rank == 0 ? Flag(1) : static_cast<Flag>(emu::flag(op, last[rank - 1], input[0], base));
      for (int j = 1; j < N; ++j) (*heads)[j] = static_cast<Flag>(emu::flag(op, input[j - 1], input[j], base + j));
    }
    if (want_tails) {
      (*tails)[N - 1] =
          rank == kThreads - 1 ? Flag(1) : static_cast<Flag>(emu::flag(op, input[N - 1], first[rank + 1], base + N));
      for (int j = 0; j + 1 < N; ++j) (*tails)[j] = static_cast<Flag>(emu::flag(op, input[j], input[j + 1], base + j + 1));
    }
  }

  TempStorage& storage_;
};

}  // namespace cub
