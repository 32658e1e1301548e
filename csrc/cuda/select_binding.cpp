// CUDA implementations of the selection ops (schemas: fastsearch/ops/select.py): argument checks,
// contiguous inputs, outputs, stream and device, then the launchers of select.cu. One kernel launch per
// op; resample then reads back the kernel's data checks (one sync), as csrc/README.md allows.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/select_checks.h"
#include "cuda/select_launchers.h"

namespace fastsearch {
namespace {

constexpr int64_t kMaxCount = std::numeric_limits<int32_t>::max();

// The launchers' type code of a tensor that check_scores accepted.
gpu::ScoreType score_type_of(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kHalf:
      return gpu::ScoreType::kFloat16;
    case at::kBFloat16:
      return gpu::ScoreType::kBFloat16;
    case at::kDouble:
      return gpu::ScoreType::kFloat64;
    default:
      return gpu::ScoreType::kFloat32;
  }
}

// The launchers' type code of lengths that check_beam_prune_args accepted.
gpu::LengthType length_type_of(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kInt:
      return gpu::LengthType::kInt32;
    case at::kShort:
      return gpu::LengthType::kInt16;
    case at::kChar:
      return gpu::LengthType::kInt8;
    case at::kByte:
      return gpu::LengthType::kUInt8;
    case at::kFloat:
      return gpu::LengthType::kFloat32;
    case at::kDouble:
      return gpu::LengthType::kFloat64;
    default:
      return gpu::LengthType::kInt64;
  }
}

// The data of an optional tensor, or nullptr. `contiguous` must outlive the launch: it holds the values
// when the tensor was not contiguous.
template <typename T>
const T* optional_data(const std::optional<at::Tensor>& tensor, at::Tensor& contiguous) {
  if (!tensor.has_value()) return nullptr;
  contiguous = tensor->contiguous();
  if constexpr (std::is_void_v<T>) {
    return contiguous.const_data_ptr();
  } else {
    return contiguous.const_data_ptr<T>();
  }
}

// The kernels' view of checked groups over contiguous `values`; `offsets_storage` must outlive the launch.
gpu::GroupLayout group_layout(const at::Tensor& values, const std::optional<at::Tensor>& offsets,
                              at::Tensor& offsets_storage) {
  gpu::GroupLayout layout{nullptr, 0, 0, values.numel()};
  if (offsets.has_value()) {
    layout.offsets = optional_data<int64_t>(offsets, offsets_storage);
    layout.groups = offsets->numel() - 1;
  } else {
    layout.groups = values.size(0);
    layout.group_size = values.size(1);
    TORCH_CHECK_VALUE(layout.group_size <= kMaxCount, "groups must hold fewer than 2^31 candidates, got ",
                      layout.group_size);
  }
  TORCH_CHECK_VALUE(layout.groups <= kMaxCount, "the CUDA kernels take fewer than 2^31 groups, got ",
                    layout.groups);
  return layout;
}

