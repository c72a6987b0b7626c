"""Errors shared across subsystems."""

from __future__ import annotations


class StaleEpoch(RuntimeError):
    """Something tagged with epoch ``got`` was refused: epoch ``current`` is installed (invariant 3).

    ``channel`` names where it came from (``"fence"``, ``"dispatch"``, ``"transfer"``,
    ``"collective"``, ``"bus"``); every refusal is also counted in
    ``elasticep_stale_epoch_refused_total{channel}`` by whoever refuses it.
    """

    def __init__(self, channel: str, got: int, current: int, message: str | None = None) -> None:
        super().__init__(message or f"{channel}: epoch {got} is older than the installed epoch {current}; refused")
        self.channel = channel
        self.got = got
        self.current = current
