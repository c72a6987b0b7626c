// The EPLB planner's replan core (elasticep.eplb.planner) in C++; see eplb_planner.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace elasticep {

// Registers `eplb_plan_core` on the extension module.
void register_eplb_planner(pybind11::module_& m);

}  // namespace elasticep
