// The argument and output handling that the CPU kernels share: borrowed contiguous views of their tensor
// arguments and outputs taken from the CPU allocator directly. On small tensors a dispatcher round trip
// (contiguous(), at::empty) costs about what the kernel does, so the kernels avoid both.
//
// Its code lives in the inline namespace CPU_CAPABILITY, named per capability build (csrc/README.md, "Layout").
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/EmptyTensor.h>
#include <c10/util/MaybeOwned.h>

#include <cstdint>
#include <optional>
#include <utility>

namespace fastsearch::cpu {
inline namespace CPU_CAPABILITY {

// Borrowed views where the inputs are already contiguous (the usual case): no dispatcher round trip.
using Contiguous = c10::MaybeOwned<at::Tensor>;

// A contiguous view of an optional tensor; an undefined tensor when it is absent.
inline Contiguous contiguous_or_none(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->expect_contiguous() : Contiguous::owned(std::in_place);
}

template <typename T>
const T* data_or_null(const Contiguous& tensor) {
  return tensor->defined() ? tensor->const_data_ptr<T>() : nullptr;
}

// The bytes (0 or 1) of an optional bool tensor, or nullptr: loops over bytes vectorise, over bools not.
inline const uint8_t* flags_or_null(const Contiguous& tensor) {
  return reinterpret_cast<const uint8_t*>(data_or_null<bool>(tensor));
}

inline at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastsearch::cpu