std::tuple<at::Tensor, at::Tensor> segmented_topk_cuda(const at::Tensor& scores,
                                                       const std::optional<at::Tensor>& offsets,
                                                       const std::optional<at::Tensor>& mask, int64_t k,
                                                       bool largest) {
  check_segmented_topk_args(scores, offsets, mask, k);
  const c10::cuda::CUDAGuard device_guard(scores.device());
  const at::Tensor x = scores.contiguous();
  at::Tensor offsets_storage, mask_storage;
  const gpu::GroupLayout layout = group_layout(x, offsets, offsets_storage);
  at::Tensor values = at::empty({layout.groups, k}, x.options());
  at::Tensor indices = at::empty({layout.groups, k}, x.options().dtype(at::kLong));
  gpu::launch_segmented_topk(score_type_of(x), x.const_data_ptr(), optional_data<bool>(mask, mask_storage), layout,
                             k, largest, values.mutable_data_ptr(), indices.mutable_data_ptr<int64_t>(),
                             c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> beam_prune_cuda(
    const at::Tensor& scores, const std::optional<at::Tensor>& offsets, int64_t k,
    const std::optional<at::Tensor>& finished, const std::optional<at::Tensor>& lengths, double length_penalty,
    const std::optional<at::Tensor>& dedup_keys, int64_t refill_to) {
  check_beam_prune_args(scores, offsets, k, finished, lengths, length_penalty, dedup_keys, refill_to);
  const c10::cuda::CUDAGuard device_guard(scores.device());
  const at::Tensor x = scores.contiguous();
  at::Tensor offsets_storage, finished_storage, lengths_storage, dedup_storage;
  const gpu::GroupLayout layout = group_layout(x, offsets, offsets_storage);
  const gpu::LengthType length_type = lengths.has_value() ? length_type_of(*lengths) : gpu::LengthType::kFloat32;
  at::Tensor indices = at::empty({layout.groups, k}, x.options().dtype(at::kLong));
  at::Tensor values = at::empty({layout.groups, k}, x.options().dtype(at::kFloat));
  at::Tensor counts = at::empty({layout.groups}, x.options().dtype(at::kLong));
  at::Tensor parents = at::empty({layout.groups, refill_to}, x.options().dtype(at::kLong));
  gpu::launch_beam_prune(score_type_of(x), x.const_data_ptr(), layout, k,
                         optional_data<bool>(finished, finished_storage), length_type,
                         optional_data<void>(lengths, lengths_storage), length_penalty,
                         optional_data<int64_t>(dedup_keys, dedup_storage), refill_to,
                         indices.mutable_data_ptr<int64_t>(), values.mutable_data_ptr<float>(),
                         counts.mutable_data_ptr<int64_t>(), parents.mutable_data_ptr<int64_t>(),
                         c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {indices, values, counts, parents};
}

at::Tensor resample_cuda(const at::Tensor& log_weights, const std::optional<at::Tensor>& offsets, int64_t num_samples,
                         int64_t method, int64_t seed) {
  check_resample_args(log_weights, offsets, num_samples, method);
  const c10::cuda::CUDAGuard device_guard(log_weights.device());
  const at::Tensor x = log_weights.contiguous();
  at::Tensor offsets_storage;
  const gpu::GroupLayout layout = group_layout(x, offsets, offsets_storage);
  at::Tensor ancestors = at::empty({layout.groups, num_samples}, x.options().dtype(at::kLong));
  at::Tensor status = at::empty({2}, x.options().dtype(at::kLong));
  gpu::launch_resample(score_type_of(x), x.const_data_ptr(), layout, num_samples,
                       static_cast<gpu::ResampleMethod>(method), static_cast<uint64_t>(seed),
                       ancestors.mutable_data_ptr<int64_t>(), status.mutable_data_ptr<int64_t>(),
                       c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The one sync of the op: a NaN or +inf log-weight, or a group without finite log-weight, is an error.
  const at::Tensor found = status.cpu();
  report_resample_errors(found.const_data_ptr<int64_t>()[0], found.const_data_ptr<int64_t>()[1]);
  return ancestors;
}

at::Tensor effective_sample_size_cuda(const at::Tensor& log_weights, const std::optional<at::Tensor>& offsets) {
  check_effective_sample_size_args(log_weights, offsets);
  const c10::cuda::CUDAGuard device_guard(log_weights.device());
  const at::Tensor x = log_weights.contiguous();
  at::Tensor offsets_storage;
  const gpu::GroupLayout layout = group_layout(x, offsets, offsets_storage);
  at::Tensor ess = at::empty({layout.groups}, x.options().dtype(at::kFloat));
  gpu::launch_effective_sample_size(score_type_of(x), x.const_data_ptr(), layout, ess.mutable_data_ptr<float>(),
                                    c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ess;
}

at::Tensor vote_cuda(const at::Tensor& answer_keys, const std::optional<at::Tensor>& scores,
                     const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& mask, int64_t mode) {
  check_vote_args(answer_keys, scores, offsets, mask, mode);
  const c10::cuda::CUDAGuard device_guard(answer_keys.device());
  const at::Tensor keys = answer_keys.contiguous();
  at::Tensor offsets_storage, scores_storage, mask_storage;
  const gpu::GroupLayout layout = group_layout(keys, offsets, offsets_storage);
  const gpu::ScoreType score_type = scores.has_value() ? score_type_of(*scores) : gpu::ScoreType::kFloat32;
  at::Tensor winners = at::empty({layout.groups}, keys.options());
  gpu::launch_vote(keys.const_data_ptr<int64_t>(), score_type, optional_data<void>(scores, scores_storage),
                   optional_data<bool>(mask, mask_storage), layout, static_cast<gpu::VoteMode>(mode),
                   winners.mutable_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return winners;
}

at::Tensor sequence_keys_cuda(const at::Tensor& token_ids, const at::Tensor& offsets) {
  check_sequence_keys_args(token_ids, offsets);
  const c10::cuda::CUDAGuard device_guard(token_ids.device());
  const at::Tensor tokens = token_ids.contiguous();
  const at::Tensor bounds = offsets.contiguous();
  const int64_t sequences = bounds.numel() - 1;
  at::Tensor keys = at::empty({sequences}, tokens.options().dtype(at::kLong));
  gpu::launch_sequence_keys(tokens.const_data_ptr(), tokens.scalar_type() == at::kInt,
                            bounds.const_data_ptr<int64_t>(), sequences, tokens.numel(),
                            keys.mutable_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keys;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsearch, CUDA, m) {
  m.impl("segmented_topk", &segmented_topk_cuda);
  m.impl("beam_prune", &beam_prune_cuda);
  m.impl("resample", &resample_cuda);
  m.impl("effective_sample_size", &effective_sample_size_cuda);
  m.impl("vote", &vote_cuda);
  m.impl("sequence_keys", &sequence_keys_cuda);
}

}  // namespace fastsearch
