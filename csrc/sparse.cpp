// CPU kernels: sparse ops on selected coordinates (functional gather / scatter-add, fused masked-SAM norm and
// perturbation, sparse SGD and AdamW steps). Formulas and contracts: sapsel_kernels/reference/sparse.py.
//
// Shared layout: each tensor's selection is a strictly ascending int64 index list into the flattened tensor; the
// multi-tensor kernels walk the entries of all tensors in one at::parallel_for (for_each_segment: at most one chunk
// per thread, >= kGrain entries each); entry j touches only element idx[j] of its tensor and entry j of its state
// buffers, so chunks never write the same element. Arithmetic in at::opmath_type (float for
// float/half/bfloat16, double for double); stores cast back to the tensor's dtype. Every call validates all its
// inputs, every index entry included (validate_indices), before the first write, so a bad call raises and leaves
// every tensor untouched.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
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

void check_floating(const at::Tensor& t, const char* op, const std::string& what) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", what,
                    " must be float32/float64/float16/bfloat16, got ", s);
}

std::string nth(const char* name, size_t i) { return c10::str(name, "[", i, "]"); }

void check_state(const at::Tensor& s, int64_t k, at::ScalarType dtype, const char* op, const std::string& what) {
  SAPSEL_CHECK_CPU(s);
  TORCH_CHECK_VALUE(s.is_contiguous() && s.dim() == 1 && s.numel() == k, op, ": ", what, " must be contiguous 1-D with ",
                    k, " entries (one per selected index), got shape ", s.sizes());
  TORCH_CHECK_VALUE(s.scalar_type() == dtype, op, ": ", what, " must have dtype ", dtype, ", got ", s.scalar_type());
}

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------------------------------------------
// Index validation: the one place the C++ kernels check index lists, run on every call before the first write.
// Entry j of list i must satisfy off_i <= idx[i][j] < off_i + n_i and idx[i][j] > idx[i][j - 1] (strictly ascending:
// the kernels write without atomics, and the optimizer state entry j belongs to one coordinate). The pass reads each
// list once, sequentially, split into the same per-thread chunks as the kernels; a chunk only raises a flag, and a
// serial rescan names the first bad entry, so the common (valid) case costs one streaming read of 8k bytes, small next
// to the kernels' k random accesses. Measured on the 2-core box (1e7 parameters in 4 tensors, 1% selected, 2 threads):
// the pass alone ~0.03 ms (0.3 ns per entry), against 0.25-0.5 ms for sam_perturb / sparse_sgd_step / sam_grad_sqnorm
// themselves: with and without it their medians differ by -1% .. +4%, within the noise.
// Errors, identical on the reference and Triton paths (reference/sparse.py: check_indices):
//   IndexError  "<op>: idx[i][j] = v is out of range [lo, hi) (params[i] has n elements at offset off)"
//   ValueError  "<op>: idx[i] must be strictly ascending (sorted, no duplicates): idx[i][j] = v follows
//                idx[i][j-1] = u"
// A functional op (one index list, no offset) names its entries idx[j] and the tensor `flat`.
// ---------------------------------------------------------------------------------------------------------------
struct IndexLists {
  const char* op;
  const char* target;  // what the indices address: "params", "grads" or "flat"
  bool single;         // one list (functional ops): entries are named idx[j]
  const TensorList& idx;
  std::vector<int64_t> numel, offset;
};

std::string idx_name(const IndexLists& L, size_t i) { return L.single ? std::string("idx") : nth("idx", i); }

std::string entry_name(const IndexLists& L, size_t i, int64_t j) { return c10::str(idx_name(L, i), "[", j, "]"); }

// offset <= v < offset + n without overflow (offset >= 0 and offset + n <= INT64_MAX are checked first): v < offset
// wraps to >= 2^63 as an unsigned difference
inline bool out_of_range(int64_t v, uint64_t off, uint64_t n) { return static_cast<uint64_t>(v) - off >= n; }

void raise_first_bad(const IndexLists& L) {
  for (size_t i = 0; i < L.idx.size(); ++i) {
    const int64_t* ix = L.idx[i].data_ptr<int64_t>();
    const int64_t k = L.idx[i].numel(), off = L.offset[i], n = L.numel[i];
    for (int64_t j = 0; j < k; ++j) {
      if (out_of_range(ix[j], off, n)) {
        if (L.single) {
          TORCH_CHECK_INDEX(false, L.op, ": ", entry_name(L, i, j), " = ", ix[j], " is out of range [0, ", n, ") (",
                            L.target, " has ", n, " elements)");
        }
        TORCH_CHECK_INDEX(false, L.op, ": ", entry_name(L, i, j), " = ", ix[j], " is out of range [", off, ", ",
                          off + n, ") (", nth(L.target, i), " has ", n, " elements at offset ", off, ")");
      }
      TORCH_CHECK_VALUE(j == 0 || ix[j] > ix[j - 1], L.op, ": ", idx_name(L, i),
                        " must be strictly ascending (sorted, no duplicates): ", entry_name(L, i, j), " = ", ix[j],
                        " follows ", entry_name(L, i, j - 1), " = ", ix[j - 1]);
    }
  }
  TORCH_CHECK(false, L.op, ": internal error, an index chunk was flagged but no bad entry was found");
}

