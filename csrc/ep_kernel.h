// CPU expert-parallel dispatch/combine between the rank processes of one host.
//
// Ranks exchange tokens through one POSIX shared-memory segment per (cluster, epoch). Every wait
// on a peer is bounded by a per-call timeout; on expiry the peer's slot in the caller's
// `active_ranks` mask ([num_ranks] int32) is set to 0 with an atomic store and the peer is treated
// as having sent nothing, the contract Mooncake EP and DeepEP's shrink mode keep on GPUs.
#pragma once

#include <pybind11/pybind11.h>

namespace elasticep {

// Registers `KernelRuntime` and the segment helpers on the extension module.
void register_ep_kernel(pybind11::module_& m);

}  // namespace elasticep
