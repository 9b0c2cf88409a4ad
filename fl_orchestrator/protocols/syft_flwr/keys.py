"""The aggregator's identity in encrypted syft-flwr mode: its X3DH keys, and sealing each message.

syft-flwr 0.5.3 encrypts every request and reply by default, with
syft-crypto's X3DH. This module does no cryptography of its own: it calls
syft-crypto (the ``[syft-flwr]`` extra, the package syft-flwr itself uses, so
the format cannot drift) with a small stand-in for syft-core's client, which
decides where things are:

- the private keys live under ``<state_dir>/keys/`` (a 0700 folder, a 0600
  file), never in the synced tree;
- the DID document with the public keys is published where the owners look
  for it, ``datasites/<aggregator>/public/did.json``, written atomically.

A message's body, both ways, is syft-crypto's ``EncryptedPayload`` as JSON,
whose plaintext is the Flower message's bytes in base64: what syft-flwr's
server sends and what syft-event answers with.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fl_orchestrator.core.reasons import Reason, printable
from fl_orchestrator.storage.atomic import atomic_write_text

# The part of a key file's path syft-crypto derives from the workspace: <data_dir>/../.syftbox/<hash>/.
_DATA_DIR = "workspace"


ENCRYPTION_HINT = (
    "the data owner answered with an encrypted payload, and this job runs with [syft_flwr]"
    " encryption = false: set it to true (the default, as syft-flwr's owners run), or restart the"
    " owner's main.py with SYFT_FLWR_ENCRYPTION_ENABLED=false"
)
PLAINTEXT_HINT = (
    "the data owner answered in plaintext although this job encrypts: it runs with"
    " SYFT_FLWR_ENCRYPTION_ENABLED=false; its reply is used, but it travelled unencrypted"
)

UNREADABLE_REQUEST_HINT = (
    "an empty answer to an encrypted request: the owner's handler could not read it, most likely"
    " because it runs with SYFT_FLWR_ENCRYPTION_ENABLED=false while keys from an earlier run are"
    " still published in its datasite; ask it to run with encryption on (syft-flwr's default), or"
    " set [syft_flwr] encryption = false if every owner runs without"
)


def looks_encrypted(body: bytes) -> bool:
    """syft-crypto's payload is a JSON object; a Flower protobuf never starts with '{'."""
    if not body.lstrip().startswith(b"{"):
        return False
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and ("ciphertext" in document or "receiver" in document)


class KeysError(Exception):
    """The aggregator's keys and its published DID disagree; the message says what to do."""


class SealError(Exception):
    """A message that cannot be encrypted for, or opened from, one owner."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class _Url:
    url: str

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or self.url

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class _Config:
    email: str
    server_url: _Url


@dataclass(frozen=True)
class _Workspace:
    data_dir: Path


@dataclass(frozen=True)
class _CryptoClient:
    """What syft-crypto reads of syft-core's Client: who we are, where DIDs and our keys are."""

    config: _Config
    workspace: _Workspace
    datasites: Path

    @property
    def email(self) -> str:
        return self.config.email


class AggregatorKeys:
    """The aggregator's X3DH keys (kept in the state folder) and its published DID."""

    def __init__(self, *, email: str, datasites_dir: Path, state_dir: Path, server_url: str) -> None:
        _quiet_syft_crypto()
        self.email = email
        self.datasites_dir = datasites_dir
        self.keys_dir = state_dir / "keys"
        self.client = _CryptoClient(
            _Config(email, _Url(server_url)), _Workspace(self.keys_dir / _DATA_DIR), datasites_dir
        )

    @property
    def did_file(self) -> Path:
        """Where the owners read our public keys."""
        return self.did_file_of(self.email)

    def did_file_of(self, owner: str) -> Path:
        """Where an owner publishes its public keys (syft-crypto's place)."""
        return self.datasites_dir / owner / "public" / "did.json"

    def ensure(self) -> str:
        """Make, load or repair the keys and the DID; say which. KeysError if they disagree."""
        from syft_crypto import bootstrap_user, private_key_path

        self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)  # the key file inside is 0600; nobody else may even list it
        key_file: Path = private_key_path(self.client)
        if key_file.resolve().is_relative_to(self.datasites_dir.resolve()):
            raise KeysError(f"{key_file} would be inside the synced tree: move state.state_dir out of it")
        did = _read_json(self.did_file)
        if key_file.exists() and not self._loadable():
            if did is not None:
                raise KeysError(
                    f"{key_file} cannot be read (cut short by a crash?) and {self.did_file} publishes keys:"
                    f" restore {self.keys_dir} from a backup, or delete both to make a new identity"
                )
            # Torn by a kill before any DID went out: nobody has encrypted to these keys yet.
            key_file.unlink()
        if not key_file.exists():
            if did is not None:
                raise KeysError(
                    f"{self.did_file} publishes keys this daemon does not have ({key_file} is missing):"
                    f" restore {self.keys_dir} from a backup, or delete {self.did_file} to make a new"
                    " identity (replies encrypted to the old keys then cannot be read)"
                )
            bootstrap_user(self.client)
            os.chmod(key_file, 0o600)
            self._publish()  # again, atomically: syft-crypto writes it in place
            return "created"
        if did is None:
            self._publish()
            return "published"
        if self._public_keys() != _public_keys_of(did):
            raise KeysError(
                f"{self.did_file} does not match the private keys in {key_file}: restore the keys that"
                f" go with it, or delete {self.did_file} to publish the ones this daemon has"
                " (replies encrypted to the old keys then cannot be read)"
            )
        return "loaded"

    def _loadable(self) -> bool:
        try:
            self._public_keys()
        except Exception:  # jwcrypto, json and key-type errors alike: the file is not usable keys
            return False
        return True

    def has_public_key(self, owner: str) -> bool:
        """True if the owner has published a DID (it has run syft-flwr with encryption on)."""
        return self.did_file_of(owner).is_file()

    def seal(self, owner: str, message: bytes) -> bytes:
        """A request body for ``owner``: the Flower message, encrypted to its published keys."""
        from syft_crypto import encrypt_message

        if not self.has_public_key(owner):
            raise SealError(Reason.NO_PUBLIC_KEY, self.no_key_hint(owner))
        try:
            payload = encrypt_message(base64.b64encode(message).decode("ascii"), owner, self.client)
        except Exception as exc:  # a DID the owner's sync left broken: its requests fail, not the daemon
            raise SealError(Reason.NO_PUBLIC_KEY, f"{self.did_file_of(owner)}: {_describe(exc)}") from None
        return str(payload.model_dump_json()).encode()

    def open(self, owner: str, body: bytes) -> str:
        """The plaintext of an encrypted reply from ``owner``; SealError if it cannot be read."""
        from syft_crypto import EncryptedPayload, decrypt_message

        try:
            payload = EncryptedPayload.model_validate_json(body)
        except Exception as exc:
            raise SealError(Reason.UNDECRYPTABLE, f"not an encrypted payload: {_describe(exc)}") from None
        if payload.sender != owner:
            detail = f"sealed by {printable(str(payload.sender), 200)!r} in {owner}'s folder"
            raise SealError(Reason.UNDECRYPTABLE, detail)
        if payload.receiver != self.email:
            raise SealError(Reason.UNDECRYPTABLE, f"sealed for {printable(str(payload.receiver), 200)!r}")
        try:
            return str(decrypt_message(payload, self.client))
        except FileNotFoundError:
            raise SealError(Reason.UNDECRYPTABLE, self.no_key_hint(owner)) from None
        except Exception as exc:  # what a hostile payload makes the crypto raise costs one reply
            raise SealError(Reason.UNDECRYPTABLE, _describe(exc)) from None

    def no_key_hint(self, owner: str) -> str:
        """What to change when an owner has no published keys."""
        return (
            f"{owner} has published no keys ({self.did_file_of(owner)} is missing): it runs syft-flwr"
            " with SYFT_FLWR_ENCRYPTION_ENABLED=false, or has never started. Set [syft_flwr]"
            " encryption = false if every owner runs without encryption; else ask it to start with"
            " encryption on (syft-flwr's default)"
        )

    def _publish(self) -> None:
        from syft_crypto import create_x3dh_did_document, load_private_keys

        identity, prekey = load_private_keys(self.client)
        prekey_public = prekey.public_key()
        signature = identity.sign(_raw(prekey_public))
        document = create_x3dh_did_document(
            self.email, self.client.config.server_url.host, identity.public_key(), prekey_public, signature
        )
        self.did_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.did_file, json.dumps(document, indent=2))

    def _public_keys(self) -> tuple[bytes, bytes]:
        from syft_crypto import load_private_keys

        identity, prekey = load_private_keys(self.client)
        return _raw(identity.public_key()), _raw(prekey.public_key())


def _quiet_syft_crypto() -> None:
    """syft-crypto logs through loguru to stderr, at debug level, key bytes included on errors: off."""
    try:
        from loguru import logger
    except ImportError:
        return
    logger.disable("syft_crypto")


def _public_keys_of(did: dict[str, Any]) -> tuple[bytes, bytes] | None:
    from syft_crypto import get_public_key_from_did
    from syft_crypto.did_utils import get_identity_public_key_from_did

    try:
        return _raw(get_identity_public_key_from_did(did)), _raw(get_public_key_from_did(did))
    except Exception:
        return None


def _raw(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    return raw


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from path; None if it is missing or unreadable (a torn write is rewritten)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _describe(exc: BaseException) -> str:
    return printable(f"{type(exc).__name__}: {exc}", 500)
