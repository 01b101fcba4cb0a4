"""Canonical records and signed checkpoints: the bytes that get hashed and signed.

Records are canonical JSON (RFC 8785, via the ``rfc8785`` package), one per line. A
checkpoint commits to the Merkle root over the first ``tree_size`` record lines and is
signed with Ed25519 over its own canonical JSON without the signature field.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64


def json_safe(value: Any) -> Any:
    """Non-finite floats have no JSON form: they are stored as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def canonical_bytes(value: Any) -> bytes:
    return rfc8785.dumps(json_safe(value))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key is not an Ed25519 key")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the verification key is not an Ed25519 key")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Checkpoint:
    log_id: str
    tree_size: int
    root: str  # hex
    last_record: str  # hex SHA-256 of the last record line
    key_id: str
    signature: str = ""  # base64 Ed25519 over the canonical JSON of the other fields

    def unsigned(self) -> dict[str, Any]:
        return {
            "log_id": self.log_id,
            "tree_size": self.tree_size,
            "root": self.root,
            "last_record": self.last_record,
            "key_id": self.key_id,
        }

    def signed_by(self, key: Ed25519PrivateKey) -> Checkpoint:
        signature = key.sign(canonical_bytes(self.unsigned()))
        return Checkpoint(**self.unsigned(), signature=base64.b64encode(signature).decode())

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(base64.b64decode(self.signature, validate=True), canonical_bytes(self.unsigned()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_json(self) -> str:
        return canonical_bytes(self.unsigned() | {"signature": self.signature}).decode()

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        raw = json.loads(text)
        expected = {"log_id", "tree_size", "root", "last_record", "key_id", "signature"}
        if not isinstance(raw, dict) or set(raw) != expected:
            raise ValueError(f"not a checkpoint: expected fields {sorted(expected)}")
        if not isinstance(raw["tree_size"], int) or raw["tree_size"] < 0:
            raise ValueError("checkpoint tree_size must be a non-negative integer")
        return cls(**raw)
