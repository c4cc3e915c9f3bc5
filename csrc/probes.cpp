// CPU kernels: Rademacher probes and the fused Hutchinson (Welford) accumulation.
//
// Numerics contract (bit-identical to sapsel_kernels/reference/probes.py and kernels/probes.py):
//   z_i = rademacher(seed, probe, global flat index i)           (common.h: one Philox call per 128-index group)
//   x   = z_i * float(hz_i)                                       (exact: z = +-1)
//   inv = float(1.0 / double(count + 1))
//   delta = x - mean; mean' = mean + delta * inv; m2' = m2 + delta * (x - mean')     (float32, each op rounded)
// Contraction into FMAs would change the bits: -std=c++17 (an ISO mode) makes GCC default to -ffp-contract=off,
// and the x86-64 baseline we build for has no FMA instructions anyway.
//
// Work split: at::parallel_for over 128-element Philox groups (grain 64 groups = 8192 elements), so each group's
// Philox words are computed once per probe and the threads never share a cache line of mean/m2 except at the ends.
// The batched form walks the m probes inside each group: mean/m2 stay in L1 while the m rows of Hz stream past.
// int64 indices throughout.
#include "common.h"

namespace sapsel {

namespace {

constexpr int64_t kGroupGrain = 64;

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}

// kBit[b] = 1 << b: testing a word against this constant table (instead of shifting by the lane) lets the compiler
// vectorise the 32-lane loops with plain SSE2 (and/compare/select); measured ~8x faster than the shifted form.
struct BitTable {
  uint32_t v[32];
  constexpr BitTable() : v() {
    for (int b = 0; b < 32; ++b) v[b] = 1u << b;
  }
};
alignas(64) constexpr BitTable kBits{};

// Probe values of one full 128-element group.
inline void fill_group(float* __restrict out, const Philox4& w) {
  for (int q = 0; q < 4; ++q) {
    const uint32_t word = w.x[q];
    float* o = out + q * 32;
    for (int b = 0; b < 32; ++b) o[b] = (word & kBits.v[b]) ? 1.0f : -1.0f;
  }
}

// Welford step over `len` consecutive elements starting at lane `lane0` of a group (len + lane0 <= 128).
template <typename T>
inline void welford_span(float* __restrict mean, float* __restrict m2, const T* __restrict h, const Philox4& w,
                         int lane0, int len, float inv) {
  if (lane0 == 0 && len == kProbeGroup) {  // full group: 4 words x 32 lanes, vectorisable
    for (int q = 0; q < 4; ++q) {
      const uint32_t word = w.x[q];
      for (int b = 0; b < 32; ++b) {
        const int i = q * 32 + b;
        const float hv = to_f32(h[i]);
        const float x = (word & kBits.v[b]) ? hv : -hv;
        const float mu = mean[i];
        const float delta = x - mu;
        const float step = delta * inv;
        const float mu_new = mu + step;
        const float dev = x - mu_new;
        const float prod = delta * dev;
        mean[i] = mu_new;
        m2[i] = m2[i] + prod;
      }
    }
    return;
  }
  for (int i = 0; i < len; ++i) {  // ragged ends of a slice
    const int lane = lane0 + i;
    const float hv = to_f32(h[i]);
    const float x = ((w.x[lane >> 5] >> (lane & 31)) & 1u) ? hv : -hv;
    const float mu = mean[i];
    const float delta = x - mu;
    const float step = delta * inv;
    const float mu_new = mu + step;
    const float dev = x - mu_new;
    const float prod = delta * dev;
    mean[i] = mu_new;
    m2[i] = m2[i] + prod;
  }
}

// Fold rows 0..m-1 of hz (row stride `stride` elements) into mean/m2 for flat local range [0, n) at global `offset`.
template <typename T>
void welford_rows(float* mean, float* m2, const T* hz, int64_t stride, int64_t m, int64_t n, int64_t offset,
                  int64_t probe, int64_t seed, int64_t count) {
  const int64_t g_first = offset >> kProbeGroupShift;
  const int64_t g_last = (offset + n - 1) >> kProbeGroupShift;
  std::vector<float> inv(static_cast<size_t>(m));
  for (int64_t j = 0; j < m; ++j) inv[j] = static_cast<float>(1.0 / static_cast<double>(count + j + 1));
  at::parallel_for(0, g_last - g_first + 1, kGroupGrain, [&](int64_t gb, int64_t ge) {
    for (int64_t gi = gb; gi < ge; ++gi) {
      const int64_t g = g_first + gi;
      const int64_t lo = std::max<int64_t>(g << kProbeGroupShift, offset) - offset;           // local start
      const int64_t hi = std::min<int64_t>((g + 1) << kProbeGroupShift, offset + n) - offset;  // local end
      const int lane0 = static_cast<int>((offset + lo) & (kProbeGroup - 1));
      for (int64_t j = 0; j < m; ++j) {
        const Philox4 w = probe_group_bits(g, probe + j, seed);
        welford_span(mean + lo, m2 + lo, hz + j * stride + lo, w, lane0, static_cast<int>(hi - lo), inv[j]);
      }
    }
  });
}

void check_acc(const torch::Tensor& mean, const torch::Tensor& m2, const torch::Tensor& hz, int64_t offset,
               int64_t probe, int64_t seed, int64_t count, int64_t m, const char* name) {
  SAPSEL_CHECK_CPU(mean);
  SAPSEL_CHECK_CPU(m2);
  SAPSEL_CHECK_CPU(hz);
  TORCH_CHECK_TYPE(mean.scalar_type() == at::kFloat && m2.scalar_type() == at::kFloat, name,
                   ": mean and m2 must be float32, got ", mean.scalar_type(), " and ", m2.scalar_type());
  TORCH_CHECK_VALUE(mean.is_contiguous() && m2.is_contiguous(), name, ": mean and m2 must be contiguous");
  TORCH_CHECK_VALUE(mean.sizes() == m2.sizes(), name, ": mean and m2 must have the same shape, got ", mean.sizes(),
                    " and ", m2.sizes());
  const auto st = hz.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
                   ": hz must be float32/float64/float16/bfloat16, got ", st);
  check_index_range(offset, mean.numel(), name);
  TORCH_CHECK_VALUE(count >= 0 && count <= kMaxGlobalIndex - m, name,
                    ": count (samples already accumulated) must be in [0, 2^62 - m), got ", count);
  TORCH_CHECK_VALUE(seed >= 0, name, ": seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK_VALUE(probe >= 0 && (m == 0 || probe + m - 1 < (int64_t(1) << 32)), name, ": probes ", probe, "..",
                    probe + m - 1, " exceed the probe range [0, 2^32)");
}

