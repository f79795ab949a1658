#!/usr/bin/env python3
"""Wraps key material for ImportKeyMaterial with Python's `cryptography`, exactly as AWS's
documentation tells users to: encrypt to the public key GetParametersForImport returned.

    wrap_key_material.py --public-key-b64 B64_DER --algorithm ALG --material FILE

prints the base64 of the wrapped material. ALG is one of AWS's wrapping algorithms:
RSAES_OAEP_SHA_1 and RSAES_OAEP_SHA_256 (RSA-OAEP with MGF1 of the same hash, no label),
RSA_AES_KEY_WRAP_SHA_1 and RSA_AES_KEY_WRAP_SHA_256 (a fresh 256-bit AES key, RSA-OAEP
encrypted, followed by the material under AES key wrap with padding, RFC 5649).

An independent implementation: kmsd's tests use it to check that material wrapped by a
tool users actually run is what kmsd unwraps.
"""

import argparse
import base64
import os
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

HASHES = {"SHA_1": hashes.SHA1, "SHA_256": hashes.SHA256}


def wrap(public_key_der, algorithm, material):
    public_key = serialization.load_der_public_key(public_key_der)
    for prefix in ("RSAES_OAEP_", "RSA_AES_KEY_WRAP_"):
        if algorithm.startswith(prefix) and algorithm[len(prefix):] in HASHES:
            digest = HASHES[algorithm[len(prefix):]]
            break
    else:
        raise ValueError(f"unknown wrapping algorithm {algorithm}")
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=digest()), algorithm=digest(), label=None)
    if algorithm.startswith("RSAES_OAEP_"):
        return public_key.encrypt(material, oaep)
    aes_key = os.urandom(32)
    return public_key.encrypt(aes_key, oaep) + aes_key_wrap_with_padding(aes_key, material)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--public-key-b64", required=True)
    parser.add_argument("--algorithm", required=True)
    parser.add_argument("--material", required=True)
    args = parser.parse_args()
    with open(args.material, "rb") as f:
        material = f.read()
    wrapped = wrap(base64.b64decode(args.public_key_b64), args.algorithm, material)
    sys.stdout.write(base64.b64encode(wrapped).decode() + "\n")


if __name__ == "__main__":
    main()
