#!/usr/bin/python3
"""Manages the CMK on the test PyKMIP server, through PyKMIP's own client library
(kmip.pie.client.ProxyKmipClient): independent code from our TTLV codec, so what the
provider reads back was written by someone else's encoder.

Usage: kmip_key.py --port PORT --certs CERTDIR COMMAND [UID]
  create              Create an AES-256 key (usage Encrypt|Decrypt), print its UID
  activate UID        Pre-Active -> Active
  revoke UID          Revoke (cessation of operation): Active -> Deactivated
  compromise UID      Revoke (key compromise): -> Compromised
  destroy UID         Destroy (object gone: Item Not Found afterwards)
  state UID           Print the State attribute (e.g. ACTIVE)
  encrypt UID HEX     Encrypt HEX with AES-CBC-PKCS5 under a fresh IV: print "iv ct"
The client speaks TLS 1.2 with the same client certificate as the provider, because
PyKMIP lets only an object's owner (the certificate's identity) use it.
"""
import argparse
import logging
import sys

from kmip.core import enums
from kmip.pie import client as pie_client


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--certs", required=True)
    ap.add_argument("command")
    ap.add_argument("args", nargs="*")
    a = ap.parse_args()
    logging.disable(logging.CRITICAL)
    c = pie_client.ProxyKmipClient(
        hostname="127.0.0.1",
        port=a.port,
        cert=a.certs + "/client.pem",
        key=a.certs + "/client.key",
        ca=a.certs + "/ca.pem",
        ssl_version="PROTOCOL_TLSv1_2",
        config_file=None,
        kmip_version=enums.KMIPVersion.KMIP_1_2,
    )
    with c:
        if a.command == "create":
            uid = c.create(
                enums.CryptographicAlgorithm.AES,
                256,
                cryptographic_usage_mask=[
                    enums.CryptographicUsageMask.ENCRYPT,
                    enums.CryptographicUsageMask.DECRYPT,
                ],
            )
            print(uid)
        elif a.command == "activate":
            c.activate(a.args[0])
        elif a.command == "revoke":
            c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, a.args[0])
        elif a.command == "compromise":
            c.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, a.args[0])
        elif a.command == "destroy":
            c.destroy(a.args[0])
        elif a.command == "state":
            attrs = c.get_attributes(a.args[0], ["State"])[1]
            print(attrs[0].attribute_value.value.name)
        elif a.command == "encrypt":
            import os

            iv = os.urandom(16)
            ct, _ = c.encrypt(
                bytes.fromhex(a.args[1]),
                uid=a.args[0],
                cryptographic_parameters={
                    "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
                    "block_cipher_mode": enums.BlockCipherMode.CBC,
                    "padding_method": enums.PaddingMethod.PKCS5,
                },
                iv_counter_nonce=iv,
            )
            print(iv.hex(), ct.hex())
        else:
            print("kmip_key.py: unknown command " + a.command, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
