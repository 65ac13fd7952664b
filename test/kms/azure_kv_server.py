#!/usr/bin/python3
"""Loopback Azure Key Vault + Entra ID + managed identity server for cmk_lakebase's tests.

It speaks the parts of three Azure protocols the "azure" key provider uses, with real
cryptography, so that the provider (and the Azure SDK, test/kms/azure_sdk_check.py)
can be run against it:

  HTTPS 127.0.0.1:<port> (a throwaway CA made at start, ca.pem in the state directory)
    Key Vault REST (api-version 7.x):
      GET  /keys/{name}[/{version}]            key bundle (JWK public part + attributes)
      POST /keys/{name}/{version}/wrapkey      {"alg","value"} -> {"kid","value"}
      POST /keys/{name}/{version}/unwrapkey
      RSA-OAEP-256 / RSA-OAEP on the RSA key "k", A256KW on the oct-HSM key "hsmk".
      No bearer token -> 401 with the WWW-Authenticate challenge the SDK expects.
    Entra ID v2.0:
      GET  /{tenant}/v2.0/.well-known/openid-configuration
      POST /{tenant}/oauth2/v2.0/token          client_credentials with client_secret,
           or client_assertion (RS256/PS256 JWT: the signature is verified with the
           registered app certificate, x5t/x5t#S256, aud, iss, sub, exp, nbf checked),
           or a federated token as client_assertion (workload identity federation: an
           RS256 JWT of the loopback OIDC issuer, checked against the app's federated
           identity credential: issuer, subject, audience api://AzureADTokenExchange),
           in the app's home tenant or in the customer's tenant (a multi-tenant app
           consented there)
  HTTP 127.0.0.1:<http_port>
    GET /metadata/identity/oauth2/token         managed identity, IMDS protocol (Metadata: true)
    GET /msi/token                              managed identity, App Service protocol
    POST /_control  {"action": ..., ...}        change the state (see ACTIONS)
    GET  /_log                                  requests seen so far (JSON list)

State directory (--state-dir): server.json (ports, tenant, customer_tenant, client ids,
URLs), ca.pem, client.pem (app certificate + key, 0600), client_secret (0600),
identity_header (0600), federated_token (the projected service-account token, 0600).

The server binds to 127.0.0.1 only, exits when its parent process goes away, and in
any case after --lifetime seconds.
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import json
import os
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from cryptography.x509.oid import NameOID

RESOURCES = ("https://vault.azure.net", "https://managedhsm.azure.net")
OIDC_ISSUER = "https://oidc.loopback.test/cluster"
OIDC_SUBJECT = "system:serviceaccount:db:postgres"
ACTIONS = """enable disable expire notyet delete restore drop_unwrap_op deny allow
fail500 throttle stall normal reject_tokens accept_tokens refuse_credentials
accept_credentials no_identity token_lifetime remove_federated add_federated revoke_consent
grant_consent""".split()

LOCK = threading.Lock()
STATE = {}
LOG = []


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def b64u_dec(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def write_private(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_cert(subject, issuer_key, issuer_name, key, ca=False, san_ip=None):
    now = datetime.datetime.utcnow()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san_ip:
        import ipaddress
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(san_ip)), x509.DNSName("localhost")]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def new_key_version(kind):
    if kind == "RSA":
        return {"kty": "RSA", "priv": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                "enabled": True, "exp": None, "nbf": None, "deleted": False,
                "ops": ["encrypt", "decrypt", "wrapKey", "unwrapKey", "sign", "verify"],
                "created": int(time.time())}
    return {"kty": "oct-HSM", "secret": os.urandom(32), "enabled": True, "exp": None, "nbf": None,
            "deleted": False, "ops": ["wrapKey", "unwrapKey"], "created": int(time.time())}


def vault_error(code, message, inner=None, status=400):
    e = {"code": code, "message": message}
    if inner:
        e["innererror"] = {"code": inner}
    return status, {"error": e}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cmk-azure-test/1"

    def log_message(self, fmt, *args):  # quiet: the log is /_log
        pass

    # --- plumbing
    def send_json(self, status, obj, headers=None):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def record(self, **kw):
        entry = {"t": time.time(), "method": self.command, "path": self.path.split("?")[0],
                 "query": urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query),
                 "listener": self.server.kind, "ua": self.headers.get("User-Agent", "")}
        entry.update(kw)
        with LOCK:
            LOG.append(entry)

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def route(self, method):
        try:
            url = urllib.parse.urlsplit(self.path)
            q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
            parts = [p for p in url.path.split("/") if p]
            body = self.body() if method == "POST" else b""
            if self.server.kind == "https":
                if parts and parts[0] == "keys":
                    return self.vault(method, parts, q, body)
                if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"] and method == "POST":
                    return self.token(parts[0], body)
                if len(parts) == 4 and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
                    return self.openid(parts[0])
            else:
                if url.path == "/_control" and method == "POST":
                    return self.control(json.loads(body or b"{}"))
                if url.path == "/_log":
                    with LOCK:
                        return self.send_json(200, LOG)
                if url.path == "/metadata/identity/oauth2/token" and method == "GET":
                    return self.managed_identity(q, imds=True)
                if url.path == "/msi/token" and method == "GET":
                    return self.managed_identity(q, imds=False)
            self.record(kind="unknown")
            self.send_json(404, {"error": {"code": "NotFound", "message": "no such endpoint"}})
        except (BrokenPipeError, ConnectionResetError):
            pass

    # --- control
    def control(self, c):
        a = c.get("action")
        if a not in ACTIONS:
            return self.send_json(400, {"error": "unknown action", "known": ACTIONS})
        with LOCK:
            k = STATE["keys"][c.get("key", "k")][c.get("version", "v1")]
            if a == "enable":
                k["enabled"] = True
            elif a == "disable":
                k["enabled"] = False
            elif a == "expire":
                k["exp"] = int(time.time()) - 60
            elif a == "notyet":
                k["nbf"] = int(time.time()) + 86400
            elif a == "delete":
                k["deleted"] = True
            elif a == "restore":
                k.update(enabled=True, exp=None, nbf=None, deleted=False,
                         ops=["encrypt", "decrypt", "wrapKey", "unwrapKey"])
                STATE["mode"] = "normal"
            elif a == "drop_unwrap_op":
                k["ops"] = [o for o in k["ops"] if o != "unwrapKey"]
            elif a == "deny":
                STATE["deny"] = True
            elif a == "allow":
                STATE["deny"] = False
            elif a in ("fail500", "throttle", "stall", "normal"):
                STATE["mode"] = a
                STATE["stall_seconds"] = float(c.get("seconds", 30))
            elif a == "reject_tokens":
                STATE["reject_tokens"] = True
            elif a == "accept_tokens":
                STATE["reject_tokens"] = False
            elif a == "refuse_credentials":
                STATE["refuse_credentials"] = True
            elif a == "accept_credentials":
                STATE["refuse_credentials"] = False
            elif a == "no_identity":
                STATE["no_identity"] = bool(c.get("on", True))
            elif a == "token_lifetime":
                STATE["token_lifetime"] = int(c["seconds"])
            elif a in ("remove_federated", "add_federated"):
                STATE["federated"] = a == "add_federated"
            elif a in ("revoke_consent", "grant_consent"):
                STATE["consented"] = a == "grant_consent"
        self.send_json(200, {"ok": a})

    # --- Entra ID
    def base(self):
        return "https://127.0.0.1:%d" % STATE["port"]

    def openid(self, tenant):
        self.record(kind="openid")
        b = "%s/%s" % (self.base(), tenant)
        self.send_json(200, {
            "token_endpoint": b + "/oauth2/v2.0/token",
            "authorization_endpoint": b + "/oauth2/v2.0/authorize",
            "device_authorization_endpoint": b + "/oauth2/v2.0/devicecode",
            "issuer": "https://login.microsoftonline.com/%s/v2.0" % tenant,
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                      "client_secret_basic"],
            "jwks_uri": b + "/discovery/v2.0/keys",
            "tenant_region_scope": "EU",
        })

    def entra_error(self, status, error, code, desc):
        self.send_json(status, {
            "error": error,
            "error_description": "AADSTS%d: %s\r\nTrace ID: %s\r\nCorrelation ID: %s\r\nTimestamp: %s" % (
                code, desc, uuid.uuid4(), uuid.uuid4(), datetime.datetime.utcnow().isoformat()),
            "error_codes": [code], "trace_id": str(uuid.uuid4()),
        })

    def issue(self, resource):
        tok = secrets.token_urlsafe(32)
        life = STATE["token_lifetime"]
        with LOCK:
            STATE["tokens"][tok] = (time.time() + life, resource)
        return tok, life

    def verify_assertion(self, tenant, client_id, jwt):
        try:
            h64, c64, s64 = jwt.split(".")
            header = json.loads(b64u_dec(h64))
            claims = json.loads(b64u_dec(c64))
            sig = b64u_dec(s64)
        except Exception:
            return "malformed JWT"
        cert = STATE["client_cert"]
        der = cert.public_bytes(serialization.Encoding.DER)
        if "x5t#S256" in header:
            if str(header["x5t#S256"]).rstrip("=") != b64u(hashlib.sha256(der).digest()):
                return "x5t#S256 does not match the registered certificate"
        # (MSAL pads its base64url x5t; Entra ID accepts both forms.)
        elif str(header.get("x5t")).rstrip("=") != b64u(hashlib.sha1(der).digest()):
            return "x5t does not match the registered certificate"
        data = (h64 + "." + c64).encode()
        try:
            if header.get("alg") == "RS256":
                cert.public_key().verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
            elif header.get("alg") == "PS256":
                cert.public_key().verify(sig, data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
            else:
                return "alg %r not accepted" % header.get("alg")
        except InvalidSignature:
            return "signature does not verify with the registered certificate"
        now = time.time()
        aud = "%s/%s/oauth2/v2.0/token" % (self.base(), tenant)
        if claims.get("aud") != aud:
            return "aud %r is not %r" % (claims.get("aud"), aud)
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            return "iss/sub must be the client id"
        if not isinstance(claims.get("exp"), (int, float)) or claims["exp"] < now:
            return "expired or missing exp"
        if claims.get("nbf", 0) > now + 300:
            return "nbf in the future"
        if not claims.get("jti"):
            return "no jti"
        return None

    def verify_federated(self, jwt):
        """None if jwt is a token of the loopback OIDC issuer that the app's federated
        identity credential admits; else Entra ID's (code, description)."""
        try:
            h64, c64, s64 = jwt.split(".")
            header = json.loads(b64u_dec(h64))
            claims = json.loads(b64u_dec(c64))
            STATE["oidc_key"].public_key().verify(b64u_dec(s64), (h64 + "." + c64).encode(), padding.PKCS1v15(),
                                                  hashes.SHA256())
        except Exception:
            return 700024, "Client assertion is not within its valid time range or the signature is invalid."
        if header.get("alg") != "RS256" or claims.get("exp", 0) < time.time():
            return 700024, "Client assertion is not within its valid time range."
        if not STATE["federated"] or claims.get("iss") != OIDC_ISSUER or claims.get("sub") != OIDC_SUBJECT or \
                claims.get("aud") != "api://AzureADTokenExchange":
            return 70021, ("No matching federated identity record found for presented assertion. Assertion Issuer: "
                           "'%s'. Assertion Subject: '%s'. Assertion Audience: '%s'."
                           % (claims.get("iss"), claims.get("sub"), claims.get("aud")))
        return None

    def token(self, tenant, body):
        f = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}
        how = "secret" if "client_secret" in f else "assertion" if "client_assertion" in f else "none"
        self.record(kind="token", grant=f.get("grant_type"), auth=how, scope=f.get("scope"))
        if tenant == STATE["customer_tenant"]:
            if not STATE["consented"] and f.get("client_id") == STATE["client_id"]:
                return self.entra_error(400, "unauthorized_client", 700016,
                                        "Application with identifier '%s' was not found in the directory '%s'."
                                        % (f.get("client_id"), tenant))
        elif tenant != STATE["tenant"]:
            return self.entra_error(400, "invalid_request", 90002, "Tenant '%s' not found." % tenant)
        if f.get("grant_type") != "client_credentials":
            return self.entra_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if f.get("client_id") != STATE["client_id"]:
            return self.entra_error(400, "unauthorized_client", 700016,
                                    "Application with identifier '%s' was not found in the directory." % f.get("client_id"))
        scope = f.get("scope", "")
        if scope not in [r + "/.default" for r in RESOURCES]:
            return self.entra_error(400, "invalid_scope", 70011, "The provided value for scope %s is not valid." % scope)
        if STATE["refuse_credentials"]:
            return self.entra_error(401, "invalid_client", 7000222, "The provided client secret keys for app are expired.")
        if how == "secret":
            if not hmac.compare_digest(f["client_secret"].encode(), STATE["client_secret"].encode()):
                return self.entra_error(401, "invalid_client", 7000215, "Invalid client secret provided.")
        elif how == "assertion":
            if f.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
                return self.entra_error(400, "invalid_request", 50027, "Invalid client_assertion_type.")
            try:
                federated = "x5t" not in json.loads(b64u_dec(f["client_assertion"].split(".")[0])) and \
                    "x5t#S256" not in json.loads(b64u_dec(f["client_assertion"].split(".")[0]))
            except Exception:
                federated = False
            if federated:
                bad = self.verify_federated(f["client_assertion"])
                if bad:
                    return self.entra_error(400 if bad[0] == 70021 else 401, "invalid_client", bad[0], bad[1])
                why = None
            else:
                why = self.verify_assertion(tenant, f["client_id"], f["client_assertion"])
            if why:
                with LOCK:
                    LOG[-1]["assertion_error"] = why
                return self.entra_error(401, "invalid_client", 700027, "Client assertion failed: " + why)
        else:
            return self.entra_error(401, "invalid_client", 7000216, "'client_assertion' or 'client_secret' is required.")
        tok, life = self.issue(scope[: -len("/.default")])
        self.send_json(200, {"token_type": "Bearer", "expires_in": life, "ext_expires_in": life, "access_token": tok})

    # --- managed identity
    def managed_identity(self, q, imds):
        self.record(kind="mi", protocol="imds" if imds else "appservice",
                    has_header=bool(self.headers.get("Metadata") if imds else self.headers.get("X-IDENTITY-HEADER")))
        if imds and self.headers.get("Metadata") != "true":
            return self.send_json(400, {"error": "invalid_request", "error_description": "Required metadata header not specified"})
        if not imds and not hmac.compare_digest((self.headers.get("X-IDENTITY-HEADER") or "").encode(),
                                                STATE["identity_header"].encode()):
            return self.send_json(401, {"error": "invalid_request", "error_description": "bad X-IDENTITY-HEADER"})
        if q.get("api-version") not in ("2018-02-01", "2019-08-01"):
            return self.send_json(400, {"error": "invalid_request", "error_description": "bad api-version"})
        if STATE["no_identity"]:
            return self.send_json(400, {"error": "invalid_request", "error_description": "Identity not found"})
        res = (q.get("resource") or "").rstrip("/")
        if res not in RESOURCES:
            return self.send_json(400, {"error": "invalid_resource",
                                        "error_description": "AADSTS500011: The resource principal named %s was not found" % res})
        if q.get("client_id") not in (None, STATE["mi_client_id"]):
            return self.send_json(400, {"error": "invalid_request", "error_description": "Identity not found"})
        tok, life = self.issue(res)
        now = int(time.time())
        self.send_json(200, {"access_token": tok, "client_id": STATE["mi_client_id"], "expires_in": str(life),
                             "expires_on": str(now + life), "ext_expires_in": str(life), "not_before": str(now),
                             "resource": res, "token_type": "Bearer"})

    # --- Key Vault
    def challenge(self):
        return {"WWW-Authenticate": 'Bearer authorization="https://127.0.0.1:%d/%s", resource="https://vault.azure.net"'
                % (STATE["port"], STATE["tenant"])}

    def kid(self, name, version):
        return "%s/keys/%s/%s" % (self.base(), name, version)

    def vault(self, method, parts, q, body):
        auth = self.headers.get("Authorization") or ""
        op = parts[3] if len(parts) == 4 else "get"
        self.record(kind="vault", op=op, api_version=q.get("api-version"), has_token=auth.startswith("Bearer "),
                    client_request_id=self.headers.get("x-ms-client-request-id"))
        if not auth.startswith("Bearer "):
            return self.send_json(401, {"error": {"code": "Unauthorized",
                                                  "message": "AKV10000: Request is missing a Bearer or PoP token."}},
                                  self.challenge())
        with LOCK:
            t = STATE["tokens"].get(auth[7:])
            reject = STATE["reject_tokens"]
        if reject or not t or t[0] < time.time():
            return self.send_json(401, {"error": {"code": "Unauthorized",
                                                  "message": "AKV10032: Invalid issuer." if t else "AKV10022: Invalid token."}},
                                  self.challenge())
        if not (q.get("api-version") or "").startswith("7."):
            return self.send_json(*vault_error("BadParameter", "The api-version query parameter is missing or not supported."))
        mode = STATE["mode"]
        if mode == "stall":
            time.sleep(STATE["stall_seconds"])
        elif mode == "fail500":
            return self.send_json(*vault_error("InternalServerError", "An unexpected error occurred.", status=500))
        elif mode == "throttle":
            return self.send_json(*vault_error("Throttled", "Request was not processed because too many requests were received.",
                                               status=429), {"Retry-After": "1"})
        if STATE["deny"]:
            return self.send_json(*vault_error(
                "Forbidden", "The user, group or application does not have keys %s permission on key vault." % op,
                "ForbiddenByPolicy", status=403))
        if len(parts) < 2 or len(parts) > 4 or (len(parts) == 4 and method != "POST") or (len(parts) < 4 and method != "GET"):
            return self.send_json(*vault_error("BadParameter", "Unsupported request.", status=400))
        name = parts[1]
        with LOCK:
            versions = STATE["keys"].get(name, {})
            version = parts[2] if len(parts) > 2 else (sorted(versions)[-1] if versions else None)
            k = versions.get(version)
        if not k or k["deleted"]:
            return self.send_json(*vault_error("KeyNotFound", "A key with (name/id) %s was not found in this key vault." % name,
                                               status=404))
        if op == "get":
            return self.send_json(200, self.bundle(name, version, k))
        if op not in ("wrapkey", "unwrapkey"):
            return self.send_json(*vault_error("BadParameter", "Unknown operation %s." % op))
        opname = "wrapKey" if op == "wrapkey" else "unwrapKey"
        now = time.time()
        if not k["enabled"]:
            return self.send_json(*vault_error("Forbidden", "Operation %s is not allowed on a disabled key." % opname,
                                               "KeyDisabled", status=403))
        if (k["exp"] and k["exp"] <= now) or (k["nbf"] and k["nbf"] > now):
            return self.send_json(*vault_error("Forbidden", "Operation %s is not allowed on an expired or not yet valid key." % opname,
                                               "KeyExpired", status=403))
        if opname not in k["ops"]:
            return self.send_json(*vault_error("Forbidden", "Operation %s is not permitted on this key." % opname,
                                               "KeyOperationForbidden", status=403))
        try:
            req = json.loads(body)
            alg, value = req["alg"], b64u_dec(req["value"])
        except Exception:
            return self.send_json(*vault_error("BadParameter", "Property value is invalid."))
        try:
            out = self.crypt(k, alg, value, op == "wrapkey")
        except ValueError as e:
            return self.send_json(*vault_error("BadParameter", str(e)))
        self.send_json(200, {"kid": self.kid(name, version), "value": b64u(out)})

    def crypt(self, k, alg, value, wrap):
        if k["kty"] == "RSA" and alg in ("RSA-OAEP-256", "RSA-OAEP"):
            h = hashes.SHA256() if alg == "RSA-OAEP-256" else hashes.SHA1()
            pad = padding.OAEP(mgf=padding.MGF1(algorithm=h), algorithm=h, label=None)
            if wrap:
                return k["priv"].public_key().encrypt(value, pad)
            try:
                return k["priv"].decrypt(value, pad)
            except ValueError:
                raise ValueError("The parameter is incorrect.")
        if k["kty"] == "oct-HSM" and alg == "A256KW":
            if wrap:
                return aes_key_wrap(k["secret"], value)
            try:
                return aes_key_unwrap(k["secret"], value)
            except (InvalidUnwrap, ValueError):
                raise ValueError("The parameter is incorrect.")
        raise ValueError("Invalid algorithm %s for a key of type %s." % (alg, k["kty"]))

    def bundle(self, name, version, k):
        attrs = {"enabled": k["enabled"], "created": k["created"], "updated": k["created"],
                 "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90}
        if k["exp"]:
            attrs["exp"] = k["exp"]
        if k["nbf"]:
            attrs["nbf"] = k["nbf"]
        key = {"kid": self.kid(name, version), "kty": k["kty"], "key_ops": list(k["ops"])}
        if k["kty"] == "RSA":
            pn = k["priv"].public_key().public_numbers()
            key["n"] = b64u(pn.n.to_bytes((pn.n.bit_length() + 7) // 8, "big"))
            key["e"] = b64u(pn.e.to_bytes(3, "big"))
        return {"key": key, "attributes": attrs, "tags": {}}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--lifetime", type=float, default=1200, help="hard limit in seconds")
    ap.add_argument("--token-lifetime", type=int, default=3600)
    args = ap.parse_args()
    d = args.state_dir
    os.makedirs(d, exist_ok=True)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = make_cert("cmk test CA", ca_key, None, ca_key, ca=True)
    srv_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    srv_cert = make_cert("127.0.0.1", ca_key, ca_cert.subject, srv_key, san_ip="127.0.0.1")
    app_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    app_cert = make_cert("cmk test app", app_key, None, app_key)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    keypem = lambda k: k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    with open(os.path.join(d, "ca.pem"), "wb") as f:
        f.write(pem(ca_cert))
    write_private(os.path.join(d, "server.pem"), pem(srv_cert) + keypem(srv_key))
    write_private(os.path.join(d, "client.pem"), pem(app_cert) + keypem(app_key))
    secret = secrets.token_urlsafe(24) + "~.+&="  # characters that need form encoding
    write_private(os.path.join(d, "client_secret"), secret.encode() + b"\n")
    ident = secrets.token_hex(16)
    write_private(os.path.join(d, "identity_header"), ident.encode())
    oidc_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    h64 = b64u(json.dumps({"alg": "RS256", "kid": "loopback-oidc", "typ": "JWT"}).encode())
    c64 = b64u(json.dumps({"iss": OIDC_ISSUER, "sub": OIDC_SUBJECT, "aud": "api://AzureADTokenExchange",
                           "iat": now, "nbf": now, "exp": now + 86400}).encode())
    sig = oidc_key.sign((h64 + "." + c64).encode(), padding.PKCS1v15(), hashes.SHA256())
    write_private(os.path.join(d, "federated_token"), (h64 + "." + c64 + "." + b64u(sig) + "\n").encode())

    STATE.update(tenant=str(uuid.uuid4()), client_id=str(uuid.uuid4()), mi_client_id=str(uuid.uuid4()),
                 client_secret=secret, identity_header=ident, client_cert=app_cert, tokens={},
                 token_lifetime=args.token_lifetime, mode="normal", stall_seconds=30, deny=False,
                 reject_tokens=False, refuse_credentials=False, no_identity=False,
                 customer_tenant=str(uuid.uuid4()), consented=True, federated=True, oidc_key=oidc_key,
                 keys={"k": {"v1": new_key_version("RSA"), "v2": new_key_version("RSA")},
                       "hsmk": {"v1": new_key_version("oct")}})

    https = Server(("127.0.0.1", 0), Handler)
    https.kind = "https"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(d, "server.pem"))
    https.socket = ctx.wrap_socket(https.socket, server_side=True)
    http = Server(("127.0.0.1", 0), Handler)
    http.kind = "http"
    STATE["port"] = https.server_address[1]
    STATE["http_port"] = http.server_address[1]
    for s in (https, http):
        threading.Thread(target=s.serve_forever, daemon=True).start()

    info = {k: STATE[k] for k in ("port", "http_port", "tenant", "customer_tenant", "client_id", "mi_client_id")}
    info.update(vault_url="https://127.0.0.1:%d" % STATE["port"],
                authority_host="https://127.0.0.1:%d" % STATE["port"],
                imds_endpoint="http://127.0.0.1:%d/metadata/identity/oauth2/token" % STATE["http_port"],
                appservice_endpoint="http://127.0.0.1:%d/msi/token" % STATE["http_port"],
                control_url="http://127.0.0.1:%d/_control" % STATE["http_port"],
                pid=os.getpid())
    tmp = os.path.join(d, "server.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.rename(tmp, os.path.join(d, "server.json"))
    print("azure_kv_server: listening on 127.0.0.1:%d (https) and :%d (http)" % (STATE["port"], STATE["http_port"]),
          flush=True)

    parent = os.getppid()
    deadline = time.time() + args.lifetime
    while time.time() < deadline and os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


if __name__ == "__main__":
    main()
