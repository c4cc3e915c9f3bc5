// CPU kernel of sapsel::topk_select: exact multi-threaded radix select with a deterministic, ordered output.
//
// Contract (shared with sapsel_kernels/reference/topk.py and kernels/topk.py): select the k largest (or smallest)
// scores by value; among scores equal to the threshold the lowest index wins; indices int64, ascending;
// threshold = the k-th selected value (+0.0 for a ±0 tie; +inf/-inf for k = 0); NaN/Inf -> ValueError.
//
// Algorithm. Scores are read as raw bits and mapped to unsigned keys with the order of the values (float_key32/16
// in common.h; complemented for "smallest"). The input is cut into C contiguous chunks (C = a few per thread) and
// every pass runs one chunk per task with a private histogram (uint32 counts; a chunk holds < 2^31 elements):
//   pass 0      histogram of the top digit of every key (this pass also reveals NaN/Inf: their keys fill the bins
//               whose sign+exponent bits are all ones or all zeros);
//   pass 1, 2.. histogram of the next digit of the keys whose higher digits equal the prefix found so far (one
//               compare per element, an increment only for the few matches: "filter fused with the histogram").
// After each pass the chunk histograms are summed (C x bins, tiny) and the digit of the k-th largest key T fixed.
// The same chunk histograms give, per chunk, the number of keys > T (bins above the chosen digit, all passes) and
// == T (the chosen bin of the last pass) without another pass over the data. One final pass then writes, per chunk
// and in index order, the indices of keys > T and of the keys == T whose rank among all ties (in index order) is
// below the quota k - count(> T), starting at the chunk's exclusive-prefix offset: ascending, lowest index wins.
//
// A pass > 0 that expects few matches (<= N/32) keeps the matching keys (<= N/8 bytes), so the passes after it
// read only those. Cost for fp32 (11/11/10-bit digits): 3 streaming reads of the scores (full histogram, filtered
// histogram, output) + a pass over the candidates; 16-bit keys (11/5): 3 reads. No (value, index) pairs; scratch
// C x 2^11 x 4 bytes + the candidates; all index arithmetic int64.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common.h"

