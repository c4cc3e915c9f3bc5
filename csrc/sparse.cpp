// CPU kernels: sparse ops on selected coordinates (functional gather / scatter-add, fused masked-SAM norm and
// perturbation, sparse SGD and AdamW steps). Formulas and contracts: sapsel_kernels/reference/sparse.py.
//
// Shared layout: each tensor's selection is an ascending, unique int64 index list into the flattened tensor; the
// multi-tensor kernels walk the entries of all tensors in one at::parallel_for (for_each_segment: at most one chunk
// per thread, >= kGrain entries each); entry j touches only element idx[j] of its tensor and entry j of its state
// buffers, so chunks never write the same element. Arithmetic in at::opmath_type (float for
// float/half/bfloat16, double for double); stores cast back to the tensor's dtype. All inputs are validated before
// the first write, so a bad call leaves every tensor untouched.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace sapsel {
namespace {

// ~30k random gathers (~0.1 ms) per task: below that, waking threads costs more than it saves
constexpr int64_t kGrain = 32768;

using TensorList = std::vector<at::Tensor>;

// Software prefetch kAhead entries ahead. The selected coordinates are scattered (at 1% of a 1e8-parameter model each
// one sits on its own cache line), so these loops are bound by memory latency, not bandwidth; issuing the loads of
// entry j + kAhead while working on entry j keeps ~kAhead misses in flight instead of the few the core finds itself.
constexpr int64_t kAhead = 32;
// Measured on the 2-core CPU box (1e8 parameters, 1% selected, one thread): perturb 48 -> 40 ms, SGD step 80 -> 61 ms.
#if defined(__GNUC__) || defined(__clang__)
#define SAPSEL_PREFETCH_R(ptr) __builtin_prefetch((ptr), 0, 1)
#define SAPSEL_PREFETCH_W(ptr) __builtin_prefetch((ptr), 1, 1)
#else
#define SAPSEL_PREFETCH_R(ptr) ((void)(ptr))
#define SAPSEL_PREFETCH_W(ptr) ((void)(ptr))
#endif

void check_floating(const at::Tensor& t, const char* what) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, what,
                    " must be float32/float64/float16/bfloat16, got ", s);
}

// idx: CPU, contiguous, 1-D int64, ascending (so checking the ends bounds every entry); idx - off within [0, n).
void check_idx(const at::Tensor& idx, int64_t n, const char* what, int64_t off = 0) {
  SAPSEL_CHECK_CPU(idx);
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong && idx.dim() == 1, what, " must be a 1-D int64 tensor");
  TORCH_CHECK_VALUE(idx.is_contiguous(), what, " must be contiguous");
  const int64_t k = idx.numel();
  if (k) {
    const int64_t* p = idx.data_ptr<int64_t>();
    TORCH_CHECK_INDEX(p[0] - off >= 0 && p[k - 1] - off < n, what, " out of range [", off, ", ", off + n, ")");
  }
}

void check_state(const at::Tensor& s, int64_t k, at::ScalarType dtype, const char* what) {
  SAPSEL_CHECK_CPU(s);
  TORCH_CHECK_VALUE(s.is_contiguous() && s.dim() == 1 && s.numel() == k, what, " must be contiguous 1-D with ", k,
                    " entries, got shape ", s.sizes());
  TORCH_CHECK_VALUE(s.scalar_type() == dtype, what, " must have dtype ", dtype, ", got ", s.scalar_type());
}

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// params[i] (mutated in place: contiguous), grads[i] (same dtype/numel), idx[i] - offsets[i] (into the flattened
// tensor).
void check_lists(const TensorList& params, const TensorList& grads, const TensorList& idx,
                 const std::vector<int64_t>& offsets, bool param_contig, bool check_indices = true) {
  TORCH_CHECK_VALUE(params.size() == grads.size() && params.size() == idx.size() && params.size() == offsets.size(),
                    "params, grads, idx and offsets must have one entry per parameter tensor (", params.size(), ", ",
                    grads.size(), ", ", idx.size(), ", ", offsets.size(), ")");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& w = params[i];
    const auto& g = grads[i];
    SAPSEL_CHECK_CPU(w);
    SAPSEL_CHECK_CPU(g);
    check_floating(w, "params[i]");
    TORCH_CHECK_VALUE(!param_contig || w.is_contiguous(), "params[", i, "] must be contiguous");
    TORCH_CHECK_VALUE(g.is_contiguous(), "grads[", i, "] must be contiguous");
    TORCH_CHECK_VALUE(g.scalar_type() == w.scalar_type() && g.numel() == w.numel(), "grads[", i,
                      "] must match params[", i, "] in dtype and size");
    if (check_indices) check_idx(idx[i], w.numel(), "idx[i]", offsets[i]);
  }
}