void accumulate_impl(torch::Tensor& mean, torch::Tensor& m2, const torch::Tensor& hz_in, int64_t m, int64_t offset,
                     int64_t probe, int64_t seed, int64_t count) {
  const int64_t n = mean.numel();
  if (n == 0 || m == 0) return;
  const torch::Tensor hz = hz_in.contiguous();
  float* mu = mean.data_ptr<float>();
  float* v = m2.data_ptr<float>();
  switch (hz.scalar_type()) {
    case at::kFloat:
      welford_rows(mu, v, hz.data_ptr<float>(), n, m, n, offset, probe, seed, count);
      break;
    case at::kDouble:
      welford_rows(mu, v, hz.data_ptr<double>(), n, m, n, offset, probe, seed, count);
      break;
    case at::kHalf:
      welford_rows(mu, v, hz.data_ptr<at::Half>(), n, m, n, offset, probe, seed, count);
      break;
    default:
      welford_rows(mu, v, hz.data_ptr<at::BFloat16>(), n, m, n, offset, probe, seed, count);
      break;
  }
}

}  // namespace

namespace {

void check_probe(const torch::Tensor& t, int64_t offset, int64_t probe, int64_t seed, bool batched, const char* name) {
  SAPSEL_CHECK_CPU(t);
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, ": the tensor must be floating, got ", t.scalar_type());
  TORCH_CHECK_VALUE(!batched || t.dim() >= 1, name, "(batched=True): the tensor needs a leading probe dimension");
  const int64_t m = batched ? t.size(0) : 1;
  check_index_range(offset, m == 0 ? 0 : t.numel() / m, name);
  TORCH_CHECK_VALUE(seed >= 0, name, ": seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK_VALUE(probe >= 0 && (m == 0 || probe + m - 1 < (int64_t(1) << 32)), name, ": probes ", probe, "..",
                    probe + m - 1, " exceed the probe range [0, 2^32)");
}

