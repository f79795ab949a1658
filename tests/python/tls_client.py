#!/usr/bin/env python3
"""boto3 and a raw HTTP client against kmsd's TLS listener, for tests/tests/tls.rs.

Nothing adapts the transport: boto3 is pointed at an https:// endpoint with `verify=` the
test's CA, and with botocore's `client_cert` for mutual TLS, as any user would.

Usage (one JSON line on stdout, exit 0 whatever the outcome; the Rust test judges it):
  tls_client.py kms ENDPOINT OPERATION PARAMS_JSON   one KMS call; the blob members
                                                       Plaintext and CiphertextBlob are base64
  tls_client.py roundtrip ENDPOINT KEY_ID            Encrypt then Decrypt with a context
  tls_client.py raw ENDPOINT TARGET                  an unsigned POST / (http:// or https://)

Environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the access key), TLS_CA (the CA
file to verify the server with), TLS_CLIENT_CERT and TLS_CLIENT_KEY (a client certificate).
Output: {"ok": reply} | {"error": {"code", "message"}} | {"transport": {"type", "message"}}
(the connection failed: TLS refused, reset, ...) | for raw, {"status", "headers", "body"}.
"""

import base64
import http.client
import json
import os
import ssl
import sys
import urllib.parse

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError as e:
    sys.exit(f"boto3 is missing ({e}); run the README's test command, which installs it")

BLOB_MEMBERS = ("Plaintext", "CiphertextBlob")


def emit(value):
    print(json.dumps(value, default=lambda b: base64.b64encode(b).decode() if isinstance(b, bytes) else str(b)))


def kms_client(endpoint):
    cert, key = os.environ.get("TLS_CLIENT_CERT"), os.environ.get("TLS_CLIENT_KEY")
    config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=20,
                    client_cert=(cert, key) if cert else None)
    return boto3.client("kms", endpoint_url=endpoint, region_name="local", verify=os.environ.get("TLS_CA") or True,
                        config=config)


def guarded(fn):
    try:
        emit({"ok": fn()})
    except ClientError as e:
        emit({"error": {"code": e.response["Error"]["Code"], "message": e.response["Error"].get("Message", "")}})
    except (BotoCoreError, OSError) as e:
        emit({"transport": {"type": type(e).__name__, "message": str(e)}})


def kms(endpoint, operation, params):
    params = json.loads(params)
    for member in BLOB_MEMBERS:
        if member in params:
            params[member] = base64.b64decode(params[member])
    client = kms_client(endpoint)
    names = {api: method for method, api in client.meta.method_to_api_mapping.items()}
    method = getattr(client, names[operation])

    def call():
        reply = method(**params)
        reply.pop("ResponseMetadata", None)
        return reply
    guarded(call)


def roundtrip(endpoint, key_id):
    client = kms_client(endpoint)
    plaintext = os.urandom(100)
    context = {"purpose": "tls-test"}

    def run():
        blob = client.encrypt(KeyId=key_id, Plaintext=plaintext, EncryptionContext=context)["CiphertextBlob"]
        back = client.decrypt(CiphertextBlob=blob, EncryptionContext=context)
        assert back["Plaintext"] == plaintext, "Decrypt did not return the plaintext"
        return {"KeyId": back["KeyId"], "CiphertextBytes": len(blob)}
    guarded(run)


def raw(endpoint, target):
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme == "https":
        context = ssl.create_default_context(cafile=os.environ.get("TLS_CA"))
        conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=20, context=context)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
    try:
        conn.request("POST", "/", body=b"{}", headers={"X-Amz-Target": target,
                                                       "Content-Type": "application/x-amz-json-1.1"})
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        emit({"status": response.status, "headers": {k.lower(): v for k, v in response.getheaders()}, "body": body})
    except OSError as e:
        emit({"transport": {"type": type(e).__name__, "message": str(e)}})


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {"kms": kms, "roundtrip": roundtrip, "raw": raw}[mode](*args)