// The entries of all tensors (k_0 + k_1 + ...) split into `chunks` equal ranges, one at::parallel_for over the chunks:
// body(c, i, b, e) handles entries [b, e) of tensor i inside chunk c. A selection spread over many tensors (1% of 8
// tensors of 1.25e6 is 12.5k entries each, under kGrain) still splits across threads, and a call costs one parallel
// region instead of one per tensor. Chunk boundaries depend only on the sizes and the thread count, so per-chunk
// partial sums combined in chunk order are deterministic for a given thread count.
struct Segments {
  std::vector<int64_t> ks, start;
  int64_t chunks = 0;
};

Segments segments_of(const TensorList& idx) {
  Segments sg;
  sg.start.assign(idx.size() + 1, 0);
  for (size_t i = 0; i < idx.size(); ++i) {
    sg.ks.push_back(idx[i].numel());
    sg.start[i + 1] = sg.start[i] + sg.ks[i];
  }
  const int64_t total = sg.start.back();
  const int64_t by_size = (total + kGrain - 1) / kGrain;
  sg.chunks = total == 0 ? 0 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_size));
  return sg;
}

template <typename F>
void for_each_segment(const Segments& sg, const F& body) {
  if (sg.chunks == 0) return;
  const int64_t total = sg.start.back();
  at::parallel_for(0, sg.chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t b = total * c / sg.chunks;
      const int64_t e = total * (c + 1) / sg.chunks;
      size_t i = static_cast<size_t>(std::upper_bound(sg.start.begin(), sg.start.end(), b) - sg.start.begin()) - 1;
      while (b < e) {
        const int64_t end = std::min(e, sg.start[i + 1]);
        if (end > b) body(c, i, b - sg.start[i], end - sg.start[i]);
        b = end;
        ++i;
      }
    }
  });
}

}  // namespace

// ------------------------------------------------------------------------------------------ functional ops
at::Tensor sparse_gather_cpu(const at::Tensor& flat_in, const at::Tensor& idx) {
  SAPSEL_CHECK_CPU(flat_in);
  TORCH_CHECK_VALUE(flat_in.dim() == 1, "flat must be 1-D");
  check_floating(flat_in, "flat");
  check_idx(idx, flat_in.numel(), "idx");
  const at::Tensor flat = flat_in.contiguous();
  const int64_t k = idx.numel();
  at::Tensor out = at::empty({k}, flat.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "sparse_gather_cpu", [&] {
    const scalar_t* f = flat.data_ptr<scalar_t>();
    const int64_t* ix = idx.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, k, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) o[j] = f[ix[j]];
    });
  });
  return out;
}

