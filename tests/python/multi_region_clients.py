#!/usr/bin/env python3
"""Multi-Region keys as AWS's own clients see them, for tests/tests/multi_region.rs.

Two agents of two regions, each reached on its Unix socket: botocore serializes requests
and parses replies (ReplicateKey, DescribeKey's MultiRegionConfiguration,
UpdatePrimaryRegion), and every raw reply is held to the service model as boto3_client.py
does. Then the AWS Encryption SDK, which knows multi-Region keys: a message encrypted under
the primary's ARN in the first region decrypts with the MRK-aware master key provider given
only the replica's ARN in the second (it calls Decrypt there, with that ARN), while the
strict provider, which matches ARNs exactly, refuses it. The transport routes each request
by the region in botocore's endpoint URL (kms.<region>.amazonaws.com) to that region's
socket; nothing else is adapted.

Usage: multi_region_clients.py REGION_A SOCKET_A REGION_B SOCKET_B
Prints one line per check and a summary; exits non-zero if any check failed.

       multi_region_clients.py peer ENDPOINT REGION TARGET BODY_JSON
One SigV4-signed POST of a peer action (`KmsfsPeer.…`) to an agent's TLS listener, as
another agent would send it (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; TLS_CA, and
TLS_CLIENT_CERT / TLS_CLIENT_KEY for mutual TLS); prints {"status", "body"}.
"""

import contextlib
import http.client
import io
import json
import os
import ssl
import sys
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boto3_client import Checker, unix_transport  # noqa: E402  (shared transport and model checks)

try:
    import aws_encryption_sdk
    import aws_encryption_sdk.exceptions
    import botocore.session
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    from aws_encryption_sdk.identifiers import CommitmentPolicy
    from aws_encryption_sdk.key_providers.kms import MRKAwareStrictAwsKmsMasterKeyProvider
except ImportError as e:
    sys.exit(f"a Python AWS SDK is missing ({e}); run the README's test command, which installs them")

if sys.argv[1:2] != ["peer"]:
    REGION_A, SOCKET_A, REGION_B, SOCKET_B = sys.argv[1:5]
    SOCKETS = {REGION_A: SOCKET_A, REGION_B: SOCKET_B}


def peer_call(endpoint, region, target, body):
    """A peer action signed and sent as kmsd's own peer client sends one."""
    request = AWSRequest(method="POST", url=endpoint + "/", data=body.encode(),
                         headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target})
    credentials = Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    SigV4Auth(credentials, "kms", region).add_auth(request)
    context = ssl.create_default_context(cafile=os.environ["TLS_CA"])
    if os.environ.get("TLS_CLIENT_CERT"):
        context.load_cert_chain(os.environ["TLS_CLIENT_CERT"], os.environ["TLS_CLIENT_KEY"])
    url = urllib.parse.urlsplit(endpoint)
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=10)
    conn.request("POST", "/", body=request.body, headers=dict(request.headers.items()))
    reply = conn.getresponse()
    print(json.dumps({"status": reply.status, "body": json.loads(reply.read() or b"{}")}))


def by_region(request, **kwargs):
    """Sends a request to the socket of the region botocore addressed it to."""
    host = urllib.parse.urlsplit(request.url).hostname or ""
    region = next((r for r in SOCKETS if f".{r}." in f".{host}."), None)
    if region is None:
        raise AssertionError(f"a request to {host}, which is neither {REGION_A} nor {REGION_B}")
    return unix_transport(SOCKETS[region])(request, **kwargs)


class Regions(Checker):
    """boto3 clients of both regions, their replies held to the service model."""

    def __init__(self):
        super().__init__(SOCKET_A)
        self.kms_b = self.client(SOCKET_B, REGION_B)


def main():
    c = Regions()
    state = {}

    def create_and_replicate():
        meta = c.kms.create_key(MultiRegion=True, Description="mrk via boto3")["KeyMetadata"]
        assert meta["KeyId"].startswith("mrk-") and meta["MultiRegion"], meta
        assert meta["MultiRegionConfiguration"]["MultiRegionKeyType"] == "PRIMARY", meta
        reply = c.kms.replicate_key(KeyId=meta["KeyId"], ReplicaRegion=REGION_B, Description="replica via boto3",
                                    Tags=[{"TagKey": "by", "TagValue": "boto3"}])
        replica = reply["ReplicaKeyMetadata"]
        assert replica["KeyId"] == meta["KeyId"] and f":{REGION_B}:" in replica["Arn"], replica
        assert replica["MultiRegionConfiguration"]["MultiRegionKeyType"] == "REPLICA", replica
        assert reply["ReplicaTags"] == [{"TagKey": "by", "TagValue": "boto3"}], reply
        state.update(id=meta["KeyId"], arn_a=meta["Arn"], arn_b=replica["Arn"])

    def describe_both():
        for client, key_type in ((c.kms, "PRIMARY"), (c.kms_b, "REPLICA")):
            config = client.describe_key(KeyId=state["id"])["KeyMetadata"]["MultiRegionConfiguration"]
            assert config["MultiRegionKeyType"] == key_type, config
            assert config["PrimaryKey"] == {"Arn": state["arn_a"], "Region": REGION_A}, config
            assert config["ReplicaKeys"] == [{"Arn": state["arn_b"], "Region": REGION_B}], config

    def encryption_sdk_decrypts_with_the_replica():
        session = botocore.session.Session()
        session.set_credentials("x", "x")
        session.register("before-send.kms", by_region)
        esdk = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
        message = os.urandom(64 * 1024)
        primary = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[state["arn_a"]], botocore_session=session)
        ciphertext, _ = esdk.encrypt(source=message, key_provider=primary, encryption_context={"app": "mrk"})
        replica = MRKAwareStrictAwsKmsMasterKeyProvider(key_ids=[state["arn_b"]], botocore_session=session)
        plaintext, header = esdk.decrypt(source=ciphertext, key_provider=replica)
        assert plaintext == message and header.encryption_context["app"] == "mrk"
        strict = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[state["arn_b"]], botocore_session=session)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                esdk.decrypt(source=ciphertext, key_provider=strict)
        except aws_encryption_sdk.exceptions.AWSEncryptionSDKClientError:
            pass
        else:
            raise AssertionError("the strict provider decrypted with another region's ARN")

    def update_primary_region():
        reply = c.kms.update_primary_region(KeyId=state["id"], PrimaryRegion=REGION_B)
        assert set(reply) == {"ResponseMetadata"}, reply
        config = c.kms_b.describe_key(KeyId=state["id"])["KeyMetadata"]["MultiRegionConfiguration"]
        assert config["MultiRegionKeyType"] == "PRIMARY" and config["PrimaryKey"]["Region"] == REGION_B, config

    for name, check in [
        ("CreateKey MultiRegion, ReplicateKey", create_and_replicate),
        ("DescribeKey in both regions", describe_both),
        ("Encryption SDK: MRK-aware decrypt with the replica's ARN", encryption_sdk_decrypts_with_the_replica),
        ("UpdatePrimaryRegion", update_primary_region),
    ]:
        c.run(name, check)
    print(f"multi-Region: {c.passed} passed, {c.failed} failed")
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        peer_call(*sys.argv[2:6])
    else:
        main()
