"""Cluster credentials for the ZeroMQ bus: one CURVE keypair per rank and a read-only monitor key.

The launcher makes them once (:meth:`ClusterKeys.generate`) and gives each rank process only what
it needs (:meth:`ClusterKeys.for_rank`: its own secret key and every public key), through a file
(:meth:`save` / :meth:`load`, mode 0600) or an environment variable (:meth:`to_env` /
:meth:`from_env`). A monitoring tool gets :meth:`ClusterKeys.for_monitor`.

What each key can do:

* **A rank's secret key** lets a process serve that rank's PUB socket (peers pin the rank's public
  key, so only its holder completes their handshake: only it can publish *as that rank*) and
  subscribe to every other rank (their ZAP handlers accept member public keys).
* **The monitor secret key** lets a process subscribe to every rank. No rank subscribes to the
  monitor key, so it cannot publish anything anyone receives.
* **Public keys** are not secrets; they name who is in the cluster.
* **A rank's registration signing key** (Ed25519, derived from its CURVE secret key, so whoever
  holds one holds the other) signs the rank's record in the rendezvous store; every process checks
  the signature against ``sign_public`` here, never against anything in the record itself. The
  store is not authenticated, so this is what keeps a party that can write the store from
  pointing peers at an endpoint of its choosing.

Generate keys for the largest world the cluster may grow to: a rank without a keypair cannot join.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import zmq
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from elasticep.errors import InvalidArgument

KEYS_ENV = "ELASTICEP_BUS_KEYS"
"""Environment variable that carries a rank's keys as JSON (see :meth:`ClusterKeys.to_env`)."""

_FORMAT = 2
_SIGNING_CONTEXT = b"elasticep bus registration signing key v1\0"


class MissingKey(KeyError):
    """These credentials do not hold the secret key that was asked for."""


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE; the bus refuses to run unencrypted")


def _signing_key(curve_secret: bytes) -> Ed25519PrivateKey:
    """The Ed25519 key a rank signs its registrations with, derived from its CURVE secret key."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(_SIGNING_CONTEXT + curve_secret).digest())


def _sign_public_of(curve_secret: bytes) -> bytes:
    return _signing_key(curve_secret).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class ClusterKeys:
    """CURVE keys of a cluster, as Z85 text (40 ASCII bytes per key).

    ``public`` maps every rank that may ever be a member to its public key; ``secret`` holds the
    secret keys this holder may use (all of them only in the launcher); ``sign_public`` maps every
    rank to the raw 32-byte Ed25519 public key its rendezvous registrations are checked against.
    """

    public: Mapping[int, bytes]
    monitor_public: bytes
    secret: Mapping[int, bytes] = field(default_factory=dict)
    monitor_secret: bytes | None = None
    sign_public: Mapping[int, bytes] = field(default_factory=dict)

    @classmethod
    def generate(cls, world: int) -> "ClusterKeys":
        """Fresh keypairs for ranks ``0 .. world - 1`` and a monitor keypair (the launcher's copy)."""
        _require_curve()
        if world < 1:
            raise InvalidArgument("world must be >= 1")
        public: dict[int, bytes] = {}
        secret: dict[int, bytes] = {}
        for rank in range(world):
            public[rank], secret[rank] = zmq.curve_keypair()
        monitor_public, monitor_secret = zmq.curve_keypair()
        sign_public = {rank: _sign_public_of(key) for rank, key in secret.items()}
        return cls(public, monitor_public, secret, monitor_secret, sign_public)

    @property
    def world(self) -> int:
        """Number of ranks with a keypair (the largest world the cluster can reach)."""
        return len(self.public)

    def for_rank(self, rank: int) -> "ClusterKeys":
        """What rank ``rank``'s process gets: its own secret key and all public keys."""
        return ClusterKeys(
            dict(self.public), self.monitor_public, {rank: self.rank_secret(rank)}, None, dict(self.sign_public)
        )

    def for_monitor(self) -> "ClusterKeys":
        """What a monitoring tool gets: the monitor secret key and all public keys."""
        if self.monitor_secret is None:
            raise MissingKey("these credentials do not hold the monitor secret key")
        return ClusterKeys(dict(self.public), self.monitor_public, {}, self.monitor_secret, dict(self.sign_public))

    def rank_public(self, rank: int) -> bytes:
        try:
            return self.public[rank]
        except KeyError:
            raise MissingKey(f"no keypair for rank {rank} (keys made for world {self.world})") from None

    def rank_secret(self, rank: int) -> bytes:
        try:
            return self.secret[rank]
        except KeyError:
            raise MissingKey(f"these credentials do not hold rank {rank}'s secret key") from None

    def sign(self, rank: int, message: bytes) -> bytes:
        """Rank ``rank``'s 64-byte Ed25519 signature of ``message`` (needs its secret key)."""
        return _signing_key(self.rank_secret(rank)).sign(message)

    def verify(self, rank: int, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is rank ``rank``'s signature of ``message``.

        Checked against :attr:`sign_public` only; ``False`` for a rank without a signing key."""
        key = self.sign_public.get(rank)
        if key is None:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def allowed_subscribers(self) -> frozenset[bytes]:
        """Public keys a rank's PUB socket accepts: every member and the monitor."""
        return frozenset(self.public.values()) | {self.monitor_public}

    # --- serialization ----------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _FORMAT,
                "public": {str(r): k.decode() for r, k in sorted(self.public.items())},
                "monitor_public": self.monitor_public.decode(),
                "secret": {str(r): k.decode() for r, k in sorted(self.secret.items())},
                "monitor_secret": self.monitor_secret.decode() if self.monitor_secret else None,
                "sign_public": {
                    str(r): base64.b64encode(k).decode() for r, k in sorted(self.sign_public.items())
                },
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "ClusterKeys":
        try:
            data = json.loads(text)
            if data.get("format") != _FORMAT:
                raise InvalidArgument(
                    f"unknown key file format {data.get('format')!r} (this version reads format {_FORMAT}; "
                    "generate the keys again)"
                )
            keys = cls(
                public={int(r): k.encode() for r, k in data["public"].items()},
                monitor_public=data["monitor_public"].encode(),
                secret={int(r): k.encode() for r, k in data.get("secret", {}).items()},
                monitor_secret=data["monitor_secret"].encode() if data.get("monitor_secret") else None,
                sign_public={int(r): base64.b64decode(k, validate=True) for r, k in data["sign_public"].items()},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # JSONDecodeError, binascii.Error
            raise InvalidArgument(f"not an elasticep key file: {exc}") from None
        for key in (*keys.public.values(), *keys.secret.values(), keys.monitor_public):
            if len(key) != 40:
                raise InvalidArgument("a CURVE key in Z85 text is 40 characters")
        for key in keys.sign_public.values():
            if len(key) != 32:
                raise InvalidArgument("an Ed25519 public key is 32 bytes")
        for rank, secret in keys.secret.items():
            if keys.sign_public.get(rank) != _sign_public_of(secret):
                raise InvalidArgument(f"rank {rank}'s signing public key does not match its secret key")
        return keys

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path``, readable by the owner only (secret keys inside)."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ClusterKeys":
        return cls.from_json(Path(path).read_text())

    def to_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """Put these keys in ``env`` (a copy of ``os.environ`` by default) for a child process."""
        out = dict(os.environ) if env is None else env
        out[KEYS_ENV] = self.to_json()
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ClusterKeys":
        text = (os.environ if environ is None else environ).get(KEYS_ENV)
        if text is None:
            raise MissingKey(f"{KEYS_ENV} is not set")
        return cls.from_json(text)
