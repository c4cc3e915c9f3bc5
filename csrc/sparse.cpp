// CPU kernels: sparse. (filled in by the sparse work; bind_sparse registers them on the _C module)
#include "common.h"

namespace sapsel {

void bind_sparse(pybind11::module_& m) { (void)m; }

}  // namespace sapsel
