#!/usr/bin/env python3
"""Unmodified AWS SDKs against kmsd's TCP listener (`kmsd --listen-tcp`), signing with SigV4.

Nothing here adapts the transport: boto3, the aws CLI and the AWS Encryption SDK are pointed
at the endpoint as they would be at any KMS-compatible service (endpoint_url,
--endpoint-url, AWS_ENDPOINT_URL_KMS), with an access key from kmsd's access-keys.json.

Checks: boto3 KMS (CreateKey, Encrypt/Decrypt with an encryption context, GenerateDataKey,
ListKeys); STS GetCallerIdentity names the access key's principal; the AWS Encryption SDK
encrypts and decrypts a 100 KiB message (envelope encryption: GenerateDataKey, then
Decrypt of the data key); the aws CLI lists keys, encrypts and decrypts. And refusals: a
wrong secret, an unknown access key, a signature 20 minutes old and an unsigned request.

Usage: sdk_clients.py ENDPOINT ACCESS_KEY_ID SECRET_ACCESS_KEY EXPECTED_ARN
Prints one line per check and a summary `sdk: N passed, M failed`; exits non-zero on failure.
"""

import base64
import contextlib
import datetime
import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import traceback
import urllib.parse
from unittest import mock

try:
    import aws_encryption_sdk
    import aws_encryption_sdk.exceptions
    import boto3
    import botocore.auth
    import botocore.session
    from aws_encryption_sdk.identifiers import CommitmentPolicy
    from botocore.awsrequest import AWSRequest
    from cryptography.exceptions import InvalidTag
    from botocore.config import Config
    from botocore.credentials import Credentials
    from botocore.exceptions import ClientError
except ImportError as e:
    sys.exit(f"a Python AWS SDK is missing ({e}); run the README's test command, which installs boto3, awscli "
             "and aws-encryption-sdk")

ENDPOINT, KEY_ID, SECRET, EXPECTED_ARN = sys.argv[1:5]
REGION = "local"
NO_RETRIES = Config(retries={"max_attempts": 1, "mode": "standard"})

passed, failed = 0, 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok   {name}")
    except Exception:
        failed += 1
        print(f"FAIL {name}")
        traceback.print_exc(file=sys.stdout)


def client(service, key_id=KEY_ID, secret=SECRET):
    return boto3.client(service, endpoint_url=ENDPOINT, region_name=REGION, aws_access_key_id=key_id,
                        aws_secret_access_key=secret, config=NO_RETRIES)


def expect_error(code, fn, contains=None):
    try:
        fn()
    except ClientError as e:
        got = e.response["Error"]["Code"]
        assert got == code, f"expected {code}, got {got}: {e}"
        if contains:
            assert contains in e.response["Error"]["Message"], e.response["Error"]["Message"]
        return e
    raise AssertionError(f"expected {code}, but the call succeeded")


kms = client("kms")
state = {}


def create_key():
    meta = kms.create_key(Description="sdk clients")["KeyMetadata"]
    state["key_id"], state["arn"] = meta["KeyId"], meta["Arn"]
    assert meta["Arn"].startswith("arn:aws:kms:local:"), meta["Arn"]


def encrypt_decrypt_with_context():
    ctx = {"purpose": "sdk-test", "volume": "v1"}
    blob = kms.encrypt(KeyId=state["key_id"], Plaintext=b"over tcp", EncryptionContext=ctx)["CiphertextBlob"]
    out = kms.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)
    assert out["Plaintext"] == b"over tcp" and out["KeyId"] == state["arn"], out
    expect_error("InvalidCiphertextException",
                 lambda: kms.decrypt(CiphertextBlob=blob, EncryptionContext={"purpose": "other"}))


def generate_data_key():
    out = kms.generate_data_key(KeyId=state["key_id"], KeySpec="AES_256")
    assert len(out["Plaintext"]) == 32
    assert kms.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"] == out["Plaintext"]
    assert any(k["KeyId"] == state["key_id"] for k in kms.list_keys()["Keys"])


def sts_get_caller_identity():
    ident = client("sts").get_caller_identity()
    assert ident["Arn"] == EXPECTED_ARN, ident
    assert ident["Account"] == EXPECTED_ARN.split(":")[4], ident
    assert ident["UserId"], ident


