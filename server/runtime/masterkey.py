"""The master key: what seals Pigeon's secrets at rest (AES-256-GCM).

Secrets Pigeon keeps in LMDB (provider credentials, the pepper of API-key hashes) are sealed
under a 32-byte master key that lives outside the data folder, so that a copy of the folder or
a backup of it is not a copy of the company's push credentials. The key comes from
``PIGEON_MASTER_KEY`` (base64url or hex of 32 bytes; several, comma-separated, newest first,
while a rotation is under way) or from a file; `Keyring.load` creates the file (mode 0600,
beside the data folder: ``pigeon-data.master-key`` for ``pigeon-data``) on the first start.

The file holds one key per line, newest first: a rotation writes the new key in front of the
old ones (`Keyring.save`: a temporary file renamed over it), re-seals everything, then drops
the old lines (`server.profiles.sealing`). `Keyring.seal` uses the newest key; `Keyring.open`
any key of the ring (a sealed value names its key by a 4-byte id, `Keyring.fingerprint`
shows it). A sealed value is::

    0x01 | key id (4 bytes: SHA-256 of the key) | nonce (12 bytes) | ciphertext and tag

and its associated data is what the caller binds it to (the record's LMDB key), so that a
sealed value moved to another record does not open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.runtime.errors import ConfigError, FailedPrecondition, StorageError

__all__ = ["Keyring", "SEALED", "ENV", "default_path", "new_key", "encode_key"]

log = logging.getLogger("pigeon.secrets")

#: The first byte of a sealed value (its format).
SEALED = b"\x01"
_KEY_BYTES = 32
_ID_BYTES = 4
_NONCE_BYTES = 12
_HEAD = 1 + _ID_BYTES + _NONCE_BYTES
ENV = "PIGEON_MASTER_KEY"


def new_key() -> bytes:
    return os.urandom(_KEY_BYTES)


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


def _decode_key(text: str, where: str) -> bytes:
    text = text.strip()
    try:
        key = bytes.fromhex(text) if len(text) == 2 * _KEY_BYTES else base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != _KEY_BYTES:
        raise ConfigError(f"{where}: a master key is 32 bytes in base64url or hex (pigeon makes one when none exists; "
                          "`openssl rand -hex 32` makes one too)")
    return key


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:_ID_BYTES]


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once, readable by its owner only: a new temporary file
    beside it (made with O_EXCL, so never a file or link someone left there), synced, renamed
    over it, and the folder synced. A crash leaves the old file or the new one, and a
    temporary file that the next write removes (with those of earlier versions)."""
    for leftover in (*path.parent.glob(f".{path.name}.*"), path.with_name(path.name + ".tmp")):
        leftover.unlink(missing_ok=True)  # a link goes, not what it points to
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def default_path(data: str | Path) -> Path:
    """The master key file of a data folder: beside it, never inside it."""
    folder = Path(data).resolve()
    return folder.with_name(folder.name + ".master-key")


class Keyring:
    """The master keys, newest first (see the module docstring).

    Args:
        keys: 32-byte keys, newest first.
        path: the file they came from (None: from the environment, which a rotation cannot
            write).
    """

    def __init__(self, keys: list[bytes], path: Path | None = None) -> None:
        if not keys:
            raise ValueError("a keyring needs a key")
        self.keys = keys
        self.path = path
        self._ciphers = {_key_id(key): AESGCM(key) for key in keys}
        self._current = _key_id(keys[0])

    @classmethod
    def load(cls, path: Path, env: Mapping[str, str] = os.environ) -> Keyring:
        """The keyring of ``PIGEON_MASTER_KEY``, else of the file at ``path`` (made with a new
        key, mode 0600, when there is none)."""
        if env.get(ENV):
            parts = [part for part in env[ENV].split(",") if part.strip()]
            if not parts:
                raise ConfigError(f"{ENV}: a master key is 32 bytes in base64url or hex (several: comma-separated, newest first)")
            return cls([_decode_key(part, ENV) for part in parts])
        try:
            text = path.read_text()
        except FileNotFoundError:
            key = new_key()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it meanwhile: use theirs
                return cls.load(path, env)
            except OSError as exc:
                raise ConfigError(f"cannot create the master key file {str(path)!r}: {exc}") from None
            with os.fdopen(fd, "w") as f:
                f.write(encode_key(key) + "\n")
                f.flush()
                os.fsync(f.fileno())
            log.warning("master key created in %s: keep a copy apart from backups of the data folder "
                        "(without it the stored credentials cannot be read)", path)
            return cls([key], path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the master key file {str(path)!r}: {exc}") from None
        if path.is_symlink():  # a mounted secret, say: its owner's to keep private, not ours to change
            if path.stat().st_mode & 0o077:
                log.warning("the master key file %s is a link to a file others may read", path)
        elif path.stat().st_mode & 0o077:
            try:
                path.chmod(0o600)
                log.info("permissions of %s set to 600", path)
            except OSError as exc:
                log.warning("cannot make %s private to its owner: %s", path, exc)
        lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not lines:
            raise ConfigError(f"the master key file {str(path)!r} holds no key")
        return cls([_decode_key(line, str(path)) for line in lines], path)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return SEALED + self._current + nonce + self._ciphers[self._current].encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """The plaintext of a sealed value; `StorageError` when no key of the ring opens it."""
        if sealed[:1] != SEALED or len(sealed) < _HEAD + 16:
            raise StorageError("a sealed value is damaged (it does not start like one)")
        cipher = self._ciphers.get(sealed[1:1 + _ID_BYTES])
        if cipher is None:
            raise StorageError("a value is sealed under a master key this server does not have "
                               f"(is {ENV} or the master key file the one of this data folder?)")
        try:
            return cipher.decrypt(sealed[1 + _ID_BYTES:_HEAD], sealed[_HEAD:], aad)
        except InvalidTag:
            raise StorageError("a sealed value does not open: it was damaged or moved to another record") from None

    def is_current(self, sealed: bytes) -> bool:
        """Whether ``sealed`` is sealed under the newest key (a rotation re-seals the others)."""
        return sealed[1:1 + _ID_BYTES] == self._current

    @property
    def fingerprint(self) -> str:
        """The current key's id in hex (4 bytes of its SHA-256: tells keys apart, reveals nothing)."""
        return self._current.hex()

    def knows(self, sealed: bytes) -> bool:
        """Whether a key of this ring sealed ``sealed`` (without opening it)."""
        return sealed[1:1 + _ID_BYTES] in self._ciphers

    def rotated(self) -> Keyring:
        """This ring with a new key in front: it seals from now on, the old ones still open."""
        return Keyring([new_key(), *self.keys], self.path)

    def newest(self) -> Keyring:
        """This ring with its newest key alone (once nothing is sealed under the others)."""
        return Keyring(self.keys[:1], self.path)

    def save(self) -> None:
        """Write the keys to the ring's file, newest first, at once: a temporary file (0600)
        beside it, synced, renamed over it. A crash leaves the old file or the new one."""
        if self.path is None:
            raise ConfigError(f"the master key comes from {ENV}: there is no file to write it to")
        if self.path.is_symlink():
            raise FailedPrecondition(f"the master key file {str(self.path)!r} is a link (a mounted secret?): replacing it "
                                     "would leave its target with the old key; write the new key in front of the old "
                                     "one there yourself, restart, then remove the old one")
        try:
            write_private(self.path, "".join(encode_key(key) + "\n" for key in self.keys))
        except OSError as exc:
            raise StorageError(f"cannot write the master key file {str(self.path)!r}: {exc}") from None
