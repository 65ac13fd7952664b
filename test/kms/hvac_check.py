#!/usr/bin/python3
"""Fidelity check of the loopback Vault server by independent code: hvac (Debian
python3-hvac) runs transit read_key / encrypt / decrypt / rewrap and an AppRole login
against it, and decrypts the wrapped KEK that cmk_lakebase stored in a keyring.json
(showing that what our provider wrote is a Transit ciphertext hvac accepts).

Usage: hvac_check.py URL TOKEN_FILE KEY [--namespace NS] [--keyring FILE]
       [--role-id R --secret-id S] [--ca CA.pem]
Prints one "ok: ..." line per check; exits 1 on the first failure.
"""

import argparse
import base64
import json
import sys

import hvac


def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("token_file")
    p.add_argument("key")
    p.add_argument("--namespace")
    p.add_argument("--keyring")
    p.add_argument("--role-id")
    p.add_argument("--secret-id")
    p.add_argument("--ca", help="CA bundle for https (verification stays on)")
    a = p.parse_args()
    verify = a.ca if a.ca else True
    token = open(a.token_file).read().strip()
    c = hvac.Client(url=a.url, token=token, namespace=a.namespace, verify=verify)
    info = c.secrets.transit.read_key(name=a.key)["data"]
    assert info["name"] == a.key and info["type"] == "aes256-gcm96", info
    print("ok: read_key latest_version=%d min_decryption_version=%d"
          % (info["latest_version"], info["min_decryption_version"]))
    pt = b"hvac fidelity check"
    ct = c.secrets.transit.encrypt_data(name=a.key, plaintext=base64.b64encode(pt).decode())["data"]["ciphertext"]
    assert ct.startswith("vault:v"), ct
    back = base64.b64decode(c.secrets.transit.decrypt_data(name=a.key, ciphertext=ct)["data"]["plaintext"])
    assert back == pt, back
    print("ok: encrypt/decrypt round trip (%s...)" % ct[:9])
    rw = c.secrets.transit.rewrap_data(name=a.key, ciphertext=ct)["data"]["ciphertext"]
    assert base64.b64decode(c.secrets.transit.decrypt_data(name=a.key, ciphertext=rw)["data"]["plaintext"]) == pt
    print("ok: rewrap")
    if a.keyring:
        kr = json.load(open(a.keyring))
        blob = base64.b64decode(kr["wrapped_kek"]).decode()
        kek = base64.b64decode(c.secrets.transit.decrypt_data(name=a.key, ciphertext=blob)["data"]["plaintext"])
        assert len(kek) == 32, len(kek)
        print("ok: hvac decrypts the KEK ciphertext pg_cmk stored (%s..., 32 bytes)" % blob[:9])
    if a.role_id:
        ac = hvac.Client(url=a.url, namespace=a.namespace, verify=verify)
        auth = ac.auth.approle.login(role_id=a.role_id, secret_id=a.secret_id)["auth"]
        assert auth["client_token"] and ac.is_authenticated()
        print("ok: approle login, lease_duration=%d" % auth["lease_duration"])
    try:
        c.secrets.transit.read_key(name=a.key + "-missing")
        print("FAIL: a missing key was found")
        return 1
    except hvac.exceptions.InvalidPath:
        print("ok: missing key -> InvalidPath (404)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - report any failure in one line
        print("FAIL: %s: %s" % (type(e).__name__, e))
        sys.exit(1)
