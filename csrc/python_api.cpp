// One pybind11 entry point; each subsystem registers itself here.
#include <pybind11/pybind11.h>

#include "eplb_planner.h"
#include "ep_kernel.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "elasticep CPU data-plane kernel and EPLB planner core";
  m.attr("ABI_VERSION") = 1;
  elasticep::register_ep_kernel(m);
  elasticep::register_eplb_planner(m);
}
