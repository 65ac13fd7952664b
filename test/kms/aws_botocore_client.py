#!/usr/bin/python3
"""Fidelity check of the loopback AWS KMS test server the other way round: botocore's
own KMS client (the data-driven client the AWS CLI and boto3 are built on) talks to
the server and must parse its answers: DescribeKey, Encrypt, Decrypt round trip with
an encryption context, and the errors (__type) of a missing key and a disabled key as
botocore ClientError codes. Prints one "ok ..." line per check; exit 0 if all pass.

Usage: aws_botocore_client.py ENDPOINT REGION AKID SECRET KEY_ID [disabled|enabled]
"""

import sys

import botocore.session
from botocore.exceptions import ClientError


def main():
    endpoint, region, akid, secret, key_id = sys.argv[1:6]
    expect = sys.argv[6] if len(sys.argv) > 6 else "enabled"
    session = botocore.session.get_session()
    kms = session.create_client("kms", region_name=region, endpoint_url=endpoint, aws_access_key_id=akid,
                                aws_secret_access_key=secret)
    md = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert md["KeyUsage"] == "ENCRYPT_DECRYPT", md
    assert md["Arn"].startswith("arn:aws:kms:%s:" % region), md
    print("ok describe_key %s KeyState=%s Enabled=%s CreationDate=%s" % (md["KeyId"], md["KeyState"], md["Enabled"],
                                                                        type(md["CreationDate"]).__name__))
    if expect == "disabled":
        assert md["KeyState"] == "Disabled" and md["Enabled"] is False, md
        try:
            kms.encrypt(KeyId=key_id, Plaintext=b"x")
            raise AssertionError("encrypt with a disabled key succeeded")
        except ClientError as e:
            assert e.response["Error"]["Code"] == "DisabledException", e.response
            print("ok encrypt refused: %s" % e.response["Error"]["Code"])
        return 0
    ctx = {"cmk_lakebase": "kek", "cluster": "botocore-check"}
    enc = kms.encrypt(KeyId=key_id, Plaintext=b"sixteen byte key", EncryptionContext=ctx)
    assert isinstance(enc["CiphertextBlob"], bytes) and enc["KeyId"] == md["Arn"], enc
    print("ok encrypt %d-byte blob (botocore decoded the base64 blob)" % len(enc["CiphertextBlob"]))
    dec = kms.decrypt(CiphertextBlob=enc["CiphertextBlob"], KeyId=key_id, EncryptionContext=ctx)
    assert dec["Plaintext"] == b"sixteen byte key", dec
    print("ok decrypt round trip")
    try:
        kms.decrypt(CiphertextBlob=enc["CiphertextBlob"], KeyId=key_id, EncryptionContext={"cmk_lakebase": "x"})
        raise AssertionError("decrypt with a wrong context succeeded")
    except ClientError as e:
        assert e.response["Error"]["Code"] == "InvalidCiphertextException", e.response
        print("ok decrypt with another context refused: InvalidCiphertextException")
    try:
        kms.describe_key(KeyId="alias/does-not-exist")
        raise AssertionError("describe_key of a missing alias succeeded")
    except ClientError as e:
        assert e.response["Error"]["Code"] == "NotFoundException", e.response
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 400, e.response
        print("ok describe_key of a missing alias: NotFoundException (HTTP 400)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