// Metadata of every list, then the values of every list: nothing is written before all of it passed.
void validate_indices(const IndexLists& L) {
  for (size_t i = 0; i < L.idx.size(); ++i) {
    const at::Tensor& t = L.idx[i];
    TORCH_CHECK_VALUE(t.device().is_cpu(), L.op, ": ", idx_name(L, i), " must be a CPU tensor, got ", t.device());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() == 1, L.op, ": ", idx_name(L, i),
                      " must be a 1-D int64 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), L.op, ": ", idx_name(L, i), " must be contiguous");
    TORCH_CHECK_VALUE(L.offset[i] >= 0 && L.offset[i] <= std::numeric_limits<int64_t>::max() - L.numel[i], L.op,
                      ": offsets[", i, "] = ", L.offset[i], " must be >= 0 and offset + numel (", L.numel[i],
                      ") must fit in int64");
  }
  const Segments sg = segments_of(L.idx);
  std::vector<uint8_t> bad(static_cast<size_t>(sg.chunks), 0);
  for_each_segment(sg, [&](int64_t c, size_t i, int64_t b, int64_t e) {
    const int64_t* ix = L.idx[i].data_ptr<int64_t>();
    const uint64_t off = static_cast<uint64_t>(L.offset[i]), n = static_cast<uint64_t>(L.numel[i]);
    // strictly ascending inside [b - 1, e) with both ends of the chunk in range puts every entry in range: one
    // compare per entry
    bool any = out_of_range(ix[b], off, n) || out_of_range(ix[e - 1], off, n) || (b > 0 && ix[b] <= ix[b - 1]);
    for (int64_t j = b + 1; j < e; ++j) any |= ix[j] <= ix[j - 1];
    bad[static_cast<size_t>(c)] |= static_cast<uint8_t>(any);
  });
  for (const uint8_t f : bad) {
    if (f) raise_first_bad(L);
  }
}

// The mutated tensors of one call must not share memory: the chunks of the parallel region would then write one
// element from two threads (a data race, and results that differ from the sequential reference).
void check_disjoint(const TensorList& ts, const char* op, const char* what) {
  std::vector<std::pair<uintptr_t, size_t>> spans;  // (first byte, position in the list)
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].numel()) spans.emplace_back(reinterpret_cast<uintptr_t>(ts[i].data_ptr()), i);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t s = 1; s < spans.size(); ++s) {
    const at::Tensor& prev = ts[spans[s - 1].second];
    const uintptr_t prev_end = spans[s - 1].first + static_cast<uintptr_t>(prev.numel() * prev.element_size());
    TORCH_CHECK_VALUE(spans[s].first >= prev_end, op, ": ", nth(what, spans[s - 1].second), " and ",
                      nth(what, spans[s].second), " overlap in memory (the same tensor twice in one call?)");
  }
}

// params[i] (mutated in place: contiguous), grads[i] (same dtype/numel, contiguous), idx[i] - offsets[i] (into the
// flattened tensor). Metadata of every tensor first, then the values of every index list.
void check_lists(const char* op, const TensorList& params, const TensorList& grads, const TensorList& idx,
                 const std::vector<int64_t>& offsets, bool mutates) {
  TORCH_CHECK_VALUE(params.size() == grads.size() && params.size() == idx.size() && params.size() == offsets.size(),
                    op, ": params, grads, idx and offsets must have one entry per parameter tensor (got ",
                    params.size(), ", ", grads.size(), ", ", idx.size(), ", ", offsets.size(), ")");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& w = params[i];
    const auto& g = grads[i];
    SAPSEL_CHECK_CPU(w);
    SAPSEL_CHECK_CPU(g);
    check_floating(w, op, nth("params", i));
    TORCH_CHECK_VALUE(!mutates || w.is_contiguous(), op, ": params[", i, "] must be contiguous");
    TORCH_CHECK_VALUE(g.is_contiguous(), op, ": grads[", i, "] must be contiguous");
    TORCH_CHECK_VALUE(g.scalar_type() == w.scalar_type() && g.numel() == w.numel(), op, ": grads[", i,
                      "] must match params[", i, "] in dtype and size, got ", g.scalar_type(), " ", g.sizes(),
                      " and ", w.scalar_type(), " ", w.sizes());
  }
  if (mutates) check_disjoint(params, op, "params");
}

