// Philox4x32-10 and the Gaussian stream every fastsearch backend draws from.
//
// The stream is a sequence of standard normals z_0, z_1, ... keyed by a 64-bit seed.
// Normal j comes from counter c = j / 4, lane j % 4:
//   (r0, r1, r2, r3) = Philox4x32-10(counter = (lo32(c), hi32(c), 0, 0), key = (lo32(seed), hi32(seed)))
//   u(r)  = ((r >> 8) + 0.5) * 2^-24             (exact in fp32, never 0 or 1)
//   z0, z1 = Box-Muller(u(r0), u(r1)),  z2, z3 = Box-Muller(u(r2), u(r3))
//   Box-Muller(u1, u2) = sqrt(-2 ln u1) * (cos(2 pi u2), sin(2 pi u2))
// Triton's tl.randint4x(seed, c) computes the same Philox block for an int64 counter c, so the
// Triton, C++ and CUDA streams agree bit for bit up to the Box-Muller transcendentals.
// Plain C++ so that host code, the CPU kernels and nvcc all include it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FS_HOST_DEVICE inline
#endif

namespace fastsearch {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr float kUint24ToUnit = 5.9604644775390625e-08f;  // 2^-24
constexpr float kTwoPi = 6.283185307179586f;

struct Philox4 {
  uint32_t r[4];
};

FS_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Ten rounds of Philox4x32 on counter (c0, c1, c2, c3) with key (k0, k1).
FS_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                     uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0;
    const uint32_t old_c2 = c2;
    c0 = mulhi32(kPhiloxRoundB, old_c2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, old_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * old_c2;
    c3 = kPhiloxRoundA * old_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The Philox block for stream counter `counter` under `seed`.
FS_HOST_DEVICE Philox4 philox_block(uint64_t seed, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FS_HOST_DEVICE float uint_to_unit_open(uint32_t r) {
  return (static_cast<float>(r >> 8) + 0.5f) * kUint24ToUnit;
}

}  // namespace fastsearch