namespace sapsel {
namespace {

constexpr int64_t kMinChunk = 1 << 16;      // below this a chunk is not worth a task
constexpr int64_t kMaxChunk = int64_t(1) << 30;  // uint32 per-chunk counts cannot overflow

template <int KEY_BITS>
struct Keys;

template <>
struct Keys<32> {
  using Bits = uint32_t;
  static constexpr uint32_t kAll = 0xFFFFFFFFu;
  static inline uint32_t key(uint32_t b) { return float_key32(b); }
};

template <>
struct Keys<0> : Keys<32> {};  // the scalar loops for 32-bit keys (tails of the SSE2 loops)

template <>
struct Keys<16> {
  using Bits = uint16_t;
  static constexpr uint32_t kAll = 0xFFFFu;
  // float_key16 without branches: the sign test of common.h's version is a coin flip for the branch predictor on
  // real scores (measured: 3x slower passes on randn bf16). Same keys (the tests compare against the reference).
  static inline uint32_t key(uint16_t bits) {
    uint32_t b = bits;
    b &= 0u - static_cast<uint32_t>(b != 0x8000u);  // -0.0 -> +0.0
    const uint32_t neg = 0u - (b >> 15);             // all ones for negative values
    return (b ^ (neg | 0x8000u)) & 0xFFFFu;
  }
};

// score bits -> float value (for messages and the threshold)
inline float value_of(uint32_t bits, at::ScalarType st) {
  if (st == at::kFloat) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  if (st == at::kHalf) return static_cast<float>(c10::Half(static_cast<uint16_t>(bits), c10::Half::from_bits()));
  return static_cast<float>(c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits()));
}

// ---------------------------------------------------------------------------------------------------------------
// The three per-chunk loops. Generic scalar versions for any key width, and SSE2 versions for 32-bit keys (SSE2 is
// the x86-64 baseline, so no -march flag is needed). The SSE2 loops work on the *signed* key sk = key ^ 0x80000000
// (two's complement with the same order: compares are signed epi32 compares) and turn each 4-lane compare into a
// 4-bit mask, so the scalar work is done only for the lanes that hit. Measured at N = 1e8 fp32, k = 1% on our
// 2-core box (CPU seconds, both threads): filter pass 100 -> ~20 ms, sparse write 90 -> ~20 ms vs a scalar loop.
// ---------------------------------------------------------------------------------------------------------------

// pass 0: histogram of key >> shift over [b, e)
template <int KEY_BITS>
void hist_full(const typename Keys<KEY_BITS>::Bits* bits, int64_t b, int64_t e, uint32_t flip, int shift,
               uint32_t* h) {
  using K = Keys<KEY_BITS>;
  for (int64_t i = b; i < e; ++i) h[(K::key(bits[i]) ^ flip) >> shift]++;
}

// pass > 0: histogram of (key >> shift) & dmask over the keys in [lo, hi] (= the keys with the prefix found so far)
template <int KEY_BITS>
void hist_filter(const typename Keys<KEY_BITS>::Bits* bits, int64_t b, int64_t e, uint32_t flip, uint32_t lo,
                 uint32_t hi, int shift, uint32_t dmask, bool dense, uint32_t* h, uint32_t* keep) {
  using K = Keys<KEY_BITS>;
  if (dense) {  // many matches: add the 0/1 match flag instead of branching on it
    for (int64_t i = b; i < e; ++i) {
      const uint32_t key = K::key(bits[i]) ^ flip;
      h[(key >> shift) & dmask] += static_cast<uint32_t>(key >= lo) & static_cast<uint32_t>(key <= hi);
    }
    return;
  }
  for (int64_t i = b; i < e; ++i) {
    const uint32_t key = K::key(bits[i]) ^ flip;
    if (key >= lo && key <= hi) {
      h[(key >> shift) & dmask]++;
      if (keep) *keep++ = key;
    }
  }
}

// later passes over the candidate keys kept by an earlier pass (few: at most N/32)
inline void hist_keys(const uint32_t* keys, int64_t cnt, uint32_t lo, uint32_t hi, int shift, uint32_t dmask,
                      uint32_t* h) {
  for (int64_t i = 0; i < cnt; ++i)
    if (keys[i] >= lo && keys[i] <= hi) h[(keys[i] >> shift) & dmask]++;
}

// final pass: write, in index order from o[pos] (this chunk's slots are [pos, end)), the indices with key > T,
// and with key == T while quota > 0
template <int KEY_BITS>
void write_sel(const typename Keys<KEY_BITS>::Bits* bits, int64_t b, int64_t e, uint32_t flip, uint32_t T,
               int64_t quota, int64_t pos, int64_t end, int64_t* o) {
  using K = Keys<KEY_BITS>;
  if (32 * (end - pos) > e - b) {
    // dense: store unconditionally, advance only when selected; stop once this chunk's slots are full, so a store
    // never lands in the next chunk's range (which another thread is writing)
    for (int64_t i = b; i < e && pos < end; ++i) {
      const uint32_t key = K::key(bits[i]) ^ flip;
      const int64_t tie = key == T;
      const int64_t sel = static_cast<int64_t>(key > T) | (tie & static_cast<int64_t>(quota > 0));
      quota -= tie;
      o[pos] = i;
      pos += sel;
    }
    return;
  }
  for (int64_t i = b; i < e; ++i) {
    const uint32_t key = K::key(bits[i]) ^ flip;
    if (key > T) {
      o[pos++] = i;
    } else if (key == T && quota > 0) {
      --quota;
      o[pos++] = i;
    }
  }
}

#if defined(__SSE2__)
// signed keys of 4 fp32 bit patterns: -0.0 -> +0.0, then negative values get all but the sign bit flipped;
// flipv = all ones for "smallest" (~sk reverses the order exactly)
inline __m128i skey4(const uint32_t* p, __m128i flipv) {
  const __m128i negzero = _mm_set1_epi32(static_cast<int>(0x80000000u));
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  v = _mm_andnot_si128(_mm_cmpeq_epi32(v, negzero), v);
  v = _mm_xor_si128(v, _mm_and_si128(_mm_srai_epi32(v, 31), _mm_set1_epi32(0x7FFFFFFF)));
  return _mm_xor_si128(v, flipv);
}
inline int mask4(__m128i m) { return _mm_movemask_ps(_mm_castsi128_ps(m)); }
inline int32_t to_signed(uint32_t key) { return static_cast<int32_t>(key ^ 0x80000000u); }

template <>
void hist_full<32>(const uint32_t* bits, int64_t b, int64_t e, uint32_t flip, int shift, uint32_t* h) {
  const __m128i flipv = _mm_set1_epi32(static_cast<int>(flip)), sign = _mm_set1_epi32(static_cast<int>(0x80000000u));
  const __m128i cnt = _mm_cvtsi32_si128(shift);
  alignas(16) uint32_t d[8];
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    _mm_store_si128(reinterpret_cast<__m128i*>(d), _mm_srl_epi32(_mm_xor_si128(skey4(bits + i, flipv), sign), cnt));
    _mm_store_si128(reinterpret_cast<__m128i*>(d + 4),
                    _mm_srl_epi32(_mm_xor_si128(skey4(bits + i + 4, flipv), sign), cnt));
    for (int j = 0; j < 8; ++j) h[d[j]]++;
  }
  for (; i < e; ++i) h[(Keys<32>::key(bits[i]) ^ flip) >> shift]++;
}