at::Tensor sparse_scatter_add_cpu(const at::Tensor& flat, const at::Tensor& idx, const at::Tensor& vals_in) {
  SAPSEL_CHECK_CPU(flat);
  SAPSEL_CHECK_CPU(vals_in);
  TORCH_CHECK_VALUE(flat.dim() == 1, "flat must be 1-D");
  check_floating(flat, "flat");
  check_idx(idx, flat.numel(), "idx");
  TORCH_CHECK_VALUE(vals_in.dim() == 1 && vals_in.numel() == idx.numel() && vals_in.scalar_type() == flat.scalar_type(),
                    "vals must be 1-D with one entry per index and flat's dtype");
  const at::Tensor vals = vals_in.contiguous();
  at::Tensor out = flat.clone(at::MemoryFormat::Contiguous);
  const int64_t k = idx.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "sparse_scatter_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* v = vals.data_ptr<scalar_t>();
    const int64_t* ix = idx.data_ptr<int64_t>();
    at::parallel_for(0, k, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        o[ix[j]] = static_cast<scalar_t>(static_cast<acc_t>(o[ix[j]]) + static_cast<acc_t>(v[j]));
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------ SAM: norm
// out[i] = sum_j (t_j g_j)^2 over idx[i] (or the whole tensor when full), t = |w| + eta if adaptive else 1.
// Per-task partials combined by parallel_reduce (deterministic for a fixed thread count).
at::Tensor sam_grad_sqnorm_cpu(const TensorList& grads, const TensorList& params, const TensorList& idx,
                               const std::vector<int64_t>& offsets, double eta, bool adaptive, bool full) {
  check_lists(params, grads, idx, offsets, /*param_contig=*/false, /*check_indices=*/!full);
  bool any_double = false;
  for (const auto& g : grads) any_double |= g.scalar_type() == at::kDouble;
  const size_t nt = grads.size();
  std::vector<double> res(nt, 0.0);
  std::vector<at::Tensor> ws(nt);
  for (size_t i = 0; i < nt; ++i) {
    if (adaptive) ws[i] = params[i].contiguous();
  }
  // sum over entries [b, e) of tensor i: the selected ones (ix != nullptr) or all of them
  auto partial = [&](size_t i, int64_t b, int64_t e, int64_t k, const int64_t* ix) -> double {
    double out = 0.0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[i].scalar_type(), "sam_grad_sqnorm_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = grads[i].data_ptr<scalar_t>();
      const scalar_t* wp = adaptive ? ws[i].data_ptr<scalar_t>() : nullptr;
      const int64_t off = offsets[i];
      const acc_t et = static_cast<acc_t>(eta);
      acc_t acc = 0;
      for (int64_t j = b; j < e; ++j) {
        if (ix && j + kAhead < k) {
          SAPSEL_PREFETCH_R(gp + (ix[j + kAhead] - off));
          if (adaptive) SAPSEL_PREFETCH_R(wp + (ix[j + kAhead] - off));
        }
        const int64_t p = ix ? ix[j] - off : j;
        acc_t v = static_cast<acc_t>(gp[p]);
        if (adaptive) v *= std::abs(static_cast<acc_t>(wp[p])) + et;
        acc += v * v;
      }
      out = static_cast<double>(acc);
    });
    return out;
  };
  if (full) {  // SSAM's norm over whole gradients: dense, per tensor
    for (size_t i = 0; i < nt; ++i) {
      const int64_t n = grads[i].numel();
      if (n == 0) continue;
      res[i] = at::parallel_reduce(
          0, n, kGrain, 0.0, [&](int64_t b, int64_t e, double acc) { return acc + partial(i, b, e, n, nullptr); },
          [](double x, double y) { return x + y; });
    }
  } else {  // selected entries of all tensors in one parallel region; chunk partials summed in chunk order
    const Segments sg = segments_of(idx);
    std::vector<double> part(static_cast<size_t>(sg.chunks) * nt, 0.0);
    for_each_segment(sg, [&](int64_t c, size_t i, int64_t b, int64_t e) {
      part[static_cast<size_t>(c) * nt + i] = partial(i, b, e, sg.ks[i], idx[i].data_ptr<int64_t>());
    });
    for (int64_t c = 0; c < sg.chunks; ++c) {
      for (size_t i = 0; i < nt; ++i) res[i] += part[static_cast<size_t>(c) * nt + i];
    }
  }
  at::Tensor out = at::empty({static_cast<int64_t>(nt)}, at::TensorOptions().dtype(at::kDouble));
  for (size_t i = 0; i < nt; ++i) out.data_ptr<double>()[i] = res[i];
  return any_double ? out : out.to(at::kFloat);
}

