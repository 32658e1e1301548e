// e^x on at::vec floats with the same bits in every capability build (csrc/README.md, "CPU capabilities"):
// Sleef's vector expf, which the AVX2 and AVX512 builds' at::vec call, and libm's expf, which the default
// build's calls lane by lane, differ in the last place. The weights of resample and effective_sample_size
// take this one.
//
// Its code lives in the inline namespace CPU_CAPABILITY, named per capability build (csrc/README.md, "Layout").
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu/vec_stream.h"

namespace fastsearch::cpu {
inline namespace CPU_CAPABILITY {

// x rounded to an integer (to nearest, ties to even), for |x| < 2^22: adding 1.5 * 2^23 leaves no fraction
// bits. Plain adds, unlike round(), which the default build's at::vec calls libm for, lane by lane.
inline FloatVec round_to_integer(const FloatVec& x) {
  const FloatVec shifter(12582912.0f);
  return (x + shifter) - shifter;
}

// 2^k for integer-valued k in [-126, 127]: the exponent field k + 127, placed by a multiply by 2^23.
inline FloatVec power_of_two(const FloatVec& k) {
  return at::vec::cast<float>(at::vec::convert_to_int_of_same_size((k + FloatVec(127.0f)) * FloatVec(8388608.0f)));
}

// e^x (x not NaN), within an ulp of the exact value: Cephes' expf, a Cody-Waite reduction x = n ln2 + r and
// a degree-7 polynomial in r. Only exactly rounded operations (no FMA: the build turns contraction off), so
// every build gives the same bits, and at the vector builds' speed (0.5 ns a lane, libm's expf 3 to 7).
inline FloatVec exp_same_in_every_build(const FloatVec& x) {
  // Beyond these e^x overflows (x > 88.73) or rounds to zero (x < -103.98), as it still does when clamped.
  const FloatVec clamped = at::vec::clamp(x, FloatVec(-104.0f), FloatVec(89.0f));
  const FloatVec n = round_to_integer(clamped * FloatVec(1.44269504088896341f));
  // ln 2 in two parts; n times the first, 0.693359375 (9 bits), is exact.
  const FloatVec r = (clamped - n * FloatVec(0.693359375f)) - n * FloatVec(-2.12194440e-4f);
  FloatVec p(1.9875691500e-4f);
  p = p * r + FloatVec(1.3981999507e-3f);
  p = p * r + FloatVec(8.3334519073e-3f);
  p = p * r + FloatVec(4.1665795894e-2f);
  p = p * r + FloatVec(1.6666665459e-1f);
  p = p * r + FloatVec(5.0000001201e-1f);
  const FloatVec e_r = (p * (r * r) + r) + FloatVec(1.0f);
  // 2^n (n in [-150, 128]) as two normal factors: the product rounds once, into the subnormals too.
  const FloatVec half = round_to_integer(n * FloatVec(0.5f));
  return e_r * power_of_two(half) * power_of_two(n - half);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastsearch::cpu
