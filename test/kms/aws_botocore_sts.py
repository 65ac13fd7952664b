#!/usr/bin/python3
"""Fidelity check of the loopback server's STS AssumeRole with botocore's own STS client
(the client the AWS CLI and boto3 use): botocore serializes and SigV4-signs AssumeRole
(RoleArn, RoleSessionName, ExternalId, DurationSeconds) to the server, which verifies
the signature with botocore's signer; botocore must parse the XML answer into
credentials (Expiration as a datetime) and AssumedRoleUser; the session credentials
then sign a KMS DescribeKey the server accepts (session token checked); a wrong
ExternalId and a role the server does not admit come back as botocore ClientError
AccessDenied (HTTP 403). Prints one "ok ..." line per check; exit 0 if all pass.

Usage: aws_botocore_sts.py ENDPOINT REGION AKID SECRET ROLE_ARN EXTERNAL_ID KEY_ID
"""

import datetime
import sys

import botocore.session
from botocore.exceptions import ClientError


def main():
    endpoint, region, akid, secret, role_arn, external_id, key_id = sys.argv[1:8]
    session = botocore.session.get_session()
    sts = session.create_client("sts", region_name=region, endpoint_url=endpoint, aws_access_key_id=akid,
                                aws_secret_access_key=secret)
    r = sts.assume_role(RoleArn=role_arn, RoleSessionName="botocore-check", ExternalId=external_id,
                        DurationSeconds=900)
    c = r["Credentials"]
    assert c["AccessKeyId"].startswith("ASIA") and c["SecretAccessKey"] and c["SessionToken"], r
    assert isinstance(c["Expiration"], datetime.datetime), r
    arn = r["AssumedRoleUser"]["Arn"]
    assert arn.startswith("arn:aws:sts::") and ":assumed-role/" in arn and arn.endswith("/botocore-check"), r
    print("ok assume_role %s expires %s (botocore parsed the XML answer)" % (arn, c["Expiration"].isoformat()))
    kms = session.create_client("kms", region_name=region, endpoint_url=endpoint,
                                aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretAccessKey"],
                                aws_session_token=c["SessionToken"])
    md = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    print("ok describe_key with the session credentials: %s" % md["KeyState"])
    for label, kwargs in (("wrong ExternalId", dict(RoleArn=role_arn, ExternalId=external_id + "-x")),
                          ("no ExternalId", dict(RoleArn=role_arn)),
                          ("another role", dict(RoleArn=role_arn + "-other", ExternalId=external_id))):
        try:
            sts.assume_role(RoleSessionName="botocore-check", **kwargs)
            raise AssertionError("assume_role with %s succeeded" % label)
        except ClientError as e:
            assert e.response["Error"]["Code"] == "AccessDenied", e.response
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403, e.response
            print("ok %s refused: AccessDenied (HTTP 403)" % label)
    try:
        sts.assume_role(RoleArn=role_arn, RoleSessionName="x", ExternalId=external_id)
        raise AssertionError("a one-character session name was accepted")
    except ClientError as e:
        assert e.response["Error"]["Code"] == "ValidationError", e.response
        print("ok one-character session name refused: ValidationError")
    except Exception as e:  # botocore's own parameter validation may refuse it first
        if type(e).__name__ != "ParamValidationError":
            raise
        print("ok one-character session name refused by botocore's validation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
