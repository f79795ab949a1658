#!/usr/bin/env python3
"""Wraps key material for ImportKeyMaterial with Python's `cryptography`, as AWS's documentation
tells users to: encrypt it to the public key GetParametersForImport returned.

    wrap_key_material.py --public-key-b64 B64_DER --algorithm ALG --material FILE

prints the base64 of the wrapped material (ImportKeyMaterial's EncryptedKeyMaterial). ALG is one
of AWS's wrapping algorithms:

- RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256: RSA-OAEP of the material, MGF1 of the same hash, no label.
- RSA_AES_KEY_WRAP_SHA_1, RSA_AES_KEY_WRAP_SHA_256: a fresh 256-bit AES key encrypted with
  RSA-OAEP (that hash), followed by the material under AES key wrap with padding (RFC 5649).

An implementation independent of kmsd's (agent/src/wrapping.rs, on aws-lc-rs): the tests use it
to check that what a tool users actually run wraps is what kmsd unwraps. Importable: `wrap`,
`wrap_b64`.
"""

import argparse
import base64
import os
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

# AWS's name -> (the OAEP hash, whether the material goes under an ephemeral AES key).
ALGORITHMS = {
    "RSAES_OAEP_SHA_1": (hashes.SHA1, False),
    "RSAES_OAEP_SHA_256": (hashes.SHA256, False),
    "RSA_AES_KEY_WRAP_SHA_1": (hashes.SHA1, True),
    "RSA_AES_KEY_WRAP_SHA_256": (hashes.SHA256, True),
}

AES_KEY_LEN = 32


def wrap(public_key_der, algorithm, material):
    """`material` (bytes) wrapped for `public_key_der` (a DER SubjectPublicKeyInfo, as
    GetParametersForImport's PublicKey) with `algorithm` (AWS's name)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown wrapping algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    digest, hybrid = ALGORITHMS[algorithm]
    public_key = serialization.load_der_public_key(public_key_der)
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("the wrapping public key is not an RSA key")
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=digest()), algorithm=digest(), label=None)
    if not hybrid:
        return public_key.encrypt(material, oaep)
    aes_key = os.urandom(AES_KEY_LEN)
    return public_key.encrypt(aes_key, oaep) + aes_key_wrap_with_padding(aes_key, material)


def wrap_b64(public_key_b64, algorithm, material):
    """`wrap` with the public key and the result in base64, as on the wire."""
    return base64.b64encode(wrap(base64.b64decode(public_key_b64), algorithm, material)).decode()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--public-key-b64", required=True, help="GetParametersForImport's PublicKey")
    parser.add_argument("--algorithm", required=True, choices=sorted(ALGORITHMS))
    parser.add_argument("--material", required=True, help="file holding the raw key material")
    args = parser.parse_args()
    with open(args.material, "rb") as f:
        material = f.read()
    try:
        wrapped = wrap_b64(args.public_key_b64, args.algorithm, material)
    except ValueError as e:
        sys.exit(f"wrap_key_material.py: {e}")
    sys.stdout.write(wrapped + "\n")


if __name__ == "__main__":
    main()
