// CPU kernels: topk. (filled in by the topk work; bind_topk registers them on the _C module)
#include "common.h"

namespace sapsel {

void bind_topk(pybind11::module_& m) { (void)m; }

}  // namespace sapsel
