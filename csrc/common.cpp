// Small helpers exposed for tests: the Philox stream and the float keys, so that the three paths can be compared
// bit for bit (tests/test_philox.py).
#include "common.h"

namespace sapsel {

// z for global flat indices [offset, offset + n) of one probe, as float32.
torch::Tensor rademacher_cpu(int64_t n, int64_t offset, int64_t probe, int64_t seed) {
  TORCH_CHECK_VALUE(n >= 0, "rademacher: n must be >= 0, got ", n);
  check_index_range(offset, n, "rademacher");
  auto out = torch::empty({n}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = rademacher_at(offset + i, probe, seed);
  });
  return out;
}

int num_threads() { return at::get_num_threads(); }

void bind_common(pybind11::module_& m) {
  m.def("rademacher_cpu", &rademacher_cpu, "Rademacher probe values for a flat index range (reference layout)");
  m.def("num_threads", &num_threads);
}

}  // namespace sapsel
