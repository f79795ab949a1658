#!/usr/bin/env python3
"""Independent checks of kmsd's RSA encryption keys, ECDH keys and data key pairs, with
`cryptography`.

  encrypt   --public-key-b64 DER --algorithm RSAES_OAEP_SHA_1|RSAES_OAEP_SHA_256 --plaintext-b64 P
            prints the base64 RSAES-OAEP ciphertext of P to the public key (MGF1 with the same
            hash, no label, as AWS KMS).
  pair      --private-b64 PKCS8 --public-b64 SPKI --spec KEY_PAIR_SPEC
            checks that the private key is of the spec, that the public key is its public half,
            and that a signature by the private key verifies with the public key; prints "ok".
  ecdh      --public-key-b64 SPKI
            makes a key pair on the same curve, prints its public key (DER SPKI, base64) and the
            ECDH shared secret with the given public key (base64), one per line.
"""
import argparse
import base64
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

CURVES = {
    "ECC_NIST_P256": (ec.SECP256R1, hashes.SHA256),
    "ECC_NIST_P384": (ec.SECP384R1, hashes.SHA384),
    "ECC_NIST_P521": (ec.SECP521R1, hashes.SHA512),
    "ECC_SECG_P256K1": (ec.SECP256K1, hashes.SHA256),
}


def encrypt(args):
    key = serialization.load_der_public_key(base64.b64decode(args.public_key_b64))
    digest = {"RSAES_OAEP_SHA_1": hashes.SHA1, "RSAES_OAEP_SHA_256": hashes.SHA256}[args.algorithm]
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=digest()), algorithm=digest(), label=None)
    print(base64.b64encode(key.encrypt(base64.b64decode(args.plaintext_b64), oaep)).decode())


def pair(args):
    private = serialization.load_der_private_key(base64.b64decode(args.private_b64), password=None)
    public = serialization.load_der_public_key(base64.b64decode(args.public_b64))
    own_public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if own_public != base64.b64decode(args.public_b64):
        sys.exit("the public key is not the private key's public half")
    message = b"signed with a data key pair"
    if args.spec.startswith("RSA_"):
        if not isinstance(private, rsa.RSAPrivateKey) or private.key_size != int(args.spec[4:]):
            sys.exit(f"not an {args.spec} key")
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        public.verify(private.sign(message, pss, hashes.SHA256()), message, pss, hashes.SHA256())
    elif args.spec == "ECC_NIST_EDWARDS25519":
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            sys.exit("not an Ed25519 key")
        public.verify(private.sign(message), message)
    else:
        curve, digest = CURVES[args.spec]
        if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(private.curve, curve):
            sys.exit(f"not an {args.spec} key")
        public.verify(private.sign(message, ec.ECDSA(digest())), message, ec.ECDSA(digest()))
    print("ok")


def ecdh(args):
    peer = serialization.load_der_public_key(base64.b64decode(args.public_key_b64))
    own = ec.generate_private_key(peer.curve)
    public = own.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    print(base64.b64encode(public).decode())
    print(base64.b64encode(own.exchange(ec.ECDH(), peer)).decode())


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encrypt")
    e.add_argument("--public-key-b64", required=True)
    e.add_argument("--algorithm", required=True)
    e.add_argument("--plaintext-b64", required=True)
    p = sub.add_parser("pair")
    p.add_argument("--private-b64", required=True)
    p.add_argument("--public-b64", required=True)
    p.add_argument("--spec", required=True)
    d = sub.add_parser("ecdh")
    d.add_argument("--public-key-b64", required=True)
    args = parser.parse_args()
    {"encrypt": encrypt, "pair": pair, "ecdh": ecdh}[args.command](args)


if __name__ == "__main__":
    main()
