#!/usr/bin/python3
"""Loopback HashiCorp Vault test server: the Transit secrets engine and AppRole login,
as much of the wire protocol as cmk_lakebase's "vault" provider and hvac use.

Real crypto (AES-256-GCM per key version, python3-cryptography); ciphertexts look like
Vault's, "vault:vN:<base64(nonce || ct || tag)>". Tokens are checked on every request
(X-Vault-Token); with --namespace, X-Vault-Namespace must match too.

Usage: vault_server.py --port-file F --token-file T [--role-id R --secret-id S]
       [--mount transit] [--namespace NS] [--key NAME ...]

Control (POST /__control, JSON): {"action": ...}
  create_key name | rotate name | delete_key name | min_decryption_version name value
  deny name (403 for that key) | allow name | seal | unseal | revoke_tokens (every token,
  also AppRole-issued ones, now gets 403) | restore_tokens | revoke_issued (AppRole
  tokens only) | expire_secret_id
  mode normal|error500|throttle|stall | requests (what was asked, with headers)
"""

import base64
import json
import os
import re
import secrets
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loopback  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402


def err(status, *msgs):
    return status, {"errors": list(msgs)}, {}


class Vault:
    def __init__(self, args):
        self.state = loopback.State()
        self.mount = args.mount
        self.namespace = args.namespace
        with open(args.token_file) as f:
            self.root_token = f.read().strip()
        self.role_id, self.secret_id = args.role_id, args.secret_id
        self.token_ttl = args.token_ttl
        self.tokens = {self.root_token: None}  # token -> expiry (None = never)
        self.tokens_revoked = False
        self.secret_id_expired = False
        self.sealed = False
        self.keys = {}
        self.denied = set()
        for k in args.key or []:
            self._create(k)

    def _create(self, name):
        self.keys[name] = {"versions": {1: AESGCM.generate_key(256)}, "latest": 1,
                           "min_decryption_version": 1, "created": int(time.time())}

    def transient_error(self, status, msg=None):
        return {"errors": [msg or {500: "internal error", 429: "rate limit quota exceeded",
                                   503: "Vault is sealed"}.get(status, "error")]}

    def control(self, req):
        r = loopback.common_control(self.state, req)
        if r:
            return r
        a, name = req.get("action"), req.get("name")
        with self.state.lock:
            if a == "create_key":
                self._create(name)
            elif a == "rotate":
                k = self.keys[name]
                k["latest"] += 1
                k["versions"][k["latest"]] = AESGCM.generate_key(256)
            elif a == "delete_key":
                del self.keys[name]
            elif a == "min_decryption_version":
                self.keys[name]["min_decryption_version"] = int(req["value"])
            elif a == "deny":
                self.denied.add(name)
            elif a == "allow":
                self.denied.discard(name)
            elif a == "seal":
                self.sealed = True
            elif a == "unseal":
                self.sealed = False
            elif a == "revoke_tokens":
                self.tokens_revoked = True
            elif a == "revoke_issued":
                self.tokens = {self.root_token: None}
            elif a == "restore_tokens":
                self.tokens_revoked = False
            elif a == "expire_secret_id":
                self.secret_id_expired = True
            else:
                raise ValueError("unknown action %r" % a)
        return 200, {"ok": True}

    def _token_ok(self, headers):
        t = headers.get("X-Vault-Token") or ""
        if self.tokens_revoked:
            return False
        exp = self.tokens.get(t, 0)
        return exp is None or (exp and exp > time.time())

    def route(self, method, path, headers, body):
        with self.state.lock:
            return self._route(method, path.split("?")[0], headers, body)

    def _route(self, method, path, headers, body):
        if path == "/v1/sys/health":
            return (503 if self.sealed else 200), {"initialized": True, "sealed": self.sealed,
                                                    "standby": False, "version": "1.15.0-loopback"}, {}
        if self.sealed:
            return err(503, "Vault is sealed")
        if self.namespace is not None and headers.get("X-Vault-Namespace", "").strip("/") != self.namespace:
            return err(403, "1 error occurred:\n\t* permission denied\n\n")
        req = json.loads(body) if body else {}
        if path == "/v1/auth/approle/login" and method in ("POST", "PUT"):
            if (not self.role_id or req.get("role_id") != self.role_id or req.get("secret_id") != self.secret_id
                    or self.secret_id_expired):
                return err(400, "invalid role or secret ID")
            tok = "hvs." + secrets.token_urlsafe(24)
            self.tokens[tok] = time.time() + self.token_ttl
            return 200, {"request_id": secrets.token_hex(8), "auth": {
                "client_token": tok, "accessor": secrets.token_hex(8), "policies": ["default", "cmk"],
                "lease_duration": self.token_ttl, "renewable": True}}, {}
        if not self._token_ok(headers):
            return err(403, "1 error occurred:\n\t* permission denied\n\n")
        if path == "/v1/auth/token/lookup-self":
            t = headers.get("X-Vault-Token")
            exp = self.tokens.get(t)
            return 200, {"data": {"id": t, "policies": ["default", "cmk"],
                                  "ttl": 0 if exp is None else int(exp - time.time())}}, {}
        m = re.fullmatch(r"/v1/(.+)/(keys|encrypt|decrypt|rewrap)/([A-Za-z0-9._-]+)(/rotate|/config)?", path)
        if not m or m.group(1) != self.mount:
            return err(404, "no handler for route \"%s\". route entry not found." % path.lstrip("/v1/"))
        op, name, sub = m.group(2), m.group(3), m.group(4)
        if name in self.denied:
            return err(403, "1 error occurred:\n\t* permission denied\n\n")
        rid = secrets.token_hex(8)
        key = self.keys.get(name)
        if op == "keys":
            if method == "GET":
                if not key:
                    return 404, {"errors": []}, {}
                return 200, {"request_id": rid, "data": {
                    "name": name, "type": "aes256-gcm96", "deletion_allowed": False, "derived": False,
                    "exportable": False, "allow_plaintext_backup": False,
                    "keys": {str(v): key["created"] for v in key["versions"]},
                    "latest_version": key["latest"], "min_available_version": 0,
                    "min_decryption_version": key["min_decryption_version"], "min_encryption_version": 0,
                    "supports_encryption": True, "supports_decryption": True, "supports_derivation": True,
                    "supports_signing": False, "auto_rotate_period": 0}}, {}
            if sub == "/rotate" and key:
                key["latest"] += 1
                key["versions"][key["latest"]] = AESGCM.generate_key(256)
                return 204, b"", {}
            if sub == "/config" and key:
                if "min_decryption_version" in req:
                    key["min_decryption_version"] = int(req["min_decryption_version"])
                return 204, b"", {}
            if sub is None:
                if not key:
                    self._create(name)
                return 204, b"", {}
            return err(404, "key not found")
        if op == "encrypt":
            if not key:  # Vault's upsert: encrypt creates a missing key
                self._create(name)
                key = self.keys[name]
            try:
                pt = base64.b64decode(req["plaintext"], validate=True)
            except Exception:
                return err(400, "failed to base64-decode plaintext")
            return 200, {"request_id": rid, "data": {"ciphertext": self._seal(key, key["latest"], pt),
                                                      "key_version": key["latest"]}}, {}
        if not key:
            return err(400, "encryption key not found")
        ct = req.get("ciphertext", "")
        ver, pt, why = self._open(key, ct)
        if pt is None:
            return err(400, why)
        if op == "decrypt":
            return 200, {"request_id": rid, "data": {"plaintext": base64.b64encode(pt).decode()}}, {}
        return 200, {"request_id": rid, "data": {"ciphertext": self._seal(key, key["latest"], pt),
                                                  "key_version": key["latest"]}}, {}

    @staticmethod
    def _seal(key, ver, pt):
        nonce = os.urandom(12)
        blob = nonce + AESGCM(key["versions"][ver]).encrypt(nonce, pt, None)
        return "vault:v%d:%s" % (ver, base64.b64encode(blob).decode())

    @staticmethod
    def _open(key, ct):
        m = re.fullmatch(r"vault:v(\d+):([A-Za-z0-9+/=]+)", ct or "")
        if not m:
            return 0, None, "invalid ciphertext: no prefix"
        ver = int(m.group(1))
        if ver < key["min_decryption_version"]:
            return ver, None, "ciphertext or signature version is disallowed by policy (too old)"
        if ver not in key["versions"]:
            return ver, None, "invalid ciphertext: version is too new"
        blob = base64.b64decode(m.group(2))
        try:
            return ver, AESGCM(key["versions"][ver]).decrypt(blob[:12], blob[12:], None), ""
        except Exception:
            return ver, None, "cipher: message authentication failed"


def main():
    p = loopback.base_args(__doc__.splitlines()[0])
    p.add_argument("--token-file", required=True, help="file holding the root token")
    p.add_argument("--role-id")
    p.add_argument("--secret-id")
    p.add_argument("--token-ttl", type=int, default=3600)
    p.add_argument("--mount", default="transit")
    p.add_argument("--namespace")
    p.add_argument("--key", action="append")
    args = p.parse_args()
    loopback.serve(Vault(args), args)


if __name__ == "__main__":
    main()