// ------------------------------------------------------------------------------------------ SAM: perturb
// saved[i][j] = w[idx[j]] (bit copy); w[idx[j]] += scale * g (ASAM: scale * (|w| + eta)^2 * g).
void sam_perturb_cpu(const TensorList& params, const TensorList& grads, const TensorList& idx,
                     const std::vector<int64_t>& offsets, const TensorList& saved, double scale, double eta,
                     bool adaptive) {
  check_lists(params, grads, idx, offsets, /*param_contig=*/true);
  TORCH_CHECK_VALUE(saved.size() == params.size(), "saved must have one entry per parameter tensor");
  for (size_t i = 0; i < params.size(); ++i) check_state(saved[i], idx[i].numel(), params[i].scalar_type(), "saved[i]");
  const Segments sg = segments_of(idx);
  for_each_segment(sg, [&](int64_t, size_t i, int64_t b, int64_t e) {
    const int64_t k = sg.ks[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "sam_perturb_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* w = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].data_ptr<scalar_t>();
      const int64_t* ix = idx[i].data_ptr<int64_t>();
      const int64_t off = offsets[i];
      scalar_t* sv = saved[i].data_ptr<scalar_t>();
      const acc_t sc = static_cast<acc_t>(scale), et = static_cast<acc_t>(eta);
      for (int64_t j = b; j < e; ++j) {
        if (j + kAhead < k) {
          SAPSEL_PREFETCH_R(g + (ix[j + kAhead] - off));
          SAPSEL_PREFETCH_W(w + (ix[j + kAhead] - off));
        }
        const int64_t p = ix[j] - off;
        const scalar_t w0 = w[p];
        sv[j] = w0;
        const acc_t wa = static_cast<acc_t>(w0);
        acc_t d = static_cast<acc_t>(g[p]) * sc;
        if (adaptive) {
          const acc_t t = std::abs(wa) + et;
          d = d * (t * t);
        }
        w[p] = static_cast<scalar_t>(wa + d);
      }
    });
  });
}

// ------------------------------------------------------------------------------------------ SGD step
// torch.optim.SGD on the selected entries, starting from saved[i][j] (SAM restore fused) or w[idx[j]].
void sparse_sgd_step_cpu(const TensorList& params, const TensorList& grads, const TensorList& idx,
                         const std::vector<int64_t>& offsets, const TensorList& bufs, const TensorList& saved,
                         double lr, double momentum, double dampening,
                         double weight_decay, bool nesterov, bool first, double inv_scale) {
  check_lists(params, grads, idx, offsets, /*param_contig=*/true);
  const bool has_mom = momentum != 0.0, has_saved = !saved.empty();
  TORCH_CHECK_VALUE(!has_mom || bufs.size() == params.size(), "momentum_buffers must have one entry per tensor");
  TORCH_CHECK_VALUE(!has_saved || saved.size() == params.size(), "saved must be empty or have one entry per tensor");
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t k = idx[i].numel();
    if (has_mom) check_state(bufs[i], k, acc_type(params[i].scalar_type()), "momentum_buffers[i]");
    if (has_saved) check_state(saved[i], k, params[i].scalar_type(), "saved[i]");
  }
  const Segments sg = segments_of(idx);
  for_each_segment(sg, [&](int64_t, size_t i, int64_t b, int64_t e) {
    const int64_t k = sg.ks[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "sparse_sgd_step_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* w = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].data_ptr<scalar_t>();
      const int64_t* ix = idx[i].data_ptr<int64_t>();
      const int64_t off = offsets[i];
      acc_t* bf = has_mom ? bufs[i].data_ptr<acc_t>() : nullptr;
      const scalar_t* sv = has_saved ? saved[i].data_ptr<scalar_t>() : nullptr;
      const acc_t lr_ = lr, mom = momentum, damp1 = 1.0 - dampening, wd = weight_decay, inv = inv_scale;
      for (int64_t j = b; j < e; ++j) {
        if (j + kAhead < k) {
          SAPSEL_PREFETCH_R(g + (ix[j + kAhead] - off));
          SAPSEL_PREFETCH_W(w + (ix[j + kAhead] - off));
        }
        const int64_t p = ix[j] - off;
        const acc_t w0 = static_cast<acc_t>(has_saved ? sv[j] : w[p]);
        acc_t d = static_cast<acc_t>(g[p]) * inv;
        if (weight_decay != 0.0) d = d + wd * w0;
        if (has_mom) {
          const acc_t buf = first ? d : bf[j] * mom + damp1 * d;
          bf[j] = buf;
          d = nesterov ? d + mom * buf : buf;
        }
        w[p] = static_cast<scalar_t>(w0 - lr_ * d);
      }
    });
  });
}

