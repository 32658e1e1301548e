// A per-sample schedule value as kernels see it: one float per sample, or one for all.
// Plain C++ (no torch), so CUDA kernels take it by value.
#pragma once

#include <cstdint>

#include "common/philox.h"

namespace fastsearch {

struct ScheduleValue {
  const float* values;  // nullptr: every sample uses `value`
  int64_t stride;       // 0 when one tensor value serves every sample, else 1
  float value;

  FS_HOST_DEVICE float at(int64_t sample_index) const {
    return values != nullptr ? values[sample_index * stride] : value;
  }
};

}  // namespace fastsearch
