#!/usr/bin/env python3
"""Writes the seed corpora of fuzz_answers and fuzz_kmip_ttlv (fuzz/corpus/<target>/):
small valid answers as the providers and identity endpoints send them, taken from the
unit tests, each prefixed by the byte that selects its parser in fuzz_answers.cpp.
The key-file seeds (fuzz_keyfiles) are written by the code itself:
CMK_FUZZ_WRITE_SEEDS=fuzz/corpus/fuzz_keyfiles build/fuzz/fuzz_keyfiles"""
import base64
import hashlib
import json
import os
import struct
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, which, text):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    data = (bytes([which]) if which is not None else b"") + (text.encode() if isinstance(text, str) else text)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


A = "fuzz_answers"


def b64(data):
    return base64.b64encode(data).decode()


put(A, 0, '{"a":[1,2.5,{"b":null,"c":true}],"s":"x\\u00e9"}')
put(A, 1, '{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0eXAi.abc.def"}')
put(A, 1, '{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Trace ID: x","error_codes":[7000215]}')
put(A, 2, '{"access_token":"eyJ0eXAi.abc.def","client_id":"c","expires_in":"86399","expires_on":"1700000000","ext_expires_in":"86399","not_before":"1699913300","resource":"https://vault.azure.net","token_type":"Bearer"}')
put(A, 3, "https://myvault.vault.azure.net/keys/k1/0123456789abcdef0123456789abcdef")
put(A, 3, "https://127.0.0.1:8443/keys/k/v1")
put(A, 4, '{"error":{"code":400,"message":"Decryption failed: the ciphertext is invalid.","status":"INVALID_ARGUMENT","details":[]}}')
put(A, 5, '{"access_token":"ya29.abc","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":3600}')
put(A, 6, '{"accessToken":"ya29.c.abc","expireTime":"2030-01-01T00:00:00Z"}')
put(A, 7, '{"type":"external_account","audience":"//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x","subject_token_type":"urn:ietf:params:oauth:token-type:jwt","token_url":"https://sts.googleapis.com/v1/token","credential_source":{"file":"/var/run/token","format":{"type":"json","subject_token_field_name":"id_token"}},"service_account_impersonation_url":"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/sa-name@proj.iam.gserviceaccount.com:generateAccessToken","service_account_impersonation":{"token_lifetime_seconds":3600}}')
put(A, 8, '{"id_token":"eyJhbGciOiJSUzI1NiJ9.e30.c2ln"}')
put(A, 8, "  eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n")
put(A, 9, '{"errors":["1 error occurred:\\n\\t* permission denied\\n\\n"]}')
put(A, 10, "vault:v3:AbCdEf0123456789==")
put(A, 11, "[default]\naws_access_key_id = AKIA\naws_secret_access_key = s\n\n[profile p]\nrole_arn=arn:aws:iam::1:role/r\nsource_profile = default\n")
put(A, 12, "com.amazonaws.kms#NotFoundException")
assume = """<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
  <SourceIdentity>Alice</SourceIdentity>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/demo/TestAR</Arn>
      <AssumedRoleId>ARO123EXAMPLE123:TestAR</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAIOSFODNN7EXAMPLE</AccessKeyId>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <SessionToken>AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQW</SessionToken>
      <Expiration>2019-11-09T13:34:41Z</Expiration>
    </Credentials>
    <PackedPolicySize>6</PackedPolicySize>
  </AssumeRoleResult>
  <ResponseMetadata>
    <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
  </ResponseMetadata>
</AssumeRoleResponse>
"""
put(A, 13, assume)
put(A, 14, '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User is not authorized to perform: sts:AssumeRole</Message></Error><RequestId>abc</RequestId></ErrorResponse>')
put(A, 15, "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ4IiwiYXVkIjoieSIsImV4cCI6MTcwMDAwMDAwMH0.c2lnbmF0dXJl")
put(A, 16, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
put(A, 17, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8")

# The Azure provider's key answers (cases 18-20: unwrapKey, wrapKey, key GET).
kid = "https://myvault.vault.azure.net/keys/cmk/0123456789abcdef0123456789abcdef"
put(A, 18, '{"kid":"%s","value":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"}' % kid)
put(A, 19, '{"kid":"%s","value":"%s"}' % (kid, "QUJD" * 86))
put(A, 20, '{"key":{"kid":"%s","kty":"RSA-HSM","key_ops":["wrapKey","unwrapKey"],"n":"AQAB","e":"AQAB"},'
        '"attributes":{"enabled":true,"exp":4102444800,"recoveryLevel":"Recoverable+Purgeable"}}' % kid)

# AWS credential_process (case 21: the helper's answer; 22: the command line).
put(A, 21, '{"Version": 1, "AccessKeyId": "AKIDEXAMPLE", "SecretAccessKey": "s", "SessionToken": "t", '
        '"Expiration": "2026-12-06T18:00:00Z"}')
put(A, 22, "/opt/helper --profile 'a b' \"c \\\"d\\\"\" e\\ f")

# The AWS KMS provider's answers (cases 23-26: Decrypt, Encrypt, DescribeKey, a Decrypt
# error with HTTP 400), as test/kms/aws_kms_server.py sends them.
arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
kek = bytes(range(32))
put(A, 23, json.dumps({"KeyId": arn, "Plaintext": b64(kek), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}))
put(A, 24, json.dumps({"CiphertextBlob": b64(b"\x01" + b"1234abcd-12ab-34cd-56ef-1234567890ab" + bytes(60)),
                       "KeyId": arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}))
metadata = {"AWSAccountId": "111122223333", "KeyId": "1234abcd-12ab-34cd-56ef-1234567890ab", "Arn": arn,
            "CreationDate": 1700000000.123, "Enabled": True, "Description": "cmk_lakebase test key",
            "KeyUsage": "ENCRYPT_DECRYPT", "KeyState": "Enabled", "Origin": "AWS_KMS", "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT", "KeySpec": "SYMMETRIC_DEFAULT",
            "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"], "MultiRegion": False}
put(A, 25, json.dumps({"KeyMetadata": metadata}))
put(A, 25, json.dumps({"KeyMetadata": dict(metadata, Enabled=False, KeyState="PendingDeletion",
                                           DeletionDate=1700604800.0, PendingDeletionWindowInDays=7)}))
put(A, 26, json.dumps({"__type": "InvalidCiphertextException", "message": ""}))
put(A, 26, json.dumps({"__type": "com.amazonaws.kms#NotFoundException",
                       "message": "Key '%s' does not exist" % arn}))
put(A, 26, json.dumps({"__type": "ThrottlingException", "Message": "Rate exceeded"}))

# The Vault Transit provider's answers (cases 27-30: decrypt, encrypt, key read, a
# decrypt error with HTTP 400), as test/kms/vault_server.py sends them.
put(A, 27, json.dumps({"request_id": "5b1c0e3a9d7f4e21", "lease_id": "", "renewable": False, "lease_duration": 0,
                       "data": {"plaintext": b64(kek)}, "wrap_info": None, "warnings": None, "auth": None}))
put(A, 28, json.dumps({"request_id": "5b1c0e3a9d7f4e22", "data": {"ciphertext": "vault:v3:" + b64(bytes(60)),
                                                                 "key_version": 3}}))
put(A, 29, json.dumps({"request_id": "5b1c0e3a9d7f4e23", "data": {
    "name": "cmk", "type": "aes256-gcm96", "deletion_allowed": False, "derived": False, "exportable": False,
    "allow_plaintext_backup": False, "keys": {"1": 1700000000, "2": 1700086400}, "latest_version": 2,
    "min_available_version": 0, "min_decryption_version": 1, "min_encryption_version": 0,
    "supports_encryption": True, "supports_decryption": True, "supports_derivation": True,
    "supports_signing": False, "auto_rotate_period": 0}}))
put(A, 30, json.dumps({"errors": ["1 error occurred:\n\t* cipher: message authentication failed\n\n"]}))
put(A, 30, json.dumps({"errors": ["1 error occurred:\n\t* permission denied\n\n"]}))

# The Cloud KMS provider's answers (cases 31-34: decrypt, encrypt, CryptoKey GET, a
# decrypt error with HTTP 400), with the CRC32C fields, as test/kms/gcp_kms_server.py
# sends them.
def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


gkey = "projects/my-project/locations/global/keyRings/ring/cryptoKeys/cmk"
gct = b"\x0a" + bytes(range(8)) + bytes(12) + bytes(48)
put(A, 31, json.dumps({"plaintext": b64(kek), "plaintextCrc32c": str(crc32c(kek)), "usedPrimary": True,
                       "protectionLevel": "SOFTWARE"}))
put(A, 32, json.dumps({"name": gkey + "/cryptoKeyVersions/1", "ciphertext": b64(gct),
                       "ciphertextCrc32c": str(crc32c(gct)), "verifiedPlaintextCrc32c": True,
                       "verifiedAdditionalAuthenticatedDataCrc32c": True, "protectionLevel": "SOFTWARE"}))


def gversion(n, state):
    v = {"name": "%s/cryptoKeyVersions/%d" % (gkey, n), "state": state, "createTime": "2026-01-01T00:00:00.000000Z",
         "protectionLevel": "SOFTWARE", "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION",
         "generateTime": "2026-01-01T00:00:00.000000Z"}
    if state == "DESTROY_SCHEDULED":
        v["destroyTime"] = "2026-02-01T00:00:00.000000Z"
    return v


for state in ("ENABLED", "DESTROY_SCHEDULED"):
    put(A, 33, json.dumps({"name": gkey, "purpose": "ENCRYPT_DECRYPT", "createTime": "2026-01-01T00:00:00.000000Z",
                           "primary": gversion(1, state),
                           "versionTemplate": {"protectionLevel": "SOFTWARE",
                                               "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"},
                           "destroyScheduledDuration": "2592000s"}))
put(A, 34, json.dumps({"error": {"code": 400, "message": "Decryption failed: the ciphertext is invalid.",
                                 "status": "INVALID_ARGUMENT"}}))
put(A, 34, json.dumps({"error": {"code": 400, "message": gkey + "/cryptoKeyVersions/1 is not enabled, current "
                                 "state is: DISABLED.", "status": "FAILED_PRECONDITION"}}))

# KMIP 1.2 TTLV: a Response Message with one batch item (Get, Success, payload with a
# Unique Identifier) and a failed one, as the unit tests build them.
def ttlv(tag, typ, value):
    pad = (8 - len(value) % 8) % 8
    return struct.pack(">I", tag)[1:] + bytes([typ]) + struct.pack(">I", len(value)) + value + b"\0" * pad


def st(tag, *items):
    return ttlv(tag, 1, b"".join(items))


def i32(tag, v):
    return ttlv(tag, 2, struct.pack(">i", v))


def enum(tag, v):
    return ttlv(tag, 5, struct.pack(">I", v))


def text(tag, s):
    return ttlv(tag, 7, s.encode())


def dt(tag, v):
    return ttlv(tag, 9, struct.pack(">q", v))


def header():
    return st(0x42007A, st(0x420069, i32(0x42006A, 1), i32(0x42006B, 2)), dt(0x420092, 1700000000), i32(0x42000D, 1))


ok = st(0x42007B, header(), st(0x42000F, enum(0x42005C, 0x0A), enum(0x42007F, 0),
                                st(0x42007C, text(0x420094, "key-1"))))
bad = st(0x42007B, header(), st(0x42000F, enum(0x42005C, 0x1F), enum(0x42007F, 1), enum(0x42007E, 1),
                                 text(0x42007D, "Item Not Found")))
put("fuzz_kmip_ttlv", None, ok)
put("fuzz_kmip_ttlv", None, bad)
