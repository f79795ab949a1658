#!/usr/bin/env python3
"""An independent client check of kmsd: boto3 drives the agent on its Unix socket.

botocore serializes every request (AWS JSON 1.1, SigV4-signed, which kmsd ignores on the
socket) and parses every response, so request shapes, response shapes and error codes are
judged by AWS's own SDK rather than by kmsfs's client. The only piece written here is the
transport: a `before-send` handler that writes botocore's prepared request to the socket
with `http.client` and hands the raw reply back to botocore.

Asymmetric and HMAC keys' replies are also judged by `cryptography`: public keys load,
signatures verify, ECDH secrets agree and data key pairs match outside kmsd.

Beyond what botocore's (lenient) parser checks, an `after-call` handler holds every raw
response body to the service model botocore ships: unknown or null members, missing
required members, wrong JSON types, enum values and length limits are all failures.

Usage: boto3_client.py SOCKET
Prints one line per check and a summary; exits non-zero if any check failed.
"""

import base64
import binascii
import hashlib
import http.client
import json
import socket
import sys
import traceback
import urllib.parse
from datetime import datetime, timedelta, timezone

try:
    import boto3
    from botocore.awsrequest import AWSResponse
    from botocore.config import Config
    from botocore.exceptions import ClientError
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
except ImportError as e:
    sys.exit(f"boto3 or cryptography is not installed ({e}); run the README's test command, which installs it")


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 on a Unix stream socket instead of TCP."""

    def __init__(self, path):
        super().__init__("kmsd", timeout=30)
        self.socket_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class RawBody:
    """The one method of urllib3's response that AWSResponse reads."""

    def __init__(self, data):
        self.data = data

    def stream(self, **_):
        yield self.data


def unix_transport(path):
    def send(request, **_):
        url = urllib.parse.urlsplit(request.url)
        conn = UnixHTTPConnection(path)
        try:
            conn.request(request.method, url.path or "/", body=request.body, headers=dict(request.headers.items()))
            reply = conn.getresponse()
            data = reply.read()
            return AWSResponse(request.url, reply.status, dict(reply.getheaders()), RawBody(data))
        finally:
            conn.close()

    return send


def shape_problems(shape, value, where):
    """How `value` (raw JSON) departs from the botocore `shape`."""
    if value is None:
        return [f"{where}: null (AWS omits absent members)"]
    kind = shape.type_name
    meta = shape.metadata
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{where}: expected an object for {shape.name}, got {type(value).__name__}"]
        problems = []
        for name, member in value.items():
            if name not in shape.members:
                problems.append(f"{where}.{name}: not a member of {shape.name}")
            else:
                problems += shape_problems(shape.members[name], member, f"{where}.{name}")
        for name in shape.required_members:
            if name not in value:
                problems.append(f"{where}.{name}: required member of {shape.name} missing")
        return problems
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        problems = []
        if not meta.get("min", 0) <= len(value) <= meta.get("max", len(value)):
            problems.append(f"{where}: {len(value)} items, outside [{meta.get('min')}, {meta.get('max')}]")
        for i, item in enumerate(value):
            problems += shape_problems(shape.member, item, f"{where}[{i}]")
        return problems
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{where}: expected a map, got {type(value).__name__}"]
        problems = []
        for k, v in value.items():
            problems += shape_problems(shape.key, k, f"{where} key {k!r}")
            problems += shape_problems(shape.value, v, f"{where}[{k!r}]")
        return problems
    if kind == "string":
        if not isinstance(value, str):
            return [f"{where}: expected a string, got {type(value).__name__}"]
        if shape.enum and value not in shape.enum:
            return [f"{where}: {value!r} is not one of {shape.name}'s values"]
        if not meta.get("min", 0) <= len(value) <= meta.get("max", len(value)):
            return [f"{where}: length {len(value)} outside [{meta.get('min')}, {meta.get('max')}]"]
        return []
    if kind in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: expected an integer, got {value!r}"]
        if not meta.get("min", value) <= value <= meta.get("max", value):
            return [f"{where}: {value} outside [{meta.get('min')}, {meta.get('max')}]"]
        return []
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{where}: expected a boolean, got {value!r}"]
    if kind == "timestamp":
        # JSON 1.1 sends timestamps as epoch seconds.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return []
        return [f"{where}: expected epoch seconds, got {value!r}"]
    if kind == "blob":
        if not isinstance(value, str):
            return [f"{where}: expected base64, got {type(value).__name__}"]
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error:
            return [f"{where}: not valid base64"]
        return []
    return [f"{where}: unexpected shape type {kind}"]


class MissingState(Exception):
    """A check needs something an earlier check failed to produce."""


class State(dict):
    """What checks hand on to later ones (keys, ciphertexts)."""

    def __missing__(self, name):
        raise MissingState(name)