void validate_list_indices(const char* op, const TensorList& params, const TensorList& idx,
                           const std::vector<int64_t>& offsets) {
  IndexLists L{op, "params", false, idx, {}, offsets};
  for (const auto& w : params) L.numel.push_back(w.numel());
  validate_indices(L);
}

}  // namespace

// ------------------------------------------------------------------------------------------ functional ops
namespace {
// flat: CPU, 1-D, floating; idx: validated against [0, flat.numel()).
void check_flat(const at::Tensor& flat, const at::Tensor& idx, const char* op) {
  SAPSEL_CHECK_CPU(flat);
  TORCH_CHECK_VALUE(flat.dim() == 1, op, ": flat must be 1-D, got shape ", flat.sizes());
  check_floating(flat, op, "flat");
  const TensorList one{idx};
  validate_indices(IndexLists{op, "flat", true, one, {flat.numel()}, {0}});
}
}  // namespace

at::Tensor sparse_gather_cpu(const at::Tensor& flat_in, const at::Tensor& idx) {
  check_flat(flat_in, idx, "sparse_gather");
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
  SAPSEL_CHECK_CPU(vals_in);
  TORCH_CHECK_VALUE(vals_in.dim() == 1 && vals_in.numel() == idx.numel() && vals_in.scalar_type() == flat.scalar_type(),
                    "sparse_scatter_add: vals must match flat's dtype and have one entry per index (1-D), got ",
                    vals_in.scalar_type(), " of shape ", vals_in.sizes(), " for ", idx.numel(), " indices");
  check_flat(flat, idx, "sparse_scatter_add");
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
  // idx is validated in both modes (full ignores it), so a call is either valid or rejected whatever `full` is
  check_lists("sam_grad_sqnorm", params, grads, idx, offsets, /*mutates=*/false);
  validate_list_indices("sam_grad_sqnorm", params, idx, offsets);
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
  const char* op = "sam_perturb";
  check_lists(op, params, grads, idx, offsets, /*mutates=*/true);
  TORCH_CHECK_VALUE(saved.size() == params.size(), op, ": saved must have one entry per parameter tensor (got ",
                    saved.size(), " for ", params.size(), ")");
  for (size_t i = 0; i < params.size(); ++i) {
    check_state(saved[i], idx[i].numel(), params[i].scalar_type(), op, nth("saved", i));
  }
  validate_list_indices(op, params, idx, offsets);
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
  const char* op = "sparse_sgd_step";
  check_lists(op, params, grads, idx, offsets, /*mutates=*/true);
  const bool has_mom = momentum != 0.0, has_saved = !saved.empty();
  TORCH_CHECK_VALUE(!has_mom || bufs.size() == params.size(), op,
                    ": momentum_buffers must have one entry per parameter tensor when momentum != 0 (got ", bufs.size(),
                    " for ", params.size(), ")");
  TORCH_CHECK_VALUE(!has_saved || saved.size() == params.size(), op,
                    ": saved must be empty or have one entry per parameter tensor (got ", saved.size(), " for ",
                    params.size(), ")");
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t k = idx[i].numel();
    if (has_mom) check_state(bufs[i], k, acc_type(params[i].scalar_type()), op, nth("momentum_buffers", i));
    if (has_saved) check_state(saved[i], k, params[i].scalar_type(), op, nth("saved", i));
  }
  validate_list_indices(op, params, idx, offsets);
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
  const char* op = "sparse_adamw_step";
  check_lists(op, params, grads, idx, offsets, /*mutates=*/true);
  TORCH_CHECK_VALUE(step >= 1, op, ": step must be >= 1, got ", step);
  const bool has_saved = !saved.empty();
  TORCH_CHECK_VALUE(exp_avg.size() == params.size() && exp_avg_sq.size() == params.size(), op,
                    ": exp_avg and exp_avg_sq must have one entry per parameter tensor (got ", exp_avg.size(), " and ",
                    exp_avg_sq.size(), " for ", params.size(), ")");
  TORCH_CHECK_VALUE(!has_saved || saved.size() == params.size(), op,
                    ": saved must be empty or have one entry per parameter tensor (got ", saved.size(), " for ",
                    params.size(), ")");
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t k = idx[i].numel();
    const auto a = acc_type(params[i].scalar_type());
    check_state(exp_avg[i], k, a, op, nth("exp_avg", i));
    check_state(exp_avg_sq[i], k, a, op, nth("exp_avg_sq", i));
    if (has_saved) check_state(saved[i], k, params[i].scalar_type(), op, nth("saved", i));
  }
  validate_list_indices(op, params, idx, offsets);
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
