// CPU kernels of the scoring ops: PRM step scores from the hidden states at the step-tag rows (no vocabulary
// logits), their aggregation per candidate, the two fused, cosine scores and verifier ensembles.
// Semantics: csrc/README.md ("Scoring ops"); oracle: fastsearch/ops/score.py.
//
// The PRM head is a gather of S hidden rows and C <= 8 dot products per row, memory-bound on the rows: each
// row is read once for all C head rows (C fp32 accumulators, vectorised along H). The work items are (step,
// chunk of kHiddenChunk columns) pairs, so that a few long rows still spread over the threads; a step's
// chunk partials are summed in chunk order by whichever thread finishes the step, so results do not depend
// on the thread count. Sums over steps and group members run in fp64, rounded once to fp32.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/score_checks.h"
#include "cpu/groups.h"
#include "cpu/tensor_args.h"
#include "cpu/vec_stream.h"

namespace fastsearch::cpu {
namespace {

using at::vec::fmadd;

constexpr float kInfinity = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// As LOGIT_CLIP and NORM_EPS in fastsearch/ops/score.py.
constexpr float kLogitClip = 1e-7f;
constexpr float kNormEps = 1e-12f;

// Columns of a hidden row per work item: 4 KiB of fp32, so that a step of a large H splits into several items.
constexpr int64_t kHiddenChunk = 1024;
// About what a step score costs (chunk sums and a softmax over a few logits), in nanoseconds on one core.
constexpr double kStepScoreNanoseconds = 10.0;

at::Tensor empty_float(int64_t size) { return empty_output({size}, at::kFloat); }

float sum_lanes(const FloatVec& values) {
  return at::vec::vec_reduce_all<float>([](const FloatVec& a, const FloatVec& b) { return a + b; }, values);
}

// -- spans: candidates' steps, groups' members (groups.h's Groups) -------------------------------------

// The spans of CSR `offsets` (contiguous), which must outlive them.
Groups ragged_spans(const at::Tensor& offsets, int64_t total) {
  return Groups{offsets.const_data_ptr<int64_t>(), offsets.numel() - 1, 0, total};
}

// -- aggregation -----------------------------------------------------------------------------------------

// sum of log(q) - log1p(-q), q = x clamped to [kLogitClip, 1 - kLogitClip] (NaN passes through), each term
// in fp32 and the sum in fp64, over x[0, size) read as fp32.
template <typename scalar_t>
float logit_sum(const scalar_t* x, int64_t size) {
  // kBlock terms at a time with at::vec's log and log1p, summed lane by lane in fp64, then across lanes.
  const FloatVec low_clip(kLogitClip), high_clip(1.0f - kLogitClip);
  const auto terms_of = [&](const FloatVec& values) {
    const FloatVec q = at::vec::minimum(at::vec::maximum(values, low_clip), high_clip);
    return q.log() - (-q).log1p();
  };
  std::array<double, kBlock> lanes{};
  alignas(64) float terms[kBlock];
  const auto add_block = [&](int64_t start, int64_t count) {
    FloatVec low, high;
    if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t j = 0; j < kBlock; ++j) terms[j] = j < count ? static_cast<float>(x[start + j]) : 0.0f;
      std::tie(low, high) = load_block(terms);
    } else {
      std::tie(low, high) = load_block(x + start, count);
    }
    terms_of(low).store(terms);
    terms_of(high).store(terms + FloatVec::size());
    for (int64_t j = 0; j < count; ++j) lanes[j] += terms[j];  // a tail's padding lanes stay out
  };
  int64_t start = 0;
  for (; start + kBlock <= size; start += kBlock) add_block(start, kBlock);
  if (start < size) add_block(start, size - start);
  double sum = 0.0;
  for (const double lane : lanes) sum += lane;
  return static_cast<float>(sum);
}