// ------------------------------------------------------------------------------------------ AdamW step
// torch.optim.AdamW (amsgrad=False) on the selected entries; step = 1-based count after this update.
void sparse_adamw_step_cpu(const TensorList& params, const TensorList& grads, const TensorList& idx,
                           const std::vector<int64_t>& offsets, const TensorList& exp_avg,
                           const TensorList& exp_avg_sq, const TensorList& saved, double lr,
                           double beta1, double beta2, double eps, double weight_decay, int64_t step,
                           double inv_scale) {
  check_lists(params, grads, idx, offsets, /*param_contig=*/true);
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1");
  const bool has_saved = !saved.empty();
  TORCH_CHECK_VALUE(exp_avg.size() == params.size() && exp_avg_sq.size() == params.size(),
                    "exp_avg and exp_avg_sq must have one entry per tensor");
  TORCH_CHECK_VALUE(!has_saved || saved.size() == params.size(), "saved must be empty or have one entry per tensor");
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t k = idx[i].numel();
    const auto a = acc_type(params[i].scalar_type());
    check_state(exp_avg[i], k, a, "exp_avg[i]");
    check_state(exp_avg_sq[i], k, a, "exp_avg_sq[i]");
    if (has_saved) check_state(saved[i], k, params[i].scalar_type(), "saved[i]");
  }
  const double step_size_d = lr / (1.0 - std::pow(beta1, static_cast<double>(step)));
  const double bc2_sqrt_d = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  const double decay_d = 1.0 - lr * weight_decay;
  const Segments sg = segments_of(idx);
  for_each_segment(sg, [&](int64_t, size_t i, int64_t b, int64_t e) {
    const int64_t k = sg.ks[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "sparse_adamw_step_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* w = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].data_ptr<scalar_t>();
      const int64_t* ix = idx[i].data_ptr<int64_t>();
      const int64_t off = offsets[i];
      acc_t* m = exp_avg[i].data_ptr<acc_t>();
      acc_t* v = exp_avg_sq[i].data_ptr<acc_t>();
      const scalar_t* sv = has_saved ? saved[i].data_ptr<scalar_t>() : nullptr;
      const acc_t b1c = 1.0 - beta1, b2 = beta2, b2c = 1.0 - beta2, ep = eps, inv = inv_scale;
      const acc_t step_size = step_size_d, bc2_sqrt = bc2_sqrt_d, decay = decay_d;
      for (int64_t j = b; j < e; ++j) {
        if (j + kAhead < k) {
          SAPSEL_PREFETCH_R(g + (ix[j + kAhead] - off));
          SAPSEL_PREFETCH_W(w + (ix[j + kAhead] - off));
        }
        const int64_t p = ix[j] - off;
        const acc_t w0 = static_cast<acc_t>(has_saved ? sv[j] : w[p]) * decay;
        const acc_t d = static_cast<acc_t>(g[p]) * inv;
        const acc_t mj = m[j] + b1c * (d - m[j]);
        const acc_t vj = v[j] * b2 + b2c * d * d;
        m[j] = mj;
        v[j] = vj;
        const acc_t denom = std::sqrt(vj) / bc2_sqrt + ep;
        w[p] = static_cast<scalar_t>(w0 - step_size * mj / denom);
      }
    });
  });
}

void bind_sparse(pybind11::module_& m) {
  m.def("sparse_gather_cpu", &sparse_gather_cpu, "flat[idx] (CPU)");
  m.def("sparse_scatter_add_cpu", &sparse_scatter_add_cpu, "copy of flat with vals added at idx (CPU)");
  m.def("sam_grad_sqnorm_cpu", &sam_grad_sqnorm_cpu, "per-tensor sum of (t*g)^2 over selected entries (CPU)");
  m.def("sam_perturb_cpu", &sam_perturb_cpu, "SAM/ASAM perturbation of selected entries, saving them (CPU)");
  m.def("sparse_sgd_step_cpu", &sparse_sgd_step_cpu, "SGD step on selected entries (CPU)");
  m.def("sparse_adamw_step_cpu", &sparse_adamw_step_cpu, "AdamW step on selected entries (CPU)");
}

}  // namespace sapsel