// Probe values into a contiguous float32 buffer of m rows x n (row j = probe + j).
void fill_f32(float* o, int64_t m, int64_t n, int64_t offset, int64_t probe, int64_t seed) {
  if (m == 0 || n == 0) return;
  const int64_t g_first = offset >> kProbeGroupShift;
  const int64_t g_last = (offset + n - 1) >> kProbeGroupShift;
  const int64_t ng = g_last - g_first + 1;
  // one work item = (probe row, group); one Philox call each
  at::parallel_for(0, m * ng, kGroupGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t j = t / ng, g = g_first + t % ng;
      const Philox4 w = probe_group_bits(g, probe + j, seed);
      const int64_t lo = std::max<int64_t>(g << kProbeGroupShift, offset) - offset;
      const int64_t hi = std::min<int64_t>((g + 1) << kProbeGroupShift, offset + n) - offset;
      float* row = o + j * n;
      if (hi - lo == kProbeGroup) {
        fill_group(row + lo, w);
        continue;
      }
      for (int64_t i = lo; i < hi; ++i) {
        const int lane = static_cast<int>((offset + i) & (kProbeGroup - 1));
        row[i] = ((w.x[lane >> 5] >> (lane & 31)) & 1u) ? 1.0f : -1.0f;
      }
    }
  });
}

}  // namespace

// In place: `out` (any floating dtype/layout) gets the probe values of global flat indices [offset, offset + numel)
// (batched: row j of out = probe + j over the same indices).
void rademacher_fill_cpu(torch::Tensor out, int64_t offset, int64_t probe, int64_t seed, bool batched) {
  check_probe(out, offset, probe, seed, batched, "rademacher_fill");
  const int64_t m = batched ? out.size(0) : 1;
  const int64_t total = out.numel();
  if (total == 0) return;
  if (out.scalar_type() == at::kFloat && out.is_contiguous()) {
    fill_f32(out.data_ptr<float>(), m, total / m, offset, probe, seed);
    return;
  }
  auto tmp = torch::empty(out.sizes(), out.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  fill_f32(tmp.data_ptr<float>(), m, total / m, offset, probe, seed);
  out.copy_(tmp);
}

// z shaped and typed like `like` (contiguous) for global flat indices [offset, offset + numel).
torch::Tensor rademacher_probe_cpu(const torch::Tensor& like, int64_t offset, int64_t probe, int64_t seed,
                                   bool batched) {
  check_probe(like, offset, probe, seed, batched, "rademacher_probe");
  auto out = torch::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  rademacher_fill_cpu(out, offset, probe, seed, batched);
  return out;
}

void hutchinson_accumulate_cpu(torch::Tensor mean, torch::Tensor m2, const torch::Tensor& hz, int64_t offset,
                               int64_t probe, int64_t seed, int64_t count) {
  check_acc(mean, m2, hz, offset, probe, seed, count, 1, "hutchinson_accumulate");
  TORCH_CHECK_VALUE(hz.numel() == mean.numel(), "hutchinson_accumulate: hz has ", hz.numel(), " elements, mean has ",
                    mean.numel());
  accumulate_impl(mean, m2, hz, 1, offset, probe, seed, count);
}

void hutchinson_accumulate_batched_cpu(torch::Tensor mean, torch::Tensor m2, const torch::Tensor& hz,
                                       int64_t offset, int64_t probe, int64_t seed, int64_t count) {
  TORCH_CHECK_VALUE(hz.dim() >= 1, "hutchinson_accumulate_batched: hz must be [m, ...] with m probes in dimension 0");
  const int64_t m = hz.size(0);
  check_acc(mean, m2, hz, offset, probe, seed, count, m, "hutchinson_accumulate_batched");
  TORCH_CHECK_VALUE(m == 0 || hz.numel() / m == mean.numel(), "hutchinson_accumulate_batched: each row of hz must ",
                    "have mean.numel() = ", mean.numel(), " elements, got hz of shape ", hz.sizes());
  accumulate_impl(mean, m2, hz, m, offset, probe, seed, count);
}

void bind_probes(pybind11::module_& m) {
  m.def("rademacher_fill_cpu", &rademacher_fill_cpu, "Rademacher probes written in place (batched: row j = probe + j)",
        pybind11::arg("out"), pybind11::arg("offset"), pybind11::arg("probe"), pybind11::arg("seed"),
        pybind11::arg("batched") = false);
  m.def("rademacher_probe_cpu", &rademacher_probe_cpu, "Rademacher probes shaped like a tensor (batched: row j = "
        "probe + j)", pybind11::arg("like"), pybind11::arg("offset"), pybind11::arg("probe"), pybind11::arg("seed"),
        pybind11::arg("batched") = false);
  m.def("hutchinson_accumulate_cpu", &hutchinson_accumulate_cpu, "Fused z*Hz Welford update (in place)");
  m.def("hutchinson_accumulate_batched_cpu", &hutchinson_accumulate_batched_cpu,
        "Fused z*Hz Welford update for m probes (hz [m, ...]; in place)");
}

}  // namespace sapsel