// A candidate's score from its `size` step scores x[0, size), read as fp32, as aggregate_steps defines it; a
// NaN step makes every aggregation NaN.
template <typename scalar_t>
float aggregate(const scalar_t* x, int64_t size, int64_t how, float empty) {
  if (size == 0) return empty;
  const auto value_at = [x](int64_t i) { return static_cast<float>(x[i]); };
  switch (how) {
    case 0:  // last
      return value_at(size - 1);
    case 1:    // min
    case 4: {  // max
      bool nan = false;
      float best = value_at(0);
      for (int64_t i = 0; i < size; ++i) {
        const float value = value_at(i);
        nan = nan || std::isnan(value);
        best = how == 1 ? std::min(best, value) : std::max(best, value);
      }
      return nan ? kNaN : best;
    }
    case 2: {  // prod
      double product = 1.0;
      for (int64_t i = 0; i < size; ++i) product *= value_at(i);
      return static_cast<float>(product);
    }
    case 3: {  // mean
      double sum = 0.0;
      for (int64_t i = 0; i < size; ++i) sum += value_at(i);
      return static_cast<float>(sum) / static_cast<float>(size);
    }
    default:  // logit_sum
      return logit_sum(x, size);
  }
}

// About what aggregate costs per step and per candidate: logit_sum takes a log and a log1p per step, on
// whole vectors; the others a compare or an add.
GroupCost aggregation_cost(int64_t how) { return how == 5 ? GroupCost{3.0, 50.0} : GroupCost{0.5, 3.0}; }

// -- PRM head --------------------------------------------------------------------------------------------

// The head in fp32: C rows of H columns (converted once per call when the data is fp16 / bf16) and C biases
// (zeros without a bias).
struct Head {
  const float* weight;
  int64_t rows;
  int64_t hidden;
  std::array<float, kMaxHeadRows> bias;
};

// `storage` must outlive the head: it holds the fp32 rows when the weight is not fp32 and contiguous.
Head fp32_head(const at::Tensor& head_weight, const std::optional<at::Tensor>& head_bias, at::Tensor& storage) {
  Head head{nullptr, head_weight.size(0), head_weight.size(1), {}};
  const Contiguous weight = head_weight.expect_contiguous();
  AT_DISPATCH_V2(weight->scalar_type(), "prm_head", AT_WRAP([&] {
    const scalar_t* data = weight->const_data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, float>) {
      storage = *weight;  // keeps a contiguous copy alive
      head.weight = storage.const_data_ptr<float>();
    } else {
      storage = empty_float(weight->numel());
      float* converted = storage.mutable_data_ptr<float>();
      const int64_t numel = weight->numel();
      for (int64_t start = 0; start < numel; start += kBlock) {
        const int64_t count = std::min(kBlock, numel - start);
        const auto [low, high] = load_block(data + start, count);
        store_block(converted + start, low, high, count);
      }
      head.weight = converted;
    }
    if (head_bias.has_value()) {
      const Contiguous bias = head_bias->expect_contiguous();
      const scalar_t* bias_data = bias->const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < head.rows; ++c) head.bias[c] = static_cast<float>(bias_data[c]);
    }
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return head;
}

// partial[c] = sum over i in [begin, end) of row[i] * weight[c][i], for the kRows head rows: the row is read
// once, kBlock columns at a time, into fp32 accumulators. Meanwhile the next item's next_count columns at
// next_row are prefetched: rows lie anywhere, so the hardware prefetcher finds them only after a few misses.
template <int kRows, typename scalar_t>
void partial_logits(const scalar_t* row, const float* weight, int64_t hidden, int64_t begin, int64_t end,
                    const scalar_t* next_row, int64_t next_count, float* partial) {
  // Two accumulators per head row while 2 C of them fit in the 16 vector registers beside the loads, so that
  // enough independent FMA chains are in flight; one per row above that.
  constexpr int kPerRow = kRows <= 4 ? 2 : 1;
  std::array<FloatVec, kRows * kPerRow> acc;
  acc.fill(FloatVec(0.0f));
  const auto block = [&](int64_t start, int64_t count) {
    const auto [row_low, row_high] = load_block(row + start, count);
    for (int c = 0; c < kRows; ++c) {
      const auto [w_low, w_high] = load_block(weight + c * hidden + start, count);
      if constexpr (kPerRow == 2) {
        acc[2 * c] = fmadd(row_low, w_low, acc[2 * c]);
        acc[2 * c + 1] = fmadd(row_high, w_high, acc[2 * c + 1]);
      } else {
        acc[c] = fmadd(row_high, w_high, fmadd(row_low, w_low, acc[c]));
      }
    }
  };
  int64_t start = begin;
  for (; start + kBlock <= end; start += kBlock) {
    __builtin_prefetch(next_row + std::min(start - begin, next_count - 1));
    block(start, kBlock);
  }
  if (start < end) block(start, end - start);
  for (int c = 0; c < kRows; ++c) {
    partial[c] = sum_lanes(kPerRow == 2 ? acc[2 * c] + acc[2 * c + 1] : acc[c]);
  }
}

// Chunk partials of every step's logits: partials[(s chunks + k) C + c] for step s, chunk k, head row c.
template <int kRows, typename scalar_t>
void head_partials(const scalar_t* hidden_data, int64_t row_stride, const int64_t* positions, int64_t num_steps,
                   const Head& head, int64_t chunks, float* partials) {
  const int64_t items = num_steps * chunks;
  const int64_t item_columns = std::max<int64_t>(1, std::min(head.hidden, kHiddenChunk));
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (item_columns * kRows));
  at::parallel_for(0, items, grain, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t step = item / chunks;
      const int64_t begin = (item - step * chunks) * kHiddenChunk;
      const int64_t next = std::min(item + 1, items - 1);
      const int64_t next_step = next / chunks;
      const int64_t next_begin = (next - next_step * chunks) * kHiddenChunk;
      partial_logits<kRows>(hidden_data + positions[step] * row_stride, head.weight, head.hidden, begin,
                            std::min(head.hidden, begin + kHiddenChunk),
                            hidden_data + positions[next_step] * row_stride + next_begin,
                            std::min(kHiddenChunk, head.hidden - next_begin), partials + item * kRows);
    }
  });
}

