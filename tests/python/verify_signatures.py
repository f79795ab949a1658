#!/usr/bin/env python3
"""Checks kmsd's public keys and signatures with Python's `cryptography`, as a user who took the
public key out of KMS (GetPublicKey) would verify them outside of it.

    verify_signatures.py < REQUEST.json

REQUEST is a JSON object:

    {"keys":   {NAME: BASE64_DER_SPKI, ...},
     "checks": [{"key": NAME, "algorithm": ALG, "message": BASE64, "signature": BASE64}, ...]}

and the reply on stdout is

    {"keys":   {NAME: {"type": "RSA", "bits": 2048} | {"type": "EC", "curve": "secp256r1"}
                      | {"type": "Ed25519"} | {"error": TEXT}, ...},
     "checks": [{"valid": true | false, "detail": TEXT}, ...]}   (in the order of the checks)

ALG is one of AWS KMS's signing algorithms; `message` is always the whole message (a signature
that kmsd made over its digest, MessageType DIGEST, must verify against the message itself):

- RSASSA_PSS_SHA_256/384/512: RSASSA-PSS (RFC 8017), MGF1 of the same hash, a salt exactly as
  long as the hash, as AWS documents.
- RSASSA_PKCS1_V1_5_SHA_256/384/512: RSASSA-PKCS1-v1_5.
- ECDSA_SHA_256/384/512: ECDSA, the signature a DER `Ecdsa-Sig-Value` (RFC 3279 section 2.2.3)
  which must also be the canonical DER of its (r, s).
- ED25519_SHA_512: pure Ed25519 (RFC 8032) of the message.

A key of the wrong type for ALG is an invalid check, not an error. An implementation independent
of kmsd's (agent/src/asymmetric.rs, on aws-lc-rs). Importable: `describe_key`, `verify`.
"""

import base64
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

HASHES = {"SHA_256": hashes.SHA256, "SHA_384": hashes.SHA384, "SHA_512": hashes.SHA512}


def describe_key(public_key_der):
    """What the DER SubjectPublicKeyInfo `public_key_der` holds: its type and size or curve."""
    key = serialization.load_der_public_key(public_key_der)
    if isinstance(key, rsa.RSAPublicKey):
        return {"type": "RSA", "bits": key.key_size, "public_exponent": key.public_numbers().e}
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"type": "EC", "curve": key.curve.name}
    if isinstance(key, ed25519.Ed25519PublicKey):
        return {"type": "Ed25519"}
    return {"type": type(key).__name__}


def _hash_of(algorithm):
    for suffix, digest in HASHES.items():
        if algorithm.endswith(suffix):
            return digest()
    raise ValueError(f"no hash in {algorithm!r}")


def verify(public_key_der, algorithm, message, signature):
    """(valid, detail): whether `signature` is `algorithm`'s signature of `message` under the
    public key `public_key_der`."""
    key = serialization.load_der_public_key(public_key_der)
    try:
        if algorithm.startswith("RSASSA_"):
            if not isinstance(key, rsa.RSAPublicKey):
                return False, "not an RSA key"
            digest = _hash_of(algorithm)
            if algorithm.startswith("RSASSA_PSS_"):
                scheme = padding.PSS(mgf=padding.MGF1(_hash_of(algorithm)), salt_length=digest.digest_size)
            elif algorithm.startswith("RSASSA_PKCS1_V1_5_"):
                scheme = padding.PKCS1v15()
            else:
                return False, f"unknown algorithm {algorithm}"
            key.verify(signature, message, scheme, digest)
            return True, "ok"
        if algorithm.startswith("ECDSA_"):
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return False, "not an elliptic-curve key"
            try:
                r, s = decode_dss_signature(signature)
            except ValueError as e:
                return False, f"not a DER Ecdsa-Sig-Value: {e}"
            if encode_dss_signature(r, s) != signature:
                return False, "not the canonical DER of its (r, s)"
            key.verify(signature, message, ec.ECDSA(_hash_of(algorithm)))
            return True, "ok"
        if algorithm == "ED25519_SHA_512":
            if not isinstance(key, ed25519.Ed25519PublicKey):
                return False, "not an Ed25519 key"
            key.verify(signature, message)
            return True, "ok"
    except InvalidSignature:
        return False, "invalid signature"
    return False, f"unknown algorithm {algorithm}"


def main():
    request = json.load(sys.stdin)
    keys = {name: base64.b64decode(der) for name, der in request.get("keys", {}).items()}
    described = {}
    for name, der in keys.items():
        try:
            described[name] = describe_key(der)
        except ValueError as e:
            described[name] = {"error": str(e)}
    checks = []
    for check in request.get("checks", []):
        try:
            valid, detail = verify(
                keys[check["key"]],
                check["algorithm"],
                base64.b64decode(check["message"]),
                base64.b64decode(check["signature"]),
            )
        except (KeyError, ValueError) as e:
            valid, detail = False, f"error: {e!r}"
        checks.append({"valid": valid, "detail": detail})
    json.dump({"keys": described, "checks": checks}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