class Checker:
    def __init__(self, socket_path):
        self.kms = self.client(socket_path)
        self.reply_problems = []
        self.passed = 0
        self.failed = 0

    def client(self, socket_path, region="local"):
        """A boto3 KMS client on the agent at `socket_path`, its replies held to the model."""
        kms = boto3.client(
            "kms",
            region_name=region,
            aws_access_key_id="x",
            aws_secret_access_key="x",
            endpoint_url="http://kmsd",
            # A retry would hide a failed or malformed first reply.
            config=Config(retries={"total_max_attempts": 1}),
        )
        kms.meta.events.register("before-send.kms", unix_transport(socket_path))
        kms.meta.events.register("after-call.kms", self.check_reply)
        return kms

    def check_reply(self, http_response, model, **_):
        """Holds every raw reply to the service model."""
        where = f"{model.name} reply"
        try:
            body = json.loads(http_response.content or b"{}")
        except ValueError as e:
            self.reply_problems.append(f"{where}: not JSON: {e}")
            return
        if http_response.status_code == 200:
            if model.output_shape is not None:
                self.reply_problems += shape_problems(model.output_shape, body, where)
            elif body != {}:
                self.reply_problems.append(f"{where}: {model.name} has no output but the body is {body!r}")
            return
        if not isinstance(body, dict) or not isinstance(body.get("__type"), str) or "message" not in body:
            self.reply_problems.append(f"{where}: error body lacks __type/message: {body!r}")

    def run(self, name, check):
        """Runs one check; returns whether it passed."""
        self.reply_problems = []
        try:
            check()
            if self.reply_problems:
                problems = "\n    ".join(self.reply_problems)
                raise AssertionError(f"reply does not match the service model:\n    {problems}")
        except MissingState as e:
            self.failed += 1
            print(f"FAIL {name}: needs {e} from an earlier check that failed")
        except Exception as e:  # noqa: BLE001 — every failure is reported, none stops the run
            self.failed += 1
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            print(f"FAIL {name}: {detail}")
            if not isinstance(e, (AssertionError, ClientError)):
                traceback.print_exc()
        else:
            self.passed += 1
            print(f"ok   {name}")
            return True
        return False