template <>
void hist_filter<32>(const uint32_t* bits, int64_t b, int64_t e, uint32_t flip, uint32_t lo, uint32_t hi, int shift,
                     uint32_t dmask, bool dense, uint32_t* h, uint32_t* keep) {
  const __m128i flipv = _mm_set1_epi32(static_cast<int>(flip));
  const __m128i lov = _mm_set1_epi32(to_signed(lo)), hiv = _mm_set1_epi32(to_signed(hi));
  int64_t i = b;
  if (dense) {
    // many matches expected: branch-free, every lane adds its match flag (0/1) to the bin of its digit. (Sending
    // the non-matching lanes to one spare bin instead chains every increment on one address: 3x slower.)
    const __m128i sign = _mm_set1_epi32(static_cast<int>(0x80000000u)), dm = _mm_set1_epi32(static_cast<int>(dmask));
    const __m128i one = _mm_set1_epi32(1);
    const __m128i cnt = _mm_cvtsi32_si128(shift);
    alignas(16) uint32_t d[8], m[8];
    for (; i + 8 <= e; i += 8) {
      for (int half = 0; half < 2; ++half) {
        const __m128i k = skey4(bits + i + 4 * half, flipv);
        const __m128i out = _mm_or_si128(_mm_cmpgt_epi32(lov, k), _mm_cmpgt_epi32(k, hiv));
        _mm_store_si128(reinterpret_cast<__m128i*>(d + 4 * half),
                        _mm_and_si128(_mm_srl_epi32(_mm_xor_si128(k, sign), cnt), dm));
        _mm_store_si128(reinterpret_cast<__m128i*>(m + 4 * half), _mm_andnot_si128(out, one));
      }
      for (int j = 0; j < 8; ++j) h[d[j]] += m[j];
    }
    hist_filter<0>(bits, i, e, flip, lo, hi, shift, dmask, dense, h, keep);
    return;
  }
  for (; i + 8 <= e; i += 8) {
    const __m128i k0 = skey4(bits + i, flipv), k1 = skey4(bits + i + 4, flipv);
    const __m128i out0 = _mm_or_si128(_mm_cmpgt_epi32(lov, k0), _mm_cmpgt_epi32(k0, hiv));
    const __m128i out1 = _mm_or_si128(_mm_cmpgt_epi32(lov, k1), _mm_cmpgt_epi32(k1, hiv));
    int m = (~(mask4(out0) | (mask4(out1) << 4))) & 0xFF;
    while (m) {
      const int j = __builtin_ctz(m);
      m &= m - 1;
      const uint32_t key = Keys<32>::key(bits[i + j]) ^ flip;
      h[(key >> shift) & dmask]++;
      if (keep) *keep++ = key;
    }
  }
  hist_filter<0>(bits, i, e, flip, lo, hi, shift, dmask, dense, h, keep);
}