def encryption_sdk_round_trip():
    os.environ["AWS_ENDPOINT_URL_KMS"] = ENDPOINT  # botocore's own per-service endpoint setting
    session = botocore.session.Session()
    session.set_credentials(KEY_ID, SECRET)
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[state["arn"]], botocore_session=session)
    esdk = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    message = os.urandom(100 * 1024)
    context = {"app": "kmsfs-sdk-test"}
    ciphertext, header = esdk.encrypt(source=message, key_provider=provider, encryption_context=context)
    assert message not in ciphertext and len(ciphertext) > len(message)
    assert [k.key_provider.key_info.decode() for k in header.encrypted_data_keys] == [state["arn"]], header
    plaintext, dec_header = esdk.decrypt(source=ciphertext, key_provider=provider)
    assert plaintext == message
    assert dec_header.encryption_context["app"] == "kmsfs-sdk-test"
    tampered = bytearray(ciphertext)
    tampered[-200] ^= 1
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the SDK prints the chained InvalidTag
            esdk.decrypt(source=bytes(tampered), key_provider=provider)
    except (aws_encryption_sdk.exceptions.AWSEncryptionSDKClientError, InvalidTag):
        pass
    else:
        raise AssertionError("a tampered message decrypted")


def aws_cli(*args, stdin=None):
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION,
               AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_MAX_ATTEMPTS="1")
    env.pop("AWS_ENDPOINT_URL_KMS", None)
    out = subprocess.run(["aws", "--endpoint-url", ENDPOINT, "--region", REGION, "--output", "json", *args],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"aws {' '.join(args)}: {out.returncode}\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout)


def aws_cli_list_encrypt_decrypt():
    keys = aws_cli("kms", "list-keys")["Keys"]
    assert any(k["KeyId"] == state["key_id"] for k in keys), keys
    with tempfile.TemporaryDirectory() as d:
        plain = os.path.join(d, "plain")
        with open(plain, "wb") as f:
            f.write(b"from the aws cli")
        blob_b64 = aws_cli("kms", "encrypt", "--key-id", state["key_id"], "--plaintext", f"fileb://{plain}",
                           "--encryption-context", "tool=awscli")["CiphertextBlob"]
        blob = os.path.join(d, "blob")
        with open(blob, "wb") as f:
            f.write(base64.b64decode(blob_b64))
        out = aws_cli("kms", "decrypt", "--ciphertext-blob", f"fileb://{blob}", "--encryption-context", "tool=awscli")
        assert base64.b64decode(out["Plaintext"]) == b"from the aws cli", out
        assert out["KeyId"] == state["arn"], out


def wrong_secret():
    bad = client("kms", secret=SECRET[:-1] + ("x" if SECRET[-1] != "x" else "y"))
    expect_error("InvalidSignatureException", bad.list_keys, "signature we calculated does not match")
    expect_error("SignatureDoesNotMatch", client("sts", secret=SECRET + "x").get_caller_identity)


def unknown_access_key():
    stranger = client("kms", key_id="AKIAUNKNOWNKEY000000")
    expect_error("UnrecognizedClientException", stranger.list_keys, "security token included in the request is invalid")
    expect_error("InvalidClientTokenId", client("sts", key_id="AKIAUNKNOWNKEY000000").get_caller_identity)


def expired_signature():
    twenty_minutes_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=20)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=twenty_minutes_ago):
        expect_error("InvalidSignatureException", kms.list_keys, "Signature expired")


def raw_post(headers, body=b"{}"):
    url = urllib.parse.urlparse(ENDPOINT)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", "/", body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def unsigned_request():
    status, body = raw_post({"X-Amz-Target": "TrentService.ListKeys", "Content-Type": "application/x-amz-json-1.1"})
    error = json.loads(body)
    assert status == 400 and error["__type"] == "MissingAuthenticationTokenException", (status, body)
    # A signature for one request does not carry over to another body.
    req = AWSRequest(method="POST", url=ENDPOINT + "/", data=b"{}",
                     headers={"X-Amz-Target": "TrentService.ListKeys", "Content-Type": "application/x-amz-json-1.1"})
    botocore.auth.SigV4Auth(Credentials(KEY_ID, SECRET), "kms", REGION).add_auth(req)
    headers = dict(req.prepare().headers)
    status, body = raw_post(headers, b'{"Limit": 1}')
    assert json.loads(body)["__type"] == "InvalidSignatureException", body
    status, body = raw_post(headers, b"{}")
    assert status == 200 and "Keys" in json.loads(body), (status, body)


check("boto3 kms CreateKey", create_key)
check("boto3 kms Encrypt/Decrypt with encryption context", encrypt_decrypt_with_context)
check("boto3 kms GenerateDataKey, ListKeys", generate_data_key)
check("boto3 sts GetCallerIdentity names the principal", sts_get_caller_identity)
check("aws-encryption-sdk envelope round trip of 100 KiB", encryption_sdk_round_trip)
check("aws cli kms list-keys, encrypt, decrypt", aws_cli_list_encrypt_decrypt)
check("a wrong secret is InvalidSignatureException", wrong_secret)
check("an unknown access key is UnrecognizedClientException", unknown_access_key)
check("a 20-minute-old signature is InvalidSignatureException: Signature expired", expired_signature)
check("an unsigned or re-bodied request is refused", unsigned_request)

print(f"sdk: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