def expect_error(code, call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except ClientError as e:
        got = e.response["Error"]["Code"]
        assert got == code, f"expected {code}, got {got}: {e.response['Error'].get('Message')}"
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 400, e.response["ResponseMetadata"]
        return e
    raise AssertionError(f"expected {code}, but the call succeeded")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: boto3_client.py SOCKET")
    try:
        UnixHTTPConnection(sys.argv[1]).connect()
    except OSError as e:
        sys.exit(f"cannot connect to kmsd at {sys.argv[1]}: {e}")
    checker = Checker(sys.argv[1])
    kms = checker.kms
    state = State()

    def create_key():
        meta = kms.create_key(
            Description="boto3 check", Tags=[{"TagKey": "team", "TagValue": "storage"}]
        )["KeyMetadata"]
        assert meta["KeyState"] == "Enabled", meta
        assert meta["Enabled"] is True, meta
        assert meta["Description"] == "boto3 check", meta
        assert meta["KeySpec"] == "SYMMETRIC_DEFAULT", meta
        assert meta["KeyUsage"] == "ENCRYPT_DECRYPT", meta
        assert meta["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"], meta
        assert meta["Arn"].endswith(":key/" + meta["KeyId"]), meta
        assert isinstance(meta["CreationDate"], datetime), meta
        state["key"], state["arn"] = meta["KeyId"], meta["Arn"]
        state["key2"] = kms.create_key()["KeyMetadata"]["KeyId"]
        state["arn2"] = kms.describe_key(KeyId=state["key2"])["KeyMetadata"]["Arn"]

    def create_key_tags():
        tags = kms.list_resource_tags(KeyId=state["key"])["Tags"]
        assert tags == [{"TagKey": "team", "TagValue": "storage"}], tags

    def describe_key():
        by_id = kms.describe_key(KeyId=state["key"])["KeyMetadata"]
        by_arn = kms.describe_key(KeyId=state["arn"])["KeyMetadata"]
        assert by_id == by_arn, (by_id, by_arn)
        assert by_id["KeyId"] == state["key"] and by_id["Description"] == "boto3 check", by_id
        assert by_id["KeyManager"] == "CUSTOMER" and by_id["Origin"] == "AWS_KMS", by_id

    def update_key_description():
        kms.update_key_description(KeyId=state["key"], Description="renamed")
        assert kms.describe_key(KeyId=state["key"])["KeyMetadata"]["Description"] == "renamed"

    def list_keys_paginated():
        extra = {kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(3)}
        pages = list(kms.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 2}))
        assert len(pages) >= 3, f"{len(pages)} pages of 2 for at least 5 keys"
        listed = [k["KeyId"] for page in pages for k in page["Keys"]]
        assert len(listed) == len(set(listed)), f"a key listed twice: {listed}"
        assert extra | {state["key"], state["key2"]} <= set(listed), listed
        assert all(k["KeyArn"].endswith(":key/" + k["KeyId"]) for page in pages for k in page["Keys"])
        assert pages[-1]["Truncated"] is False and "NextMarker" not in pages[-1], pages[-1]

    context = {"purpose": "boto3", "file": "a/b c"}

    def encrypt_decrypt_with_context():
        out = kms.encrypt(KeyId=state["key"], Plaintext=b"hello kmsd", EncryptionContext=context)
        assert out["KeyId"] == state["arn"], out["KeyId"]
        assert out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT", out
        state["ciphertext"] = out["CiphertextBlob"]
        back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=context)
        assert back["Plaintext"] == b"hello kmsd", back["Plaintext"]
        assert back["KeyId"] == state["arn"], back["KeyId"]

    def decrypt_wrong_context():
        expect_error(
            "InvalidCiphertextException",
            kms.decrypt,
            CiphertextBlob=state["ciphertext"],
            EncryptionContext={"purpose": "other", "file": "a/b c"},
        )
        expect_error("InvalidCiphertextException", kms.decrypt, CiphertextBlob=state["ciphertext"])

    def decrypt_with_the_wrong_key_id():
        expect_error(
            "IncorrectKeyException",
            kms.decrypt,
            CiphertextBlob=state["ciphertext"],
            EncryptionContext=context,
            KeyId=state["key2"],
        )

    def generate_data_key():
        out = kms.generate_data_key(KeyId=state["key"], KeySpec="AES_256", EncryptionContext=context)
        assert len(out["Plaintext"]) == 32, len(out["Plaintext"])
        assert out["KeyId"] == state["arn"], out["KeyId"]
        back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=context)
        assert back["Plaintext"] == out["Plaintext"]
        other = kms.generate_data_key(KeyId=state["key"], NumberOfBytes=64)
        assert len(other["Plaintext"]) == 64, len(other["Plaintext"])

    def generate_data_key_without_plaintext():
        out = kms.generate_data_key_without_plaintext(KeyId=state["key"], KeySpec="AES_128")
        assert "Plaintext" not in out, sorted(out)
        back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"])
        assert len(back["Plaintext"]) == 16, len(back["Plaintext"])

    def re_encrypt():
        out = kms.re_encrypt(
            CiphertextBlob=state["ciphertext"],
            SourceEncryptionContext=context,
            DestinationKeyId=state["key2"],
            DestinationEncryptionContext={"moved": "yes"},
        )
        assert out["SourceKeyId"] == state["arn"] and out["KeyId"] == state["arn2"], out
        back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"moved": "yes"})
        assert back["Plaintext"] == b"hello kmsd" and back["KeyId"] == state["arn2"], back

    def aliases_create_and_list():
        kms.create_alias(AliasName="alias/boto3-check", TargetKeyId=state["key"])
        listed = kms.list_aliases(KeyId=state["key"])["Aliases"]
        names = {a["AliasName"]: a for a in listed}
        assert "alias/boto3-check" in names, listed
        alias = names["alias/boto3-check"]
        assert alias["TargetKeyId"] == state["key"], alias
        assert alias["AliasArn"].endswith(":alias/boto3-check"), alias
        everything = [a for page in kms.get_paginator("list_aliases").paginate() for a in page["Aliases"]]
        assert any(a["AliasName"] == "alias/boto3-check" for a in everything), everything
        expect_error(
            "AlreadyExistsException", kms.create_alias, AliasName="alias/boto3-check", TargetKeyId=state["key2"]
        )

    def encrypt_via_alias():
        out = kms.encrypt(KeyId="alias/boto3-check", Plaintext=b"via alias")
        assert out["KeyId"] == state["arn"], out["KeyId"]
        assert kms.describe_key(KeyId="alias/boto3-check")["KeyMetadata"]["KeyId"] == state["key"]
        assert kms.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"] == b"via alias"

    def update_alias():
        kms.update_alias(AliasName="alias/boto3-check", TargetKeyId=state["key2"])
        listed = kms.list_aliases(KeyId=state["key2"])["Aliases"]
        assert [a["AliasName"] for a in listed] == ["alias/boto3-check"], listed
        assert kms.encrypt(KeyId="alias/boto3-check", Plaintext=b"x")["KeyId"] == state["arn2"]

    def delete_alias():
        kms.delete_alias(AliasName="alias/boto3-check")
        expect_error("NotFoundException", kms.describe_key, KeyId="alias/boto3-check")
        expect_error("NotFoundException", kms.delete_alias, AliasName="alias/boto3-check")

    def tags():
        kms.tag_resource(KeyId=state["key"], Tags=[{"TagKey": "env", "TagValue": "test"}])
        tags = {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=state["key"])["Tags"]}
        assert tags == {"team": "storage", "env": "test"}, tags
        kms.untag_resource(KeyId=state["key"], TagKeys=["team"])
        tags = kms.list_resource_tags(KeyId=state["key"])["Tags"]
        assert tags == [{"TagKey": "env", "TagValue": "test"}], tags

    def disable_enable():
        kms.disable_key(KeyId=state["key"])
        meta = kms.describe_key(KeyId=state["key"])["KeyMetadata"]
        assert meta["KeyState"] == "Disabled" and meta["Enabled"] is False, meta
        expect_error("DisabledException", kms.encrypt, KeyId=state["key"], Plaintext=b"x")
        expect_error("DisabledException", kms.decrypt, CiphertextBlob=state["ciphertext"], EncryptionContext=context)
        kms.enable_key(KeyId=state["key"])
        kms.encrypt(KeyId=state["key"], Plaintext=b"x")

    def schedule_and_cancel_deletion():
        out = kms.schedule_key_deletion(KeyId=state["key"], PendingWindowInDays=7)
        assert out["KeyId"] == state["arn"] and out["KeyState"] == "PendingDeletion", out
        assert out["PendingWindowInDays"] == 7, out
        in_a_week = datetime.now(timezone.utc) + timedelta(days=7)
        assert abs(out["DeletionDate"] - in_a_week) < timedelta(days=1), out["DeletionDate"]
        error = expect_error("KMSInvalidStateException", kms.encrypt, KeyId=state["key"], Plaintext=b"x")
        assert "pending deletion" in error.response["Error"]["Message"].lower(), error.response["Error"]
        assert kms.cancel_key_deletion(KeyId=state["key"])["KeyId"] == state["arn"]
        # As in AWS, a key whose deletion was cancelled is disabled until enabled again.
        meta = kms.describe_key(KeyId=state["key"])["KeyMetadata"]
        assert meta["KeyState"] == "Disabled" and "DeletionDate" not in meta, meta
        kms.enable_key(KeyId=state["key"])
        kms.encrypt(KeyId=state["key"], Plaintext=b"x")

    def rotation():
        key = kms.create_key(Description="rotation")["KeyMetadata"]["KeyId"]
        status = kms.get_key_rotation_status(KeyId=key)
        assert status["KeyRotationEnabled"] is False, status
        kms.enable_key_rotation(KeyId=key, RotationPeriodInDays=180)
        status = kms.get_key_rotation_status(KeyId=key)
        assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 180, status
        in_180_days = datetime.now(timezone.utc) + timedelta(days=180)
        assert abs(status["NextRotationDate"] - in_180_days) < timedelta(days=1), status
        old = kms.encrypt(KeyId=key, Plaintext=b"before")["CiphertextBlob"]
        first = kms.describe_key(KeyId=key)["KeyMetadata"]["CurrentKeyMaterialId"]
        assert kms.rotate_key_on_demand(KeyId=key)["KeyId"].endswith(key)
        current = kms.describe_key(KeyId=key)["KeyMetadata"]["CurrentKeyMaterialId"]
        assert current != first, current
        out = kms.decrypt(CiphertextBlob=old)
        assert out["Plaintext"] == b"before" and out["KeyMaterialId"] == first, out
        rotations = kms.list_key_rotations(KeyId=key)["Rotations"]
        assert len(rotations) == 1 and rotations[0]["RotationType"] == "ON_DEMAND", rotations
        assert rotations[0]["KeyMaterialId"] == current and isinstance(rotations[0]["RotationDate"], datetime)
        pages = kms.get_paginator("list_key_rotations").paginate(
            KeyId=key, IncludeKeyMaterial="ALL_KEY_MATERIAL", PaginationConfig={"PageSize": 1}
        )
        listed = [r["KeyMaterialId"] for page in pages for r in page["Rotations"]]
        assert listed == [first, current], listed
        kms.disable_key_rotation(KeyId=key)
        assert kms.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"] is False
        usage = kms.get_key_last_usage(KeyId=key)
        assert usage["KeyLastUsage"]["Operation"] == "Decrypt", usage
        assert isinstance(usage["TrackingStartDate"], datetime), usage

    def import_key_material():
        import os
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from wrap_key_material import wrap

        key = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]
        assert key["KeyState"] == "PendingImport" and key["Origin"] == "EXTERNAL", key
        material = os.urandom(32)
        params = kms.get_parameters_for_import(
            KeyId=key["KeyId"], WrappingAlgorithm="RSA_AES_KEY_WRAP_SHA_256", WrappingKeySpec="RSA_3072"
        )
        assert isinstance(params["ParametersValidTo"], datetime), params
        valid_to = datetime.now(timezone.utc) + timedelta(days=30)
        out = kms.import_key_material(
            KeyId=key["KeyId"],
            ImportToken=params["ImportToken"],
            EncryptedKeyMaterial=wrap(params["PublicKey"], "RSA_AES_KEY_WRAP_SHA_256", material),
            ExpirationModel="KEY_MATERIAL_EXPIRES",
            ValidTo=valid_to,
        )
        meta = kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]
        assert meta["KeyState"] == "Enabled" and meta["ExpirationModel"] == "KEY_MATERIAL_EXPIRES", meta
        assert abs(meta["ValidTo"] - valid_to) < timedelta(seconds=1), meta
        assert meta["CurrentKeyMaterialId"] == out["KeyMaterialId"], (meta, out)
        blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"byok")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"byok"
        other = kms.get_parameters_for_import(
            KeyId=key["KeyId"], WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048"
        )
        expect_error(
            "IncorrectKeyMaterialException",
            kms.import_key_material,
            KeyId=key["KeyId"],
            ImportToken=other["ImportToken"],
            EncryptedKeyMaterial=wrap(other["PublicKey"], "RSAES_OAEP_SHA_256", os.urandom(32)),
            ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
        )
        expect_error("UnsupportedOperationException", kms.enable_key_rotation, KeyId=key["KeyId"])
        deleted = kms.delete_imported_key_material(KeyId=key["KeyId"])
        assert deleted["KeyMaterialId"] == out["KeyMaterialId"], deleted
        assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "PendingImport"
        expect_error("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob)
        rotations = kms.list_key_rotations(KeyId=key["KeyId"], IncludeKeyMaterial="ALL_KEY_MATERIAL")
        assert rotations["Rotations"][0]["ImportState"] == "PENDING_IMPORT", rotations

    def describe_missing_key():
        expect_error("NotFoundException", kms.describe_key, KeyId="00000000-0000-4000-8000-000000000000")

    def encrypt_too_large():
        expect_error("ValidationException", kms.encrypt, KeyId=state["key"], Plaintext=b"\0" * 4097)
        kms.encrypt(KeyId=state["key"], Plaintext=b"\0" * 4096)

    def generate_random():
        out = kms.generate_random(NumberOfBytes=64)
        assert len(out["Plaintext"]) == 64, len(out["Plaintext"])
        assert out["Plaintext"] != kms.generate_random(NumberOfBytes=64)["Plaintext"]

    def unknown_key_spec():
        expect_error("ValidationException", kms.generate_data_key, KeyId=state["key"], KeySpec="AES_512")

    # Asymmetric and HMAC keys. Every public key, signature and shared secret is judged by
    # `cryptography`, so a reply botocore parses but no other party could use still fails.
    signing_specs = {
        "RSA_2048": ("rsa", 2048),
        "RSA_3072": ("rsa", 3072),
        "ECC_NIST_P256": ("ec", ec.SECP256R1),
        "ECC_NIST_P384": ("ec", ec.SECP384R1),
        "ECC_NIST_P521": ("ec", ec.SECP521R1),
        "ECC_SECG_P256K1": ("ec", ec.SECP256K1),
        "ECC_NIST_EDWARDS25519": ("ed25519", None),
    }

    def create_asymmetric_and_hmac_keys():
        made = {}
        for spec in signing_specs:
            meta = kms.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]
            assert meta["KeySpec"] == spec and meta["KeyUsage"] == "SIGN_VERIFY", meta
            assert meta["SigningAlgorithms"], meta
            assert "EncryptionAlgorithms" not in meta and "MacAlgorithms" not in meta, meta
            made[spec] = meta
        assert "ECDSA_SHA_256" in made["ECC_NIST_P256"]["SigningAlgorithms"], made["ECC_NIST_P256"]
        assert "RSASSA_PSS_SHA_256" in made["RSA_2048"]["SigningAlgorithms"], made["RSA_2048"]
        assert made["ECC_NIST_EDWARDS25519"]["SigningAlgorithms"] == ["ED25519_SHA_512"], made
        state["signing"] = {spec: meta["KeyId"] for spec, meta in made.items()}
        rsa_meta = kms.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
        assert set(rsa_meta["EncryptionAlgorithms"]) == {"RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"}, rsa_meta
        assert "SigningAlgorithms" not in rsa_meta, rsa_meta
        state["rsa_encrypt"], state["rsa_encrypt_arn"] = rsa_meta["KeyId"], rsa_meta["Arn"]
        agreement = kms.create_key(KeySpec="ECC_NIST_P384", KeyUsage="KEY_AGREEMENT")["KeyMetadata"]
        assert agreement["KeyAgreementAlgorithms"] == ["ECDH"], agreement
        state["agreement"] = agreement["KeyId"]
        macs = {}
        for spec in ("HMAC_224", "HMAC_256", "HMAC_384", "HMAC_512"):
            meta = kms.create_key(KeySpec=spec, KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
            assert meta["MacAlgorithms"] == ["HMAC_SHA_" + spec[5:]], meta
            macs[spec] = meta["KeyId"]
        state["hmac"] = macs

    def create_key_spec_and_usage_refused():
        expect_error("ValidationException", kms.create_key, KeySpec="ECC_NIST_P256", KeyUsage="ENCRYPT_DECRYPT")
        expect_error("ValidationException", kms.create_key, KeySpec="HMAC_256", KeyUsage="SIGN_VERIFY")

    def public_key_der(key):
        out = kms.get_public_key(KeyId=key)
        assert out["KeyId"].endswith(":key/" + key), out["KeyId"]
        return out, serialization.load_der_public_key(out["PublicKey"])

    def get_public_key():
        for spec, key in state["signing"].items():
            out, public = public_key_der(key)
            assert out["KeySpec"] == spec and out["KeyUsage"] == "SIGN_VERIFY", out
            assert out["SigningAlgorithms"], out
            kind, size = signing_specs[spec]
            if kind == "rsa":
                assert isinstance(public, rsa.RSAPublicKey) and public.key_size == size, (spec, public)
            elif kind == "ec":
                assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, size), spec
            else:
                assert isinstance(public, ed25519.Ed25519PublicKey), (spec, public)
        out, public = public_key_der(state["rsa_encrypt"])
        assert out["KeyUsage"] == "ENCRYPT_DECRYPT" and isinstance(public, rsa.RSAPublicKey), out
        assert "RSAES_OAEP_SHA_256" in out["EncryptionAlgorithms"], out
        out, public = public_key_der(state["agreement"])
        assert out["KeyAgreementAlgorithms"] == ["ECDH"] and isinstance(public.curve, ec.SECP384R1), out
        expect_error("UnsupportedOperationException", kms.get_public_key, KeyId=state["hmac"]["HMAC_256"])
        expect_error("UnsupportedOperationException", kms.get_public_key, KeyId=state["key"])

    def verify_locally(public, algorithm, message, signature, prehashed=False):
        """Checks a kmsd signature with `cryptography` (PSS salt as long as the hash, as AWS)."""
        if algorithm == "ED25519_SHA_512":
            public.verify(signature, message)
            return
        digest = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}[algorithm[-3:]]()
        hashing = utils.Prehashed(digest) if prehashed else digest
        if algorithm.startswith("ECDSA_"):
            public.verify(signature, message, ec.ECDSA(hashing))
        elif algorithm.startswith("RSASSA_PSS_"):
            pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            public.verify(signature, message, pss, hashing)
        else:
            public.verify(signature, message, padding.PKCS1v15(), hashing)

    def sign_verify_raw():
        message = b"signed by kmsd, judged by cryptography " * 50
        for spec, key in state["signing"].items():
            _, public = public_key_der(key)
            for algorithm in kms.describe_key(KeyId=key)["KeyMetadata"]["SigningAlgorithms"]:
                out = kms.sign(KeyId=key, Message=message, MessageType="RAW", SigningAlgorithm=algorithm)
                assert out["SigningAlgorithm"] == algorithm and out["KeyId"].endswith(key), out
                verify_locally(public, algorithm, message, out["Signature"])
                ok = kms.verify(
                    KeyId=key, Message=message, Signature=out["Signature"], SigningAlgorithm=algorithm
                )
                assert ok["SignatureValid"] is True and ok["SigningAlgorithm"] == algorithm, (spec, ok)

    def sign_verify_digest():
        message = b"a message hashed by the caller"
        cases = [
            ("ECC_NIST_P256", "ECDSA_SHA_256", hashlib.sha256),
            ("ECC_NIST_P384", "ECDSA_SHA_384", hashlib.sha384),
            ("ECC_SECG_P256K1", "ECDSA_SHA_256", hashlib.sha256),
            ("RSA_2048", "RSASSA_PSS_SHA_256", hashlib.sha256),
            ("RSA_3072", "RSASSA_PKCS1_V1_5_SHA_512", hashlib.sha512),
        ]
        for spec, algorithm, hash_function in cases:
            key, digest = state["signing"][spec], hash_function(message).digest()
            _, public = public_key_der(key)
            out = kms.sign(KeyId=key, Message=digest, MessageType="DIGEST", SigningAlgorithm=algorithm)
            verify_locally(public, algorithm, digest, out["Signature"], prehashed=True)
            # A DIGEST signature is the RAW signature of the message it is the digest of.
            verify_locally(public, algorithm, message, out["Signature"])
            for kind, signed in (("DIGEST", digest), ("RAW", message)):
                ok = kms.verify(
                    KeyId=key, Message=signed, MessageType=kind, Signature=out["Signature"], SigningAlgorithm=algorithm
                )
                assert ok["SignatureValid"] is True, (spec, kind, ok)

    def verify_refuses_a_bad_signature():
        key = state["signing"]["ECC_NIST_P256"]
        signature = kms.sign(KeyId=key, Message=b"original", SigningAlgorithm="ECDSA_SHA_256")["Signature"]
        expect_error(
            "KMSInvalidSignatureException",
            kms.verify,
            KeyId=key,
            Message=b"tampered",
            Signature=signature,
            SigningAlgorithm="ECDSA_SHA_256",
        )
        flipped = signature[:-1] + bytes([signature[-1] ^ 1])
        expect_error(
            "KMSInvalidSignatureException",
            kms.verify,
            KeyId=key,
            Message=b"original",
            Signature=flipped,
            SigningAlgorithm="ECDSA_SHA_256",
        )
        rsa_key = state["signing"]["RSA_2048"]
        rsa_signature = kms.sign(KeyId=rsa_key, Message=b"original", SigningAlgorithm="RSASSA_PSS_SHA_256")
        expect_error(
            "KMSInvalidSignatureException",
            kms.verify,
            KeyId=state["signing"]["RSA_3072"],
            Message=b"original",
            Signature=rsa_signature["Signature"],
            SigningAlgorithm="RSASSA_PSS_SHA_256",
        )

    def digest_of_the_wrong_length():
        key = state["signing"]["ECC_NIST_P256"]
        for length in (31, 33, 48):
            expect_error(
                "ValidationException",
                kms.sign,
                KeyId=key,
                Message=b"\x01" * length,
                MessageType="DIGEST",
                SigningAlgorithm="ECDSA_SHA_256",
            )
        expect_error(
            "ValidationException",
            kms.verify,
            KeyId=state["signing"]["RSA_2048"],
            Message=b"\x01" * 20,
            MessageType="DIGEST",
            Signature=b"\x00" * 256,
            SigningAlgorithm="RSASSA_PSS_SHA_256",
        )

    def key_usage_refused():
        signing = state["signing"]["ECC_NIST_P256"]
        refusals = [
            (kms.sign, dict(KeyId=signing, Message=b"m", SigningAlgorithm="ECDSA_SHA_384")),
            (kms.sign, dict(KeyId=signing, Message=b"m", SigningAlgorithm="RSASSA_PSS_SHA_256")),
            (kms.sign, dict(KeyId=state["key"], Message=b"m", SigningAlgorithm="ECDSA_SHA_256")),
            (kms.sign, dict(KeyId=state["rsa_encrypt"], Message=b"m", SigningAlgorithm="RSASSA_PSS_SHA_256")),
            (kms.encrypt, dict(KeyId=signing, Plaintext=b"m")),
            (kms.encrypt, dict(KeyId=state["signing"]["RSA_2048"], Plaintext=b"m", EncryptionAlgorithm="RSAES_OAEP_SHA_256")),
            (kms.generate_mac, dict(KeyId=signing, Message=b"m", MacAlgorithm="HMAC_SHA_256")),
            (kms.generate_mac, dict(KeyId=state["hmac"]["HMAC_256"], Message=b"m", MacAlgorithm="HMAC_SHA_512")),
            (kms.generate_data_key, dict(KeyId=state["hmac"]["HMAC_256"], KeySpec="AES_256")),
            (kms.generate_data_key_pair, dict(KeyId=signing, KeyPairSpec="ECC_NIST_P256")),
            (
                kms.derive_shared_secret,
                dict(KeyId=signing, KeyAgreementAlgorithm="ECDH", PublicKey=peer_public_der(ec.SECP256R1())[1]),
            ),
        ]
        for call, kwargs in refusals:
            try:
                expect_error("InvalidKeyUsageException", call, **kwargs)
            except AssertionError as e:
                raise AssertionError(f"{call.__name__}({kwargs.get('KeyId')}, ...): {e}") from None

    def generate_verify_mac():
        message = b"authenticated by kmsd"
        for spec, key in state["hmac"].items():
            algorithm = "HMAC_SHA_" + spec[5:]
            out = kms.generate_mac(KeyId=key, Message=message, MacAlgorithm=algorithm)
            assert len(out["Mac"]) == int(spec[5:]) // 8 and out["MacAlgorithm"] == algorithm, (spec, out)
            assert out["KeyId"].endswith(":key/" + key), out
            again = kms.generate_mac(KeyId=key, Message=message, MacAlgorithm=algorithm)["Mac"]
            assert again == out["Mac"], "an HMAC of the same message under the same key changed"
            assert kms.generate_mac(KeyId=key, Message=message + b".", MacAlgorithm=algorithm)["Mac"] != out["Mac"]
            ok = kms.verify_mac(KeyId=key, Message=message, Mac=out["Mac"], MacAlgorithm=algorithm)
            assert ok["MacValid"] is True and ok["MacAlgorithm"] == algorithm, ok
        key = state["hmac"]["HMAC_256"]
        mac = kms.generate_mac(KeyId=key, Message=message, MacAlgorithm="HMAC_SHA_256")["Mac"]
        for wrong in (bytes([mac[0] ^ 1]) + mac[1:], mac[:-1], b"\0" * 32):
            expect_error(
                "KMSInvalidMacException", kms.verify_mac, KeyId=key, Message=message, Mac=wrong, MacAlgorithm="HMAC_SHA_256"
            )
        other = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
        expect_error(
            "KMSInvalidMacException", kms.verify_mac, KeyId=other, Message=message, Mac=mac, MacAlgorithm="HMAC_SHA_256"
        )

    def peer_public_der(curve):
        peer = ec.generate_private_key(curve)
        spki = peer.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return peer, spki

    def derive_shared_secret():
        key = state["agreement"]
        _, ours = public_key_der(key)
        peer, spki = peer_public_der(ec.SECP384R1())
        out = kms.derive_shared_secret(KeyId=key, KeyAgreementAlgorithm="ECDH", PublicKey=spki)
        assert out["KeyAgreementAlgorithm"] == "ECDH" and out["KeyOrigin"] == "AWS_KMS", out
        assert out["KeyId"].endswith(":key/" + key), out
        expected = peer.exchange(ec.ECDH(), ours)
        assert out["SharedSecret"] == expected, "kmsd's ECDH secret differs from cryptography's"
        again = kms.derive_shared_secret(KeyId=key, KeyAgreementAlgorithm="ECDH", PublicKey=spki)
        assert again["SharedSecret"] == expected
        _, other_curve = peer_public_der(ec.SECP256R1())
        expect_error(
            "ValidationException", kms.derive_shared_secret, KeyId=key, KeyAgreementAlgorithm="ECDH", PublicKey=other_curve
        )

    def check_pair(private_der, public_der, spec):
        private = serialization.load_der_private_key(private_der, password=None)
        own = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert own == public_der, f"{spec}: PublicKey is not the private key's public half"
        kind, size = signing_specs[spec]
        if kind == "rsa":
            assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == size, spec
        elif kind == "ec":
            assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, size), spec
        else:
            assert isinstance(private, ed25519.Ed25519PrivateKey), spec

    def generate_data_key_pair():
        for spec in ("RSA_2048", "ECC_NIST_P256", "ECC_SECG_P256K1", "ECC_NIST_EDWARDS25519"):
            out = kms.generate_data_key_pair(KeyId=state["key"], KeyPairSpec=spec, EncryptionContext=context)
            assert out["KeyPairSpec"] == spec and out["KeyId"] == state["arn"], out
            check_pair(out["PrivateKeyPlaintext"], out["PublicKey"], spec)
            back = kms.decrypt(CiphertextBlob=out["PrivateKeyCiphertextBlob"], EncryptionContext=context)
            assert back["Plaintext"] == out["PrivateKeyPlaintext"], spec
        expect_error("ValidationException", kms.generate_data_key_pair, KeyId=state["key"], KeyPairSpec="RSA_1024")

    def generate_data_key_pair_without_plaintext():
        out = kms.generate_data_key_pair_without_plaintext(KeyId=state["key"], KeyPairSpec="ECC_NIST_P384")
        assert "PrivateKeyPlaintext" not in out and out["KeyPairSpec"] == "ECC_NIST_P384", sorted(out)
        private = kms.decrypt(CiphertextBlob=out["PrivateKeyCiphertextBlob"])["Plaintext"]
        check_pair(private, out["PublicKey"], "ECC_NIST_P384")

    def rsa_encrypt_decrypt():
        key, arn = state["rsa_encrypt"], state["rsa_encrypt_arn"]
        for algorithm in ("RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1"):
            out = kms.encrypt(KeyId=key, Plaintext=b"for an RSA key", EncryptionAlgorithm=algorithm)
            assert out["KeyId"] == arn and out["EncryptionAlgorithm"] == algorithm, out
            assert len(out["CiphertextBlob"]) == 256, len(out["CiphertextBlob"])
            back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], KeyId=key, EncryptionAlgorithm=algorithm)
            assert back["Plaintext"] == b"for an RSA key" and back["KeyId"] == arn, back
            assert back["EncryptionAlgorithm"] == algorithm, back
        # Ciphertext made by cryptography with the public key alone opens in kmsd.
        _, public = public_key_der(key)
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        sealed = public.encrypt(b"sealed outside kmsd", oaep)
        back = kms.decrypt(CiphertextBlob=sealed, KeyId=key, EncryptionAlgorithm="RSAES_OAEP_SHA_256")
        assert back["Plaintext"] == b"sealed outside kmsd", back
        state["rsa_ciphertext"] = sealed
        # RSA_2048 with OAEP SHA-256 holds at most 256 - 2*32 - 2 = 190 bytes.
        kms.encrypt(KeyId=key, Plaintext=b"\0" * 190, EncryptionAlgorithm="RSAES_OAEP_SHA_256")
        expect_error(
            "ValidationException", kms.encrypt, KeyId=key, Plaintext=b"\0" * 191, EncryptionAlgorithm="RSAES_OAEP_SHA_256"
        )

    def rsa_decrypt_refusals():
        key, sealed = state["rsa_encrypt"], state["rsa_ciphertext"]
        expect_error("InvalidKeyUsageException", kms.encrypt, KeyId=key, Plaintext=b"x")
        expect_error(
            "InvalidCiphertextException",
            kms.decrypt,
            CiphertextBlob=sealed[:-1] + bytes([sealed[-1] ^ 1]),
            KeyId=key,
            EncryptionAlgorithm="RSAES_OAEP_SHA_256",
        )
        expect_error(
            "InvalidCiphertextException", kms.decrypt, CiphertextBlob=sealed, KeyId=key, EncryptionAlgorithm="RSAES_OAEP_SHA_1"
        )
        expect_error("ValidationException", kms.decrypt, CiphertextBlob=sealed, EncryptionAlgorithm="RSAES_OAEP_SHA_256")

    def rsa_re_encrypt():
        key, arn = state["rsa_encrypt"], state["rsa_encrypt_arn"]
        out = kms.re_encrypt(
            CiphertextBlob=state["rsa_ciphertext"],
            SourceKeyId=key,
            SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256",
            DestinationKeyId=state["key2"],
        )
        assert out["SourceKeyId"] == arn and out["KeyId"] == state["arn2"], out
        assert out["SourceEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256", out
        assert out["DestinationEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT", out
        assert kms.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"] == b"sealed outside kmsd"
        back = kms.re_encrypt(
            CiphertextBlob=out["CiphertextBlob"],
            DestinationKeyId=key,
            DestinationEncryptionAlgorithm="RSAES_OAEP_SHA_256",
        )
        assert back["KeyId"] == arn and back["DestinationEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256", back
        opened = kms.decrypt(CiphertextBlob=back["CiphertextBlob"], KeyId=key, EncryptionAlgorithm="RSAES_OAEP_SHA_256")
        assert opened["Plaintext"] == b"sealed outside kmsd", opened

    checks = [
        create_key,
        create_key_tags,
        describe_key,
        update_key_description,
        list_keys_paginated,
        encrypt_decrypt_with_context,
        decrypt_wrong_context,
        decrypt_with_the_wrong_key_id,
        generate_data_key,
        generate_data_key_without_plaintext,
        re_encrypt,
        aliases_create_and_list,
        encrypt_via_alias,
        update_alias,
        delete_alias,
        tags,
        disable_enable,
        schedule_and_cancel_deletion,
        rotation,
        import_key_material,
        describe_missing_key,
        encrypt_too_large,
        generate_random,
        unknown_key_spec,
        create_asymmetric_and_hmac_keys,
        create_key_spec_and_usage_refused,
        get_public_key,
        sign_verify_raw,
        sign_verify_digest,
        verify_refuses_a_bad_signature,
        digest_of_the_wrong_length,
        key_usage_refused,
        generate_verify_mac,
        derive_shared_secret,
        generate_data_key_pair,
        generate_data_key_pair_without_plaintext,
        rsa_encrypt_decrypt,
        rsa_decrypt_refusals,
        rsa_re_encrypt,
    ]
    for check in checks:
        if not checker.run(check.__name__, check) and check is create_key:
            print("the remaining checks need the keys create_key makes; stopping")
            break
    print(f"boto3: {checker.passed} passed, {checker.failed} failed (boto3 {boto3.__version__})")
    sys.exit(1 if checker.failed else 0)


if __name__ == "__main__":
    main()