// kLanes[m] = positions of the set bits of the 4-bit mask m, in order (padded with 3)
alignas(16) constexpr int64_t kLanes[16][4] = {
    {3, 3, 3, 3}, {0, 3, 3, 3}, {1, 3, 3, 3}, {0, 1, 3, 3}, {2, 3, 3, 3}, {0, 2, 3, 3}, {1, 2, 3, 3}, {0, 1, 2, 3},
    {3, 3, 3, 3}, {0, 3, 3, 3}, {1, 3, 3, 3}, {0, 1, 3, 3}, {2, 3, 3, 3}, {0, 2, 3, 3}, {1, 2, 3, 3}, {0, 1, 2, 3}};

template <>
void write_sel<32>(const uint32_t* bits, int64_t b, int64_t e, uint32_t flip, uint32_t T, int64_t quota, int64_t pos,
                   int64_t end, int64_t* o) {
  const bool dense = 32 * (end - pos) > e - b;
  const __m128i flipv = _mm_set1_epi32(static_cast<int>(flip)), tv = _mm_set1_epi32(to_signed(T));
  int64_t i = b;
  for (; i + 4 <= e; i += 4) {
    const __m128i k = skey4(bits + i, flipv);
    int gt = mask4(_mm_cmpgt_epi32(k, tv));
    int eq = mask4(_mm_cmpeq_epi32(k, tv));
    // dense (> 1/32 selected): the common case (no tie in these 4 lanes, room for 4 stores) takes no
    // data-dependent branch; with 10% selected "any lane selected?" is a coin flip for the branch predictor
    // (measured: 40 ms of mispredictions). Sparse: skip the empty groups first.
    if (dense && eq == 0 && pos + 4 <= end) {
      // compress-store: lane offsets of the set bits of gt from a table, 4 stores, advance by popcount; the stores
      // past the selected ones stay inside this chunk's output range (pos + 4 <= end) and are overwritten later
      const __m128i base = _mm_set1_epi64x(i);
      const int64_t* l = kLanes[gt];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + pos),
                       _mm_add_epi64(base, _mm_loadu_si128(reinterpret_cast<const __m128i*>(l))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + pos + 2),
                       _mm_add_epi64(base, _mm_loadu_si128(reinterpret_cast<const __m128i*>(l + 2))));
      pos += __builtin_popcount(gt);
    } else if ((gt | eq) == 0) {
      continue;
    } else if (eq == 0) {
      while (gt) {
        o[pos++] = i + __builtin_ctz(gt);
        gt &= gt - 1;
      }
    } else {
      for (int j = 0; j < 4; ++j) {
        if ((gt >> j) & 1) {
          o[pos++] = i + j;
        } else if (((eq >> j) & 1) && quota > 0) {
          --quota;
          o[pos++] = i + j;
        }
      }
    }
  }
  write_sel<0>(bits, i, e, flip, T, quota, pos, end, o);
}
#endif

// Run fn(c) for every chunk c in [0, nchunks) on the intra-op threads, each thread claiming the next unclaimed chunk
// (not a static split): on a shared, oversubscribed machine a descheduled thread then delays one chunk, not its whole
// share. Results are per chunk, so which thread ran a chunk does not matter (deterministic output).
template <typename F>
void for_each_chunk(int64_t nchunks, const F& fn) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), nchunks);
  if (nt <= 1) {
    for (int64_t c = 0; c < nchunks; ++c) fn(c);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) fn(c);
  });
}

