// Selection keys: one uint32 per neuron whose unsigned order is the order of preference (larger = kept first).
// Host and device share these functions, so the host entry points of the extension test them on CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define SAT_HD __host__ __device__ __forceinline__
#else
#define SAT_HD inline
#endif

namespace sat {

enum Strategy : int { kTopk = 0, kSample = 1, kRandom = 2 };

struct Philox4 {
  std::uint32_t x, y, z, w;
};

SAT_HD std::uint32_t mulhi32(std::uint32_t a, std::uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<std::uint32_t>((static_cast<std::uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11): a counter-based generator, 10 rounds of multiply-xor with a key
// bumped by the Weyl constants between rounds.
SAT_HD Philox4 philox4x32_10(Philox4 ctr, std::uint32_t key0, std::uint32_t key1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key0 += 0x9E3779B9u;
      key1 += 0xBB67AE85u;
    }
    const std::uint32_t hi0 = mulhi32(0xD2511F53u, ctr.x), lo0 = 0xD2511F53u * ctr.x;
    const std::uint32_t hi1 = mulhi32(0xCD9E8D57u, ctr.z), lo1 = 0xCD9E8D57u * ctr.z;
    ctr = Philox4{hi1 ^ ctr.y ^ key0, lo1, hi0 ^ ctr.w ^ key1, lo0};
  }
  return ctr;
}

// 32 random bits of element `i` of row `row`: counter (i, row, offset), key = seed. A draw at another offset (the
// next call with the same generator) or another row is an independent stream.
SAT_HD std::uint32_t philox_bits(std::uint64_t seed, std::uint64_t offset, std::uint32_t row, std::uint32_t i) {
  const Philox4 out = philox4x32_10(
      Philox4{i, row, static_cast<std::uint32_t>(offset), static_cast<std::uint32_t>(offset >> 32)},
      static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
  return out.x;
}

// U(0, 1) from the top 23 bits: (2m + 1) * 2^-24 is exact in fp32 and lies in [2^-24, 1 - 2^-24], so both logs of the
// Gumbel transform stay finite.
SAT_HD float open_uniform(std::uint32_t bits) {
  return static_cast<float>((bits >> 9) * 2u + 1u) * 5.9604644775390625e-8f;
}

SAT_HD std::uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

// Monotone map from fp32 to uint32: a < b (as floats) iff key(a) < key(b). NaN maps to 0, below every number
// (-inf included); -0.0 and +0.0 get one key, so they tie like they compare.
SAT_HD std::uint32_t order_key(float f) {
  if (f != f) return 0u;
  if (f == 0.0f) f = 0.0f;
  const std::uint32_t b = float_bits(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The key of neuron `i` (row `row`) under `strategy`:
//   topk:   the score;
//   sample: log(score) + Gumbel(u), u uniform; the k largest keys are k draws without replacement with p ~ score.
//           Computed as in sat_kernels.selection (u clamped to FLT_MIN, -log(-log u)), in fp32;
//   random: u (uniform without replacement); the 32 Philox bits themselves when the noise is drawn here.
// `uniform` (may be null) is this row's pre-drawn U(0, 1) noise; without it the noise is Philox(seed, offset).
SAT_HD std::uint32_t selection_key(float score, const float* uniform, std::uint32_t i, std::uint32_t row,
                                   int strategy, std::uint64_t seed, std::uint64_t offset) {
  if (strategy == kTopk) return order_key(score);
  float u;
  if (uniform != nullptr) {
    u = uniform[i];
    if (strategy == kRandom) return order_key(u);
  } else {
    const std::uint32_t bits = philox_bits(seed, offset, row, i);
    if (strategy == kRandom) return bits;
    u = open_uniform(bits);
  }
  u = fmaxf(u, 1.17549435e-38f);
  return order_key(logf(score) + -logf(-logf(u)));
}

}  // namespace sat
