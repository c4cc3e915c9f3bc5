// Python bindings of the CPU kernels. Each kernel file defines bind_<area>(m); the op layer in
// sapsel_kernels/ops/ registers these functions as the CPU implementations of the torch.library ops.
#include <torch/extension.h>

namespace sapsel {
void bind_common(pybind11::module_& m);
void bind_topk(pybind11::module_& m);
void bind_probes(pybind11::module_& m);
void bind_sparse(pybind11::module_& m);
}  // namespace sapsel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sapsel-kernels CPU kernels (C++/OpenMP)";
  sapsel::bind_common(m);
  sapsel::bind_topk(m);
  sapsel::bind_probes(m);
  sapsel::bind_sparse(m);
}
