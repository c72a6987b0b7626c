"""A second install_hooks(feed=...) after a first install without it is refused, not dropped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import elasticep_sglang  # noqa: F401
except ImportError:  # an editable install made before adapters/ existed does not map it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))

try:
    import sglang  # noqa: F401

    _MISSING = ""
except ImportError as exc:
    _MISSING = f"sglang is not importable ({exc}); install the sglang extra"

pytestmark = [pytest.mark.sglang, pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "-")]


def test_feed_after_first_install_is_refused() -> None:
    from elasticep_sglang.active_ranks import ActiveRanksFeed
    from elasticep_sglang.hooks import HooksAlreadyInstalled, install_hooks, uninstall_hooks

    from elasticep.errors import ElasticEPError

    uninstall_hooks()
    try:
        first = install_hooks()
        assert install_hooks() is first  # a plain repeat is still idempotent
        feed = ActiveRanksFeed()
        with pytest.raises(HooksAlreadyInstalled, match="already installed") as info:
            install_hooks(feed=feed)
        assert isinstance(info.value, ElasticEPError)
        uninstall_hooks()
        with_feed = install_hooks(feed=feed)
        assert with_feed.step is not None and with_feed.step.feed is feed
        assert install_hooks(feed=feed) is with_feed
    finally:
        uninstall_hooks()