// What the step kernels need besides the head: the activation and the chunk partials.
struct StepLogits {
  const float* partials;
  int64_t chunks;
  int64_t positive_index;
  int64_t activation;
};

// The score of `step`: its logits (chunk partials summed in chunk order, plus the bias), then the softmax
// entry or the sigmoid of the positive row.
float step_score(const Head& head, const StepLogits& logits, int64_t step) {
  const int64_t rows = head.rows;
  std::array<float, kMaxHeadRows> l{};
  const float* partial = logits.partials + step * logits.chunks * rows;
  for (int64_t k = 0; k < logits.chunks; ++k) {
    for (int64_t c = 0; c < rows; ++c) l[c] += partial[k * rows + c];
  }
  for (int64_t c = 0; c < rows; ++c) l[c] += head.bias[c];
  if (logits.activation == 1) return 1.0f / (1.0f + std::exp(-l[logits.positive_index]));
  // Softmax; a NaN logit leaves the maximum alone but makes the sum, and so the score, NaN.
  float top = l[0];
  for (int64_t c = 1; c < rows; ++c) top = std::max(top, l[c]);
  float sum = 0.0f;
  for (int64_t c = 0; c < rows; ++c) sum += std::exp(l[c] - top);
  return std::exp(l[logits.positive_index] - top) / sum;
}

// Checked hidden states with contiguous columns: borrowed whatever the row stride (a slice of a wider tensor
// reads in place), else a contiguous copy.
Contiguous row_major(const at::Tensor& hidden_states) {
  if (hidden_states.size(1) <= 1 || hidden_states.stride(1) == 1) return Contiguous::borrowed(hidden_states);
  return Contiguous::owned(hidden_states.contiguous());
}

