"""Which SGLang releases this adapter supports, and the typed errors for the others.

The hooks patch module attributes of SGLang's EPLB and elastic-EP code
(``sglang.srt.eplb.eplb_algorithms.rebalance_experts``,
``sglang.srt.elastic_ep.elastic_ep.maybe_rebalance_after_rank_fault``) and build
``ExpertLocationMetadata`` through its own helpers; those are internal interfaces that SGLang
changes between minor releases, so the adapter refuses to install on a release it was not
checked against instead of failing somewhere inside a rebalance.
"""

from __future__ import annotations

import re
from importlib import metadata

from elasticep.errors import ElasticEPError, UnsupportedEngineVersion

__all__ = [
    "INSTALL_ADVICE",
    "SUPPORTED_SGLANG",
    "SGLangNotInstalled",
    "UnsupportedSGLangVersion",
    "check_sglang_version",
    "installed_sglang_version",
]

#: The SGLang releases the hooks were written and tested against (a PEP 440 specifier).
SUPPORTED_SGLANG = ">=0.5.23,<0.6"

_LOW = (0, 5, 23)
_HIGH = (0, 6)


#: What to run when SGLang is missing. SGLang pins a CUDA build of torch, so the ``sglang`` extra
#: replaces whatever torch is installed; where that torch must stay (a CPU-only host, another
#: CUDA build), install SGLang without its dependencies, as ``scripts/setup.sh`` does.
INSTALL_ADVICE = (
    "on a GPU host whose torch is the build SGLang pins: pip install 'elasticep[sglang]'; "
    f"to keep the torch you have (CPU-only, or another CUDA build): pip install --no-deps 'sglang{SUPPORTED_SGLANG}' "
    "and then the few packages its EPLB modules import "
    "(pip install orjson psutil pybase64 requests triton packaging pillow starlette pydantic tqdm ipython aiohttp "
    "zstandard; "
    "see docs/sglang.md)"
)


class SGLangNotInstalled(ElasticEPError, ImportError):
    """``sglang`` cannot be imported; the message says what to install (:data:`INSTALL_ADVICE`)."""


class UnsupportedSGLangVersion(UnsupportedEngineVersion):
    """The installed SGLang is outside :data:`SUPPORTED_SGLANG`.

    Attributes:
        found: the installed version string.
        supported: the specifier the adapter supports.
    """

    def __init__(self, found: str, supported: str = SUPPORTED_SGLANG) -> None:
        super().__init__(
            "sglang", found, supported,
            f"elasticep_sglang supports sglang{supported}, found sglang {found}; "
            f"install a supported release (pip install --no-deps 'sglang{supported}' keeps the torch you have) "
            "or run SGLang without the hooks"
        )


def installed_sglang_version() -> str:
    """The installed SGLang's version string; raises :class:`SGLangNotInstalled` if absent."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        pass
    try:
        import sglang
    except ImportError as exc:
        raise SGLangNotInstalled(f"sglang is not importable ({exc}); {INSTALL_ADVICE}") from exc
    version = getattr(sglang, "__version__", None)
    if not version:
        raise SGLangNotInstalled(f"sglang is importable but reports no version (a broken install?); {INSTALL_ADVICE}")
    return str(version)


def _release(version: str) -> tuple[int, ...]:
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    if m is None:
        raise UnsupportedSGLangVersion(version)
    return tuple(int(x) for x in m.group(1).split("."))


def check_sglang_version(version: str | None = None) -> str:
    """Check ``version`` (default: the installed SGLang's) against :data:`SUPPORTED_SGLANG`.

    Pre-releases and local builds of a supported release (``0.5.23rc1``, ``0.5.23+cu130``) count
    as that release. Returns the version string; raises :class:`UnsupportedSGLangVersion` outside
    the range and :class:`SGLangNotInstalled` when SGLang is missing.
    """
    found = installed_sglang_version() if version is None else version
    release = _release(found)
    padded = release + (0,) * (3 - len(release))
    if not (_LOW <= padded[:3] and padded[:2] < _HIGH):
        raise UnsupportedSGLangVersion(found)
    return found
