"""The append-only, hash-chained, Merkle-committed and signed provenance log of a run.

Folder layout (``RUN/provenance/``):

- ``log.jsonl``: one canonical JSON record per line: ``{"seq", "prev", "kind", "body"}``,
  where ``prev`` is the SHA-256 of the previous line (a hash chain);
- ``checkpoints.jsonl``: after every append, a signed checkpoint of the Merkle tree over
  all record lines (RFC 6962 hashing);
- ``public_key.pem``: the server's Ed25519 verification key.

Appends are written, flushed and fsync'd before the call returns. A crash can only leave a
torn last line; opening the log drops it and says so. Anything else that does not verify
is reported as tampering by :func:`common.provenance.verify.verify_log`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.provenance.merkle import CompactRange, leaf_hash
from common.provenance.records import (
    GENESIS,
    Checkpoint,
    canonical_bytes,
    key_id,
    load_private_key,
    private_pem,
    public_pem,
    sha256_hex,
)

LOG_FILE = "log.jsonl"
CHECKPOINT_FILE = "checkpoints.jsonl"
PUBLIC_KEY_FILE = "public_key.pem"
# Inside a run folder: the server's log, and what each hospital kept (<name>/checkpoints.jsonl).
PROVENANCE_DIR = "provenance"
HOSPITALS_DIR = "hospitals"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_append(path: Path, line: bytes) -> None:
    """Append one line and make it durable before returning."""
    created = not path.exists()
    with open(path, "ab") as handle:
        handle.write(line + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        _fsync_dir(path.parent)


def drop_torn_tail(path: Path) -> str | None:
    """Cut a last line that a crash left without its newline; returns a message if it did."""
    if not path.exists():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as handle:
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    return (
        f"{path.name}: dropped a torn last line of {len(data) - keep} bytes "
        "(an append was interrupted by a crash; the records before it are intact)"
    )


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The server's signing key, created with owner-only permissions on first use.

    Safe when several runs start at once in the same folder: the new key is written to a
    private temporary file and hard-linked into place, which fails if another run won the
    race; that run's key, complete by then, is used instead.
    """
    if path.exists():
        return load_private_key(path.read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0o600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_pem(key))
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return load_private_key(path.read_bytes())
    finally:
        os.unlink(temporary)
    return key


@dataclass
class ProvenanceLog:
    folder: Path
    signing_key: Ed25519PrivateKey
    log_id: str
    recovery_messages: list[str] = field(default_factory=list)
    _tree: CompactRange = field(default_factory=CompactRange)
    _last_hash: str = GENESIS

    @classmethod
    def open(cls, folder: Path, *, signing_key: Ed25519PrivateKey, log_id: str) -> ProvenanceLog:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        public_path = folder / PUBLIC_KEY_FILE
        expected = public_pem(signing_key.public_key())
        if public_path.exists() and public_path.read_bytes() != expected:
            raise ValueError(f"{public_path} belongs to another key: refusing to mix signers in one log")
        if not public_path.exists():
            public_path.write_bytes(expected)
        log = cls(folder=folder, signing_key=signing_key, log_id=log_id)
        for name in (LOG_FILE, CHECKPOINT_FILE):
            message = drop_torn_tail(folder / name)
            if message:
                log.recovery_messages.append(message)
        log_path = folder / LOG_FILE
        lines = log_path.read_bytes().splitlines() if log_path.exists() else []
        for seq, line in enumerate(lines):
            record = json.loads(line)
            if record.get("seq") != seq or record.get("prev") != log._last_hash:
                raise ValueError(f"{log_path} line {seq + 1} breaks the chain: run `causalfed log verify`")
            log._tree.append(leaf_hash(line))
            log._last_hash = sha256_hex(line)
        return log

    @property
    def size(self) -> int:
        return self._tree.size

    def append(self, kind: str, body: dict[str, Any]) -> Checkpoint:
        """Append one record durably, then write and return the signed checkpoint."""
        line = canonical_bytes({"seq": self.size, "prev": self._last_hash, "kind": kind, "body": body})
        durable_append(self.folder / LOG_FILE, line)
        self._tree.append(leaf_hash(line))
        self._last_hash = sha256_hex(line)
        checkpoint = Checkpoint(
            log_id=self.log_id,
            tree_size=self.size,
            root=self._tree.root().hex(),
            last_record=self._last_hash,
            key_id=key_id(self.signing_key.public_key()),
        ).signed_by(self.signing_key)
        durable_append(self.folder / CHECKPOINT_FILE, checkpoint.to_json().encode())
        return checkpoint