// The chunk partials of every step (see head_partials), in `storage`; returns what step_score needs.
StepLogits prm_logits(const at::Tensor& hidden_states, const at::Tensor& step_positions, const Head& head,
                      int64_t positive_index, int64_t activation, at::Tensor& storage) {
  const Contiguous rows = row_major(hidden_states);
  const Contiguous positions = step_positions.expect_contiguous();
  const int64_t num_steps = positions->numel();
  const int64_t chunks = (head.hidden + kHiddenChunk - 1) / kHiddenChunk;
  storage = empty_float(num_steps * chunks * head.rows);
  float* partials = storage.mutable_data_ptr<float>();
  const int64_t row_stride = rows->stride(0);
  AT_DISPATCH_V2(rows->scalar_type(), "prm_logits", AT_WRAP([&] {
    const scalar_t* data = rows->const_data_ptr<scalar_t>();
    const int64_t* position_data = positions->const_data_ptr<int64_t>();
    const auto run = [&](auto num_rows) {
      head_partials<decltype(num_rows)::value>(data, row_stride, position_data, num_steps, head, chunks, partials);
    };
    switch (head.rows) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 5: run(std::integral_constant<int, 5>{}); break;
      case 6: run(std::integral_constant<int, 6>{}); break;
      case 7: run(std::integral_constant<int, 7>{}); break;
      default: run(std::integral_constant<int, 8>{}); break;
    }
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return StepLogits{partials, chunks, positive_index, activation};
}

at::Tensor prm_step_scores(const at::Tensor& hidden_states, const at::Tensor& step_positions,
                           const at::Tensor& head_weight, const std::optional<at::Tensor>& head_bias,
                           int64_t positive_index, int64_t activation) {
  check_prm_step_scores_args(hidden_states, step_positions, head_weight, head_bias, positive_index, activation);
  at::Tensor head_storage, partial_storage;
  const Head head = fp32_head(head_weight, head_bias, head_storage);
  const StepLogits logits = prm_logits(hidden_states, step_positions, head, positive_index, activation,
                                       partial_storage);
  const int64_t num_steps = step_positions.numel();
  at::Tensor scores = empty_float(num_steps);
  float* scores_out = scores.mutable_data_ptr<float>();
  const int64_t grain = static_cast<int64_t>(kGrainNanoseconds / kStepScoreNanoseconds);
  at::parallel_for(0, num_steps, grain, [&](int64_t first, int64_t last) {
    for (int64_t step = first; step < last; ++step) scores_out[step] = step_score(head, logits, step);
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor> prm_scores(const at::Tensor& hidden_states, const at::Tensor& step_positions,
                                              const at::Tensor& step_offsets, const at::Tensor& head_weight,
                                              const std::optional<at::Tensor>& head_bias, int64_t positive_index,
                                              int64_t activation, int64_t how, std::optional<double> empty) {
  check_prm_scores_args(hidden_states, step_positions, step_offsets, head_weight, head_bias, positive_index,
                        activation, how, empty);
  at::Tensor head_storage, partial_storage;
  const Head head = fp32_head(head_weight, head_bias, head_storage);
  const StepLogits logits = prm_logits(hidden_states, step_positions, head, positive_index, activation,
                                       partial_storage);
  const Contiguous offsets = step_offsets.expect_contiguous();
  const Groups candidates = ragged_spans(*offsets, step_positions.numel());
  at::Tensor step_scores = empty_float(candidates.total);
  at::Tensor candidate_scores = empty_float(candidates.count);
  float* steps_out = step_scores.mutable_data_ptr<float>();
  float* candidates_out = candidate_scores.mutable_data_ptr<float>();
  const float empty_score = empty.has_value() ? static_cast<float>(*empty) : kNaN;
  // Each candidate finishes its own steps, then aggregates them while they are in cache.
  const GroupCost aggregation = aggregation_cost(how);
  const GroupCost cost{kStepScoreNanoseconds + aggregation.per_candidate, aggregation.per_group};
  for_each_group(candidates, cost, [&](int64_t candidate, int64_t begin, int64_t size) {
    for (int64_t step = begin; step < begin + size; ++step) steps_out[step] = step_score(head, logits, step);
    candidates_out[candidate] = aggregate(steps_out + begin, size, how, empty_score);
  });
  return {candidate_scores, step_scores};
}

// -- aggregate_steps -------------------------------------------------------------------------------------

at::Tensor aggregate_steps(const at::Tensor& step_scores, const std::optional<at::Tensor>& step_offsets, int64_t how,
                           std::optional<double> empty) {
  check_aggregate_steps_args(step_scores, step_offsets, how, empty);
  const Contiguous scores = step_scores.expect_contiguous();
  const Contiguous offsets = contiguous_or_none(step_offsets);
  const Groups candidates = offsets->defined() ? ragged_spans(*offsets, scores->numel())
                                              : Groups{nullptr, scores->size(0), scores->size(1), scores->numel()};
  at::Tensor out = empty_float(candidates.count);
  float* out_data = out.mutable_data_ptr<float>();
  const float empty_score = empty.has_value() ? static_cast<float>(*empty) : kNaN;
  AT_DISPATCH_V2(scores->scalar_type(), "aggregate_steps", AT_WRAP([&] {
    const scalar_t* data = scores->const_data_ptr<scalar_t>();
    for_each_group(candidates, aggregation_cost(how), [&](int64_t candidate, int64_t begin, int64_t size) {
      out_data[candidate] = aggregate(data + begin, size, how, empty_score);
    });
  }), at::kFloat, at::kDouble, at::kHalf, at::kBFloat16);
  return out;
}

// -- cosine_scores ---------------------------------------------------------------------------------------

// <e, r> / (max(|e|, eps) max(|r|, eps)), the three sums in fp32 over one pass.
template <typename scalar_t>
float cosine(const scalar_t* embedding, const scalar_t* reference, int64_t dim) {
  FloatVec dot_low(0.0f), dot_high(0.0f), ee_low(0.0f), ee_high(0.0f), rr_low(0.0f), rr_high(0.0f);
  const auto block = [&](int64_t start, int64_t count) {
    const auto [e_low, e_high] = load_block(embedding + start, count);
    const auto [r_low, r_high] = load_block(reference + start, count);
    dot_low = fmadd(e_low, r_low, dot_low);
    dot_high = fmadd(e_high, r_high, dot_high);
    ee_low = fmadd(e_low, e_low, ee_low);
    ee_high = fmadd(e_high, e_high, ee_high);
    rr_low = fmadd(r_low, r_low, rr_low);
    rr_high = fmadd(r_high, r_high, rr_high);
  };
  int64_t start = 0;
  for (; start + kBlock <= dim; start += kBlock) block(start, kBlock);
  if (start < dim) block(start, dim - start);
  // Written with comparisons so that a NaN norm passes through the clamp.
  const auto clamped_norm = [](float squares) {
    const float norm = std::sqrt(squares);
    return norm < kNormEps ? kNormEps : norm;
  };
  return sum_lanes(dot_low + dot_high) / (clamped_norm(sum_lanes(ee_low + ee_high)) *
                                          clamped_norm(sum_lanes(rr_low + rr_high)));
}

at::Tensor cosine_scores(const at::Tensor& embeddings, const at::Tensor& references,
                         const std::optional<at::Tensor>& offsets) {
  check_cosine_scores_args(embeddings, references, offsets);
  const Contiguous rows = embeddings.expect_contiguous();
  const Contiguous refs = references.expect_contiguous();
  const Contiguous bounds = contiguous_or_none(offsets);
  const int64_t num = rows->size(0);
  const int64_t dim = rows->size(1);
  at::Tensor out = empty_float(num);
  float* out_data = out.mutable_data_ptr<float>();
  // Without offsets, row n's reference is row n * per_row of `references`: n for [N, D], 0 for one [D].
  const int64_t per_row = refs->dim() == 2 && !bounds->defined() ? 1 : 0;
  AT_DISPATCH_V2(rows->scalar_type(), "cosine_scores", AT_WRAP([&] {
    const scalar_t* row_data = rows->const_data_ptr<scalar_t>();
    const scalar_t* ref_data = refs->const_data_ptr<scalar_t>();
    if (bounds->defined()) {
      const Groups groups = ragged_spans(*bounds, num);
      // A row costs three fused multiply-adds per column.
      const GroupCost cost{0.15 * static_cast<double>(dim) + 5.0, 10.0};
      for_each_group(groups, cost, [&](int64_t group, int64_t begin, int64_t size) {
        for (int64_t n = begin; n < begin + size; ++n) {
          out_data[n] = cosine(row_data + n * dim, ref_data + group * dim, dim);
        }
      });
      return;
    }
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, dim));
    at::parallel_for(0, num, grain, [&](int64_t first, int64_t last) {
      for (int64_t n = first; n < last; ++n) {
        out_data[n] = cosine(row_data + n * dim, ref_data + n * per_row * dim, dim);
      }
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

// -- ensemble_scores -------------------------------------------------------------------------------------

// A score's rank key: ascending in value, -0.0 equal to +0.0, and every NaN equal to the others and below
// -inf (whose key is 0x007FFFFF).
uint32_t rank_key(float value) {
  if (std::isnan(value)) return 0;
  const uint32_t bits = c10::bit_cast<uint32_t>(value + 0.0f);  // + 0 turns -0.0 into +0.0
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

struct EnsembleScratch {
  std::vector<float> values;    // one verifier's scores of the group, as fp32
  std::vector<float> scores;    // that verifier's per-member score (rank or z)
  std::vector<uint64_t> codes;  // rank key above member index, for the rank sort
};

// Rank codes hold a member's index within its group in 32 bits.
constexpr int64_t kMaxRankedGroup = int64_t{1} << 32;

// Mean ranks of x[0, size): 1 + (members below) + (members equal - 1) / 2, NaN below every number.
void mean_ranks(const float* x, int64_t size, EnsembleScratch& s, float* ranks) {
  TORCH_CHECK_VALUE(size < kMaxRankedGroup, "method='rank' needs groups of fewer than 2^32 candidates, got ", size);
  if (static_cast<int64_t>(s.codes.size()) < size) s.codes.resize(size);
  uint64_t* codes = s.codes.data();
  for (int64_t i = 0; i < size; ++i) {
    codes[i] = (static_cast<uint64_t>(rank_key(x[i])) << 32) | static_cast<uint64_t>(i);
  }
  std::sort(codes, codes + size);
  for (int64_t first = 0; first < size;) {
    const uint64_t key = codes[first] >> 32;
    int64_t last = first + 1;
    while (last < size && codes[last] >> 32 == key) ++last;
    // Integers below 2^24 are exact in fp32, as in the reference's float arithmetic.
    const float rank = static_cast<float>(1 + first) + static_cast<float>(last - first - 1) / 2.0f;
    for (int64_t j = first; j < last; ++j) ranks[static_cast<uint32_t>(codes[j])] = rank;
    first = last;
  }
}

// z-scores of x[0, size) over its finite members (population std, z = 0 when it is 0); +inf stays +inf,
// -inf and NaN score -inf. Mean, deviations, std and z in fp64, z rounded once to fp32, as the reference
// computes them: an fp32 mean of close scores (1e4 and 1e4 + 1 ulp) would round onto one of them.
void z_scores(const float* x, int64_t size, float* z) {
  int64_t count = 0;
  double sum = 0.0;
  for (int64_t i = 0; i < size; ++i) {
    if (std::isfinite(x[i])) {
      ++count;
      sum += x[i];
    }
  }
  const double divisor = static_cast<double>(std::max<int64_t>(count, 1));
  const double mean = sum / divisor;
  double squares = 0.0;
  for (int64_t i = 0; i < size; ++i) {
    if (std::isfinite(x[i])) {
      const double deviation = static_cast<double>(x[i]) - mean;
      squares += deviation * deviation;
    }
  }
  const double std_dev = std::sqrt(squares / divisor);
  for (int64_t i = 0; i < size; ++i) {
    if (std::isnan(x[i]) || x[i] == -kInfinity) {
      z[i] = -kInfinity;
    } else if (x[i] == kInfinity) {
      z[i] = kInfinity;
    } else {
      z[i] = std_dev > 0.0 ? static_cast<float>((static_cast<double>(x[i]) - mean) / std_dev) : 0.0f;
    }
  }
}

at::Tensor ensemble_scores(const at::Tensor& scores, const std::optional<at::Tensor>& offsets, int64_t how,
                           const std::optional<at::Tensor>& weights) {
  check_ensemble_scores_args(scores, offsets, how, weights);
  const Contiguous values = scores.expect_contiguous();
  const Contiguous bounds = contiguous_or_none(offsets);
  const int64_t num_verifiers = values->size(0);
  const int64_t num = values->size(1);
  const Groups groups = bounds->defined() ? ragged_spans(*bounds, num) : Groups{nullptr, 1, num, num};
  // Weights as fp32; verifiers of weight 0 are left out, the others' weights summed in order.
  std::vector<float> verifier_weights(num_verifiers, 1.0f);
  if (weights.has_value()) {
    const Contiguous w = weights->expect_contiguous();
    std::copy_n(w->const_data_ptr<float>(), num_verifiers, verifier_weights.begin());
  }
  float weight_sum = 0.0f;
  for (const float w : verifier_weights) weight_sum += w != 0.0f ? w : 0.0f;
  at::Tensor out = empty_float(num);
  float* out_data = out.mutable_data_ptr<float>();

  AT_DISPATCH_V2(values->scalar_type(), "ensemble_scores", AT_WRAP([&] {
    const scalar_t* data = values->const_data_ptr<scalar_t>();
    // A member costs, per verifier, its share of a sort (rank) or of three passes (zscore).
    const GroupCost cost{static_cast<double>(num_verifiers) * (how == 0 ? 25.0 : 4.0), 50.0};
    for_each_group(groups, cost, [&](int64_t, int64_t begin, int64_t size) {
      thread_local EnsembleScratch s;
      if (static_cast<int64_t>(s.values.size()) < size) {
        s.values.resize(size);
        s.scores.resize(size);
      }
      float* combined = out_data + begin;
      std::fill_n(combined, size, 0.0f);
      for (int64_t v = 0; v < num_verifiers; ++v) {
        const float w = verifier_weights[v];
        if (w == 0.0f) continue;
        const scalar_t* row = data + v * num + begin;
        for (int64_t i = 0; i < size; ++i) s.values[i] = static_cast<float>(row[i]);
        if (how == 0) {
          mean_ranks(s.values.data(), size, s, s.scores.data());
        } else {
          z_scores(s.values.data(), size, s.scores.data());
        }
        for (int64_t i = 0; i < size; ++i) combined[i] += w * s.scores[i];
      }
      for (int64_t i = 0; i < size; ++i) combined[i] /= weight_sum;
    });
  }), at::kFloat, at::kDouble, at::kHalf, at::kBFloat16);
  return out;
}

}  // namespace
}  // namespace fastsearch::cpu

TORCH_LIBRARY_IMPL(fastsearch, CPU, m) {
  m.impl("prm_step_scores", &fastsearch::cpu::prm_step_scores);
  m.impl("aggregate_steps", &fastsearch::cpu::aggregate_steps);
  m.impl("prm_scores", &fastsearch::cpu::prm_scores);
  m.impl("cosine_scores", &fastsearch::cpu::cosine_scores);
  m.impl("ensemble_scores", &fastsearch::cpu::ensemble_scores);
}
