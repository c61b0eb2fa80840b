"""The encryption of secret settings at rest: the Fernet keys (GENESIS_SECRET_KEY, else a key file
made on first use) and the sealing and opening of the values stored under secret names.

A value stored under a name that messages.is_secret_name() calls secret (api_key, token, password,
...) is kept as one string, `genesis-sealed:v1:<Fernet token of its JSON>`; every other value stays
readable to a DBA. GENESIS_SECRET_KEY may hold several comma-separated keys (MultiFernet): the
first seals, every one opens, so a key is rotated by putting the new key first, running
`genesis secrets rotate` (re-seals every stored value with the first key), then dropping the old
one. Without GENESIS_SECRET_KEY, a key is generated into <GENESIS_HOME>/secret.key (0600) the
first time a secret is sealed or opened, and its path is logged (never the key).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from genesis_pgflow.errors import ConfigurationError
from genesis_pgflow.messages import is_secret_name

log = logging.getLogger(__name__)

SEALED_PREFIX = "genesis-sealed:v1:"
KEY_FILE = "secret.key"
# request queues whose dead letters keep their secrets sealed (the handler's store opens them)
SEALED_DEAD_LETTERS = frozenset({"genesis_llm_config_updates"})
NEW_KEY_COMMAND = "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"


class SecretKeyError(ConfigurationError):
    """A stored secret cannot be opened with the configured key(s)."""

    code = "secret_key"


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def parse_keys(text: str, source: str) -> list[bytes]:
    """Fernet keys from comma-separated text; an unusable one is named by its position, never shown."""
    keys = []
    for position, raw in enumerate((part.strip() for part in text.split(",")), start=1):
        if not raw:
            continue
        try:
            if len(base64.urlsafe_b64decode(raw.encode("ascii"))) != 32:
                raise ValueError
        except (ValueError, binascii.Error, UnicodeEncodeError):
            raise SecretKeyError(f"{source}: key {position} is not a Fernet key (32 url-safe base64-encoded bytes, as "
                                 f"{NEW_KEY_COMMAND} prints)") from None
        keys.append(raw.encode("ascii"))
    if not keys:
        raise SecretKeyError(f"{source} holds no key")
    return keys


def new_key() -> str:
    return Fernet.generate_key().decode("ascii")


def key_file_keys(path: Path) -> list[bytes]:
    """The key(s) of the key file, which is made (0600, never overwritten) when it does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass    # another process made it meanwhile: use theirs
        else:
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(new_key() + "\n")
            log.warning("no GENESIS_SECRET_KEY configured: generated a secret key into %s (keep it, and back it "
                        "up: the stored secrets cannot be read without it)", path)
    return parse_keys(path.read_text(encoding="ascii"), str(path))


class SecretCipher:
    """Seals and opens secret values; the keys are loaded on first use (thread-safe)."""

    def __init__(self, configured: str | None = None, key_file: Path | None = None, *,
                 keys: Sequence[bytes] | None = None):
        if configured is None and key_file is None and keys is None:
            raise ValueError("SecretCipher needs configured keys, a key file or keys")
        self._configured = configured
        self._key_file = key_file
        self._fernet: MultiFernet | None = MultiFernet([Fernet(k) for k in keys]) if keys else None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "SecretCipher(<keys hidden>)"

    def _keys(self) -> MultiFernet:
        with self._lock:
            if self._fernet is None:
                if self._configured:
                    keys = parse_keys(self._configured, "GENESIS_SECRET_KEY")
                else:
                    assert self._key_file is not None
                    keys = key_file_keys(self._key_file)
                self._fernet = MultiFernet([Fernet(k) for k in keys])
            return self._fernet

    # --- one value -------------------------------------------------------------------------

    def seal(self, value: Any) -> str:
        """value (any JSON) as one sealed string; a value already sealed is kept as it is."""
        if is_sealed(value):
            return str(value)
        token = self._keys().encrypt(json.dumps(value, separators=(",", ":")).encode("utf-8"))
        return SEALED_PREFIX + token.decode("ascii")

    def open(self, value: Any) -> Any:
        """The original of a sealed string; anything else (a value stored before sealing) as it is."""
        if not is_sealed(value):
            return value
        try:
            plain = self._keys().decrypt(str(value)[len(SEALED_PREFIX):].encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise SecretKeyError(self._mismatch()) from None
        return json.loads(plain)

    def _mismatch(self) -> str:
        if self._configured:
            return ("a stored secret cannot be decrypted with the configured key(s): the key it was sealed with is "
                    "not in GENESIS_SECRET_KEY, or the value is damaged")
        # the usual cause: consumers on several hosts, each with a key file of its own
        return (f"a stored secret cannot be decrypted with the key in {self._key_file}: it was sealed with another "
                f"key (another host's key file?); give every consumer the same GENESIS_SECRET_KEY")

    def reseal(self, value: Any) -> Any:
        """A sealed string sealed again with the first key; a plain value sealed for the first time."""
        if not is_sealed(value):
            return self.seal(value)
        try:
            token = self._keys().rotate(str(value)[len(SEALED_PREFIX):].encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            self.open(value)    # raises the one clear error
            raise
        return SEALED_PREFIX + token.decode("ascii")

    # --- every secret of a JSON value ------------------------------------------------------

    def seal_dead_letter(self, queue: str, body: Any) -> Any:
        """The copy of a request a dead-letter queue keeps: an LLM configuration update's secrets
        sealed (its store opens them when the dead letter is requeued and consumed again); any
        other request as it came, since its handler would not open them."""
        return self.seal_secrets(body) if queue in SEALED_DEAD_LETTERS else body


    def seal_secrets(self, value: Any) -> Any:
        """A copy of value whose every field named like a secret holds its sealed string."""
        return _walk(value, self.seal)

    def open_secrets(self, value: Any) -> Any:
        """A copy of value with every sealed string opened (wherever it is)."""
        if isinstance(value, dict):
            return {k: self.open_secrets(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.open_secrets(v) for v in value]
        return self.open(value)

    def reseal_secrets(self, value: Any) -> Any:
        """A copy of value with every secret field sealed with the first key (rotation)."""
        return _walk(value, self.reseal)


def _walk(value: Any, on_secret: Any) -> Any:
    if isinstance(value, dict):
        return {k: on_secret(v) if is_secret_name(str(k)) else _walk(v, on_secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, on_secret) for v in value]
    return value