template <int KEY_BITS>
std::tuple<torch::Tensor, torch::Tensor> radix_select(const torch::Tensor& x, int64_t k, bool largest) {
  using K = Keys<KEY_BITS>;
  using Bits = typename K::Bits;
  const Bits* bits = reinterpret_cast<const Bits*>(x.data_ptr());
  const int64_t n = x.numel();
  const at::ScalarType st = x.scalar_type();
  const uint32_t flip = largest ? 0u : K::kAll;

  // digit schedule, most significant first; the first digit must cover sign + exponent (NaN/Inf detection)
  std::vector<int> widths = KEY_BITS == 32 ? std::vector<int>{11, 11, 10} : std::vector<int>{11, 5};
  const int exp_bits = st == at::kHalf ? 6 : 9;  // sign + exponent bits: fp16 1+5, fp32/bf16 1+8

  // chunking: ~8 chunks per thread for load balance (claimed dynamically), each in [kMinChunk, kMaxChunk]
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nchunks = std::min<int64_t>(threads * 8, std::max<int64_t>(1, n / kMinChunk));
  nchunks = std::max<int64_t>(nchunks, (n + kMaxChunk - 1) / kMaxChunk);
  const int64_t csize = (n + nchunks - 1) / nchunks;
  auto chunk_begin = [&](int64_t c) { return std::min(n, c * csize); };

  std::vector<int64_t> gt(nchunks, 0), eq(nchunks, 0);
  std::vector<uint32_t> hist;
  uint32_t prefix = 0;
  int consumed = 0;
  int64_t k_rem = k;
  int64_t matching = n;  // number of keys with the prefix found so far
  std::vector<uint32_t> cand;  // candidate keys kept by a sparse pass, chunk c at [cand_off[c], cand_off[c + 1])
  std::vector<int64_t> cand_off;
  bool have_cand = false;
  for (size_t p = 0; p < widths.size(); ++p) {
    const int width = widths[p];
    const int64_t nbins = int64_t(1) << width;
    const int shift = KEY_BITS - consumed - width;
    const int pshift = KEY_BITS - consumed;  // compare bits above this with prefix (pass > 0)
    const uint32_t dmask = static_cast<uint32_t>(nbins - 1);
    // the branch-free filter is used when more than 1/64 of the keys match the prefix ("this lane matches" is then
    // a poor branch)
    const int64_t stride = nbins;
    const bool dense = 32 * matching > n;
    // sparse and not the last pass: keep the matching keys (at most N/32 x 4 bytes = N/8 bytes), so that the
    // remaining passes read only them instead of all N scores
    const bool collect = p > 0 && !dense && !have_cand && p + 1 < widths.size();
    if (collect) {
      cand_off.assign(nchunks + 1, 0);
      for (int64_t c = 0; c < nchunks; ++c) cand_off[c + 1] = cand_off[c] + eq[c];
      cand.resize(static_cast<size_t>(cand_off[nchunks]));
    }
    const uint32_t lo = p > 0 ? prefix << pshift : 0, hi = p > 0 ? lo | ((uint32_t(1) << pshift) - 1) : 0;
    hist.assign(static_cast<size_t>(nchunks * stride), 0u);
    for_each_chunk(nchunks, [&](int64_t c) {
      uint32_t* h = hist.data() + c * stride;
      const int64_t b = chunk_begin(c), e = chunk_begin(c + 1);
      if (p == 0) {
        hist_full<KEY_BITS>(bits, b, e, flip, shift, h);
      } else if (have_cand) {
        hist_keys(cand.data() + cand_off[c], cand_off[c + 1] - cand_off[c], lo, hi, shift, dmask, h);
      } else {
        hist_filter<KEY_BITS>(bits, b, e, flip, lo, hi, shift, dmask, dense, h,
                              collect ? cand.data() + cand_off[c] : nullptr);
      }
    });
    have_cand = have_cand || collect;
    std::vector<int64_t> g(nbins, 0);
    for (int64_t c = 0; c < nchunks; ++c)
      for (int64_t d = 0; d < nbins; ++d) g[d] += hist[c * stride + d];
    if (p == 0) {
      const int sh = width - exp_bits;
      const int64_t top = (int64_t(1) << exp_bits) - 1;
      int64_t bad = 0;
      for (int64_t d = 0; d < nbins; ++d)
        if ((d >> sh) == 0 || (d >> sh) == top) bad += g[d];
      if (bad > 0) {
        for (int64_t i = 0; i < n; ++i) {
          const float v = value_of(bits[i], st);
          TORCH_CHECK_VALUE(std::isfinite(v), "topk_select: non-finite score ", v, " at index ", i,
                            " of scores (NaN/Inf cannot be ranked; fix the scores first)");
        }
      }
      if (k == 0) break;
    }
    // the digit d of T: the highest bin at which the count from the top reaches k_rem
    int64_t d = nbins - 1, above = 0;
    while (above + g[d] < k_rem) above += g[d--];
    k_rem -= above;
    matching = g[d];
    for (int64_t c = 0; c < nchunks; ++c) {
      const uint32_t* h = hist.data() + c * stride;
      int64_t s = 0;
      for (int64_t j = d + 1; j < nbins; ++j) s += h[j];
      gt[c] += s;
      eq[c] = h[d];  // keys matching the prefix so far and this digit; final after the last pass
    }
    prefix = (prefix << width) | static_cast<uint32_t>(d);
    consumed += width;
  }
  auto opts = x.options().dtype(torch::kInt64);
  if (k == 0) {
    const float inf = std::numeric_limits<float>::infinity();
    return {torch::empty({0}, opts), torch::full({}, largest ? inf : -inf, x.options())};
  }
  const uint32_t T = prefix;  // key of the k-th largest; k_rem of the keys == T are taken (lowest index first)

  // threshold: back from the key to the score bits (-0.0 was canonicalised, so a zero threshold is +0.0)
  const uint32_t ukey = T ^ flip;
  const uint32_t sign = uint32_t(1) << (KEY_BITS - 1);
  const uint32_t tbits = (ukey & sign) ? (ukey ^ sign) : (~ukey & K::kAll);
  auto thr = torch::empty({}, x.options());
  const Bits tb = static_cast<Bits>(tbits);
  std::memcpy(thr.data_ptr(), &tb, sizeof(Bits));

  if (k == n) return {torch::arange(n, opts), thr};

  // per-chunk output offsets: chunk c takes take[c] of its ties, after the ties of the chunks before it
  std::vector<int64_t> off(nchunks + 1, 0), take(nchunks, 0);
  int64_t ties_before = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    take[c] = std::max<int64_t>(0, std::min<int64_t>(eq[c], k_rem - ties_before));
    ties_before += eq[c];
    off[c + 1] = off[c] + gt[c] + take[c];
  }
  TORCH_CHECK(off[nchunks] == k, "topk_select: internal error, selected ", off[nchunks], " of k=", k);
  auto out = torch::empty({k}, opts);
  int64_t* o = out.data_ptr<int64_t>();
  for_each_chunk(nchunks, [&](int64_t c) {
    write_sel<KEY_BITS>(bits, chunk_begin(c), chunk_begin(c + 1), flip, T, take[c], off[c], off[c + 1], o);
  });
  return {out, thr};
}

}  // namespace

