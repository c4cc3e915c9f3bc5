// Shared device-independent helpers for the CPU kernels of sapsel-kernels.
//
// Everything here has a bit-exact twin in sapsel_kernels/reference/philox.py (pure PyTorch) and in
// sapsel_kernels/kernels/philox.py (Triton). Change one, change all three, and run tests/test_philox.py.
#pragma once
#include <cstdint>
#include <torch/extension.h>

namespace sapsel {

// ---------------------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11). Counter (c0..c3), key (k0, k1). Ten rounds; the key is bumped after each
// round (the bump after the tenth is unused). Returns the four output words.
// ---------------------------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x[4];
};

inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n1 = lo1;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    const uint32_t n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Rademacher probe layout: one Philox call serves a group of 128 consecutive global flat indices.
//   group g = i >> 7, lane = i & 127, word = lane >> 5, bit = lane & 31
//   counter = (g_lo32, g_hi32, probe, 0), key = (seed_lo32, seed_hi32)
//   z_i = +1 if the bit is set else -1
constexpr int kProbeGroupShift = 7;
constexpr int64_t kProbeGroup = 128;

inline Philox4 probe_group_bits(int64_t group, int64_t probe, int64_t seed) {
  const uint64_t g = static_cast<uint64_t>(group);
  const uint64_t s = static_cast<uint64_t>(seed);
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), static_cast<uint32_t>(probe), 0u,
                       static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

inline float rademacher_at(int64_t flat_index, int64_t probe, int64_t seed) {
  const Philox4 w = probe_group_bits(flat_index >> kProbeGroupShift, probe, seed);
  const int lane = static_cast<int>(flat_index & (kProbeGroup - 1));
  return ((w.x[lane >> 5] >> (lane & 31)) & 1u) ? 1.0f : -1.0f;
}

// ---------------------------------------------------------------------------------------------------------------
// Order-preserving integer image of floats (radix select). -0.0 is canonicalised to +0.0 so that equal values
// get equal keys (the tie rule "lowest index wins" then applies to them). NaN must be rejected before/while keying.
// ---------------------------------------------------------------------------------------------------------------
inline uint32_t float_key32(uint32_t bits) {
  if (bits == 0x80000000u) bits = 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
inline uint16_t float_key16(uint16_t bits) {
  if (bits == 0x8000u) bits = 0u;
  return (bits & 0x8000u) ? static_cast<uint16_t>(~bits) : static_cast<uint16_t>(bits | 0x8000u);
}

// Global flat indices (the probe layout's i, ParamSpace offsets) live in [0, 2^62): the group arithmetic
// ((g + 1) << 7) and offset + n then cannot overflow int64 (2^62 is ~4.6e18 parameters, far past any model).
constexpr int64_t kMaxGlobalIndex = int64_t(1) << 62;

inline void check_index_range(int64_t offset, int64_t n, const char* name) {
  TORCH_CHECK_VALUE(offset >= 0 && n >= 0 && offset <= kMaxGlobalIndex - n, name,
                    ": offset must be >= 0 and offset + numel <= 2^62, got offset ", offset, " for ", n, " elements");
}

#define SAPSEL_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor, got ", (t).device())

}  // namespace sapsel