// scores: 1-D float32/float16/bfloat16 CPU tensor (made contiguous); returns (indices int64 [k], threshold 0-dim).
std::tuple<torch::Tensor, torch::Tensor> topk_select_cpu(const torch::Tensor& scores, int64_t k, bool largest) {
  SAPSEL_CHECK_CPU(scores);
  TORCH_CHECK_VALUE(scores.dim() == 1, "topk_select: scores must be 1-D (a flat score vector), got shape ",
                    scores.sizes());
  const auto st = scores.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                   "topk_select: scores must be float32, float16 or bfloat16, got ", st);
  const int64_t n = scores.numel();
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "topk_select: k must be in [0, ", n, "] for ", n, " scores, got k=", k);
  const torch::Tensor x = scores.contiguous();
  if (n == 0) {
    const float inf = std::numeric_limits<float>::infinity();
    return {torch::empty({0}, x.options().dtype(torch::kInt64)), torch::full({}, largest ? inf : -inf, x.options())};
  }
  return st == at::kFloat ? radix_select<32>(x, k, largest) : radix_select<16>(x, k, largest);
}

void bind_topk(pybind11::module_& m) {
  m.def("topk_select_cpu", &topk_select_cpu, "exact radix top-k select: (indices int64 ascending, threshold)",
        pybind11::arg("scores"), pybind11::arg("k"), pybind11::arg("largest") = true);
}

}  // namespace sapsel
