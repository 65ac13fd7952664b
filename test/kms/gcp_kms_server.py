#!/usr/bin/python3
"""Loopback Google Cloud KMS test server: the parts of cloudkms.googleapis.com v1 that
cmk_lakebase's "gcp" provider and `gcloud kms encrypt|decrypt` use, an OAuth 2.0 token
endpoint for the service-account JWT bearer grant (RFC 7523), and the metadata
server's token endpoint.

The token endpoint verifies every assertion with PyJWT (python3-jwt; independent of
the C++ signer): RS256 signature under the service account's public key, kid, iss,
aud = https://oauth2.googleapis.com/token (Google's documented value for every access
token request, whatever endpoint token_uri names; google-auth sends it too), scope
cloudkms, cloud-platform or iam, iat/exp within an hour. Every KMS request
must carry a bearer token this server issued and that has not expired. Real crypto
(AES-256-GCM per key version, with the request's additional authenticated data);
CRC32C integrity fields are checked and returned like Cloud KMS does.

Usage: gcp_kms_server.py --port-file F --write-credentials SA.json [--key NAME ...]
  --key is a full name projects/P/locations/L/keyRings/R/cryptoKeys/K (created
  ENABLED with version 1 primary).

Control (POST /__control, JSON {"action": ...}):
  create_key name | delete_key name | rotate name (new primary)
  set_state name state [version] (ENABLED, DISABLED, DESTROY_SCHEDULED, DESTROYED;
    default version = primary; DESTROYED drops the material)
  deny name | allow name (403 PERMISSION_DENIED) | revoke_tokens (issued tokens -> 401)
  revoke_sa | restore_sa (token endpoint: 400 invalid_grant) | metadata on|off
  issue_token (returns {"access_token": ...} for gcloud --access-token-file)
  token_ttl seconds | mode normal|error500|throttle|stall | requests
  token_creator on|off (the base account's roles/iam.serviceAccountTokenCreator on the
    --impersonate account) | impersonated_ttl seconds (life of minted tokens; 0 = asked)

With --pool-provider AUDIENCE the server also serves Google's Security Token Service
POST /v1/token (workload identity federation, RFC 8693 token exchange as STS v1 takes
it): form-encoded (application/x-www-form-urlencoded, no Authorization header) with
grant_type token-exchange, audience = AUDIENCE (else 400 invalid_target, Google's
words for a pool or provider that does not exist), a Google scope (cloud-platform,
iam or cloudkms; the token carries the scopes asked),
requested_token_type access_token, subject_token_type jwt or id_token, and a
subject_token that is either an RS256 JWT of this server's own OIDC issuer (written by
control write_subject: iss, aud = https:AUDIENCE-without-the-leading-//, sub, exp
checked with PyJWT; its key never leaves the server) or the opaque string set by
control opaque_subject. The answer is {"access_token", "issued_token_type",
"token_type", "expires_in"}; the token's principal is
principal://iam.googleapis.com/.../subject/SUB, which the key admits directly
(control principal_access on|off: the key's IAM binding for the pool principal) and
which may call generateAccessToken for the --impersonate account (control
workload_identity_user on|off: roles/iam.workloadIdentityUser). Controls:
  provider off|on (disabled provider: 400 invalid_grant) | sts_ttl seconds |
  write_subject path [sub] [ttl] | opaque_subject value | stats (sts_exchanges,
  sts_refused)
Google's own client checks this endpoint: test/kms/gcp_google_auth.py (TAP 105)
runs google-auth 2.x's identity_pool credentials against it (Debian 13+; Debian 12's
1.5.1 has no external_account credentials).

With --impersonate EMAIL the server also serves IAM Credentials
POST /v1/projects/-/serviceAccounts/EMAIL:generateAccessToken: the caller's bearer
token must be one this server issued with scope cloud-platform or iam, the binding must be on
(else 403 PERMISSION_DENIED iam.serviceAccounts.getAccessToken), the body must ask for
scope cloudkms and a lifetime "Ns" of at most 43200 s; the answer is
{"accessToken", "expireTime"}. The keys then admit only tokens of EMAIL (the key's IAM
policy names the customer's account): a base token gets 403 PERMISSION_DENIED.
"""

import base64
import datetime
import hashlib
import json
import os
import re
import secrets
import sys
import time
import urllib.parse

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loopback  # noqa: E402
import jwt  # noqa: E402  (python3-jwt)
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

KEY_RE = re.compile(r"projects/([^/]+)/locations/([^/]+)/keyRings/([^/]+)/cryptoKeys/([^/:]+)")
SCOPE = "https://www.googleapis.com/auth/cloudkms"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
# generateAccessToken takes a token of either scope (IAM Credentials REST reference);
# google-auth's impersonated credentials ask for the narrower iam scope.
IAM_SCOPE = "https://www.googleapis.com/auth/iam"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


def now_rfc3339():
    return datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def b64d(s):
    """proto3 JSON bytes: standard or URL-safe base64, padding optional (gcloud sends URL-safe)."""
    s = (s or "").replace("-", "+").replace("_", "/")
    return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)


def gerr(code, status, message):
    return code, {"error": {"code": code, "message": message, "status": status}}, {}


class Kms:
    def __init__(self, args):
        self.state = loopback.State()
        self.keys = {}
        self.denied = set()
        self.tokens = {}  # token -> expiry
        self.token_ttl = args.token_ttl
        self.sa_revoked = False
        self.metadata = True
        self.port = None
        self.sa_email = args.client_email
        self.sa_kid = secrets.token_hex(20)
        self.sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_public = self.sa_key.public_key()
        self.creds_path = args.write_credentials
        self.verified_assertions = 0
        self.impersonate = args.impersonate
        self.token_creator = True
        self.impersonated_ttl = 0
        self.token_owner = {}  # token -> (service account e-mail, scopes)
        self.minted = 0
        self.mint_denied = 0
        self.pool_provider = args.pool_provider
        self.provider_enabled = True
        self.sts_ttl = 3600
        self.principal_access = True
        self.wi_user = True
        self.opaque_subject = None
        self.sts_exchanges = 0
        self.sts_refused = 0
        self.oidc_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.oidc_issuer = "https://oidc.loopback.test"
        for k in args.key or []:
            self._create(k)

    def write_credentials(self, port):
        pem = self.sa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
        project = self.sa_email.split("@")[1].split(".")[0]
        sa = {"type": "service_account", "project_id": project, "private_key_id": self.sa_kid,
              "private_key": pem, "client_email": self.sa_email, "client_id": "1234567890",
              "auth_uri": "https://accounts.google.com/o/oauth2/auth",
              "token_uri": "http://127.0.0.1:%d/token" % port}
        fd = os.open(self.creds_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(sa, f, indent=2)
        os.rename(self.creds_path + ".tmp", self.creds_path)

    def _create(self, name):
        if not KEY_RE.fullmatch(name):
            raise ValueError("bad key name %r" % name)
        self.keys[name] = {"versions": {1: {"state": "ENABLED", "key": AESGCM.generate_key(256),
                                            "createTime": now_rfc3339()}},
                           "primary": 1, "createTime": now_rfc3339()}

    def transient_error(self, status, msg=None):
        word = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}.get(status, "UNKNOWN")
        return {"error": {"code": status, "message": msg or "loopback %s" % word, "status": word}}

    def control(self, req):
        r = loopback.common_control(self.state, req)
        if r:
            return r
        a, name = req.get("action"), req.get("name")
        with self.state.lock:
            if a == "create_key":
                self._create(name)
            elif a == "delete_key":
                del self.keys[name]
            elif a == "rotate":
                k = self.keys[name]
                v = max(k["versions"]) + 1
                k["versions"][v] = {"state": "ENABLED", "key": AESGCM.generate_key(256),
                                    "createTime": now_rfc3339()}
                k["primary"] = v
            elif a == "set_state":
                k = self.keys[name]
                v = k["versions"][int(req.get("version") or k["primary"])]
                if v["state"] == "DESTROYED" and req["state"] != "DESTROYED":
                    raise ValueError("a destroyed version cannot come back")
                if req["state"] not in ("ENABLED", "DISABLED", "DESTROY_SCHEDULED", "DESTROYED"):
                    raise ValueError("unknown state %r" % req["state"])
                v["state"] = req["state"]
                if req["state"] == "DESTROYED":
                    v["key"] = None
            elif a == "deny":
                self.denied.add(name)
            elif a == "allow":
                self.denied.discard(name)
            elif a == "revoke_tokens":
                self.tokens.clear()
            elif a == "revoke_sa":
                self.sa_revoked = True
            elif a == "restore_sa":
                self.sa_revoked = False
            elif a == "metadata":
                self.metadata = req.get("value") == "on"
            elif a == "token_ttl":
                self.token_ttl = int(req["value"])
            elif a == "issue_token":
                return 200, {"access_token": self._issue()}
            elif a == "token_creator":
                self.token_creator = req.get("value") == "on"
            elif a == "impersonated_ttl":
                self.impersonated_ttl = int(req["value"])
            elif a == "provider":
                self.provider_enabled = req.get("value") == "on"
            elif a == "sts_ttl":
                self.sts_ttl = int(req["value"])
            elif a == "principal_access":
                self.principal_access = req.get("value") == "on"
            elif a == "workload_identity_user":
                self.wi_user = req.get("value") == "on"
            elif a == "opaque_subject":
                self.opaque_subject = req.get("value")
            elif a == "write_subject":
                self._write_subject(req["path"], req.get("sub", "system:serviceaccount:db:postgres"),
                                    int(req.get("ttl", 3600)))
            elif a == "stats":
                return 200, {"verified_assertions": self.verified_assertions, "tokens": len(self.tokens),
                             "minted": self.minted, "mint_denied": self.mint_denied,
                             "sts_exchanges": self.sts_exchanges, "sts_refused": self.sts_refused}
            else:
                raise ValueError("unknown action %r" % a)
        return 200, {"ok": True}

    def _issue(self, owner=None, scopes=(SCOPE,), ttl=None):
        tok = "ya29.loopback-" + secrets.token_urlsafe(32)
        self.tokens[tok] = time.time() + (ttl or self.token_ttl)
        self.token_owner[tok] = (owner or self.sa_email, set(scopes))
        return tok

    def _oidc_audience(self):
        # A provider's default allowed audience: its resource name with https: in front.
        return "https:" + self.pool_provider

    def _write_subject(self, path, sub, ttl):
        now = int(time.time())
        tok = jwt.encode({"iss": self.oidc_issuer, "sub": sub, "aud": self._oidc_audience(), "iat": now,
                          "exp": now + ttl}, self.oidc_key, algorithm="RS256", headers={"kid": "loopback-oidc"})
        if isinstance(tok, bytes):
            tok = tok.decode()
        with open(path + ".tmp", "w") as f:
            # No newline after it, as Kubernetes projects a token: google-auth's "text"
            # format sends the file's bytes as they are.
            f.write(tok)
        os.rename(path + ".tmp", path)

    def _sts(self, headers, body):
        def refuse(code, error, desc):
            self.sts_refused += 1
            return code, {"error": error, "error_description": desc}, {}
        if not (headers.get("Content-Type") or "").startswith("application/x-www-form-urlencoded"):
            return refuse(400, "invalid_request", "Content-Type must be application/x-www-form-urlencoded")
        if headers.get("Authorization"):
            return refuse(400, "invalid_request", "do not send the Authorization header to STS")
        try:
            form = urllib.parse.parse_qs(body.decode(), strict_parsing=True)
        except ValueError:
            return refuse(400, "invalid_request", "malformed form body")
        one = {k: v[0] for k, v in form.items() if len(v) == 1}
        if set(one) != set(form):
            return refuse(400, "invalid_request", "a field is repeated")
        if one.get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange":
            return refuse(400, "unsupported_grant_type", "grant_type")
        if one.get("requested_token_type") != "urn:ietf:params:oauth:token-type:access_token":
            return refuse(400, "invalid_request", "requested_token_type")
        # Any Google scope (STS v1 reference); the token carries what was asked:
        # google-auth's federated source for impersonation asks for iam only.
        asked = one.get("scope", "").split()
        if not {CLOUD_PLATFORM, IAM_SCOPE, SCOPE} & set(asked):
            return refuse(400, "invalid_scope", "scope must name a Google OAuth 2.0 scope")
        if one.get("subject_token_type") not in ("urn:ietf:params:oauth:token-type:jwt",
                                                 "urn:ietf:params:oauth:token-type:id_token"):
            return refuse(400, "invalid_request", "subject_token_type")
        if one.get("audience") != self.pool_provider:
            return refuse(400, "invalid_target", "The target service indicated by the \"audience\" parameters is "
                          "invalid. This might either be because the pool or provider is disabled or deleted or "
                          "because it doesn't exist.")
        if not self.provider_enabled:
            return refuse(400, "invalid_grant", "The identity pool provider is disabled.")
        subject = one.get("subject_token", "")
        if self.opaque_subject is not None and subject == self.opaque_subject:
            sub = "opaque"
        else:
            try:
                claims = jwt.decode(subject, self.oidc_key.public_key(), algorithms=["RS256"],
                                    audience=self._oidc_audience(), issuer=self.oidc_issuer,
                                    options={"require": ["iss", "aud", "sub", "exp"]})
            except jwt.PyJWTError as e:
                return refuse(400, "invalid_grant", "The given credential is rejected: %s" % e)
            sub = claims["sub"]
        self.sts_exchanges += 1
        pool = self.pool_provider[len("//iam.googleapis.com/"):].split("/providers/")[0]
        principal = "principal://iam.googleapis.com/%s/subject/%s" % (pool, sub)
        tok = self._issue(owner=principal, scopes=asked, ttl=self.sts_ttl)
        return 200, {"access_token": tok, "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                     "token_type": "Bearer", "expires_in": self.sts_ttl}, {}

    def _generate_access_token(self, email, headers, body):
        auth = headers.get("Authorization", "")
        tok = auth[7:] if auth.startswith("Bearer ") else ""
        if self.tokens.get(tok, 0) < time.time():
            return gerr(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        owner, scopes = self.token_owner.get(tok, ("", set()))
        if CLOUD_PLATFORM not in scopes and IAM_SCOPE not in scopes:
            return gerr(403, "PERMISSION_DENIED", "Request had insufficient authentication scopes.")
        if email != self.impersonate:
            return gerr(404, "NOT_FOUND", "Not found; Gaia id not found for email %s" % email)
        if owner.startswith("principal://"):
            binding = self.wi_user  # roles/iam.workloadIdentityUser for the pool principal
        else:
            binding = self.token_creator
        if not binding or owner == email:
            self.mint_denied += 1
            return gerr(403, "PERMISSION_DENIED", "Permission 'iam.serviceAccounts.getAccessToken' denied on "
                        "resource (or it may not exist).")
        try:
            req = json.loads(body)
        except ValueError:
            return gerr(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        want = req.get("scope")
        if not isinstance(want, list) or not want or not (SCOPE in want or CLOUD_PLATFORM in want):
            return gerr(400, "INVALID_ARGUMENT", "Scope required.")
        m = re.fullmatch(r"(\d+)s", str(req.get("lifetime", "3600s")))
        if not m or not 1 <= int(m.group(1)) <= 43200:
            return gerr(400, "INVALID_ARGUMENT", "The lifetime must be between 1s and 43200s.")
        # google-auth sends "delegates": null without a chain (JSON null for an empty
        # repeated field, as proto3 JSON reads it).
        delegates = req.get("delegates") or []
        if not isinstance(delegates, list):
            return gerr(400, "INVALID_ARGUMENT", "Invalid value at 'delegates'.")
        for d in delegates:
            if not re.fullmatch(r"projects/-/serviceAccounts/[^/]+@[^/]+", d):
                return gerr(400, "INVALID_ARGUMENT", "Invalid form of account ID %s." % d)
        life = self.impersonated_ttl or int(m.group(1))
        minted = self._issue(owner=email, scopes=want, ttl=life)
        self.minted += 1
        exp = datetime.datetime.utcfromtimestamp(int(time.time()) + life).strftime("%Y-%m-%dT%H:%M:%SZ")
        return 200, {"accessToken": minted, "expireTime": exp}, {}

    def route(self, method, path, headers, body):
        with self.state.lock:
            return self._route(method, path, headers, body)

    def _token_endpoint(self, body):
        form = urllib.parse.parse_qs(body.decode(), strict_parsing=True)
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return 400, {"error": "unsupported_grant_type", "error_description": "grant_type"}, {}
        assertion = form.get("assertion", [""])[0]
        if self.sa_revoked:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, {}
        aud = GOOGLE_TOKEN_AUDIENCE
        try:
            hdr = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, self.sa_public, algorithms=["RS256"], audience=aud,
                                options={"require": ["iss", "aud", "iat", "exp"]})
        except jwt.PyJWTError as e:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT: %s" % e}, {}
        if hdr.get("kid") != self.sa_kid or hdr.get("typ") != "JWT":
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT header"}, {}
        if claims["iss"] != self.sa_email:
            return 400, {"error": "invalid_grant", "error_description": "Invalid issuer"}, {}
        scopes = claims.get("scope", "").split()
        if not {SCOPE, CLOUD_PLATFORM, IAM_SCOPE} & set(scopes):
            return 400, {"error": "invalid_scope", "error_description": "scope"}, {}
        if claims["exp"] - claims["iat"] > 3600 or abs(claims["iat"] - time.time()) > 300:
            return 400, {"error": "invalid_grant", "error_description":
                         "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                         "timeframe."}, {}
        self.verified_assertions += 1
        return 200, {"access_token": self._issue(scopes=scopes), "expires_in": self.token_ttl,
                     "token_type": "Bearer"}, {}

    def _route(self, method, path, headers, body):
        path, _, query = path.partition("?")
        if path == "/token" and method == "POST":
            return self._token_endpoint(body)
        if path == "/v1/token" and method == "POST" and self.pool_provider:
            return self._sts(headers, body)
        if path == "/computeMetadata/v1/instance/service-accounts/default/token":
            if headers.get("Metadata-Flavor") != "Google":
                return 403, {"error": "Missing Metadata-Flavor:Google header"}, {}
            if not self.metadata:
                return 404, {"error": "no service account"}, {}
            scopes = urllib.parse.parse_qs(query).get("scopes", [SCOPE])[0].split(",")
            return 200, {"access_token": self._issue(scopes=scopes), "expires_in": self.token_ttl,
                         "token_type": "Bearer"}, {}
        gm = re.fullmatch(r"/v1/projects/-/serviceAccounts/([^/:]+):generateAccessToken", path)
        if gm and method == "POST" and self.impersonate:
            return self._generate_access_token(gm.group(1), headers, body)
        auth = headers.get("Authorization", "")
        tok = auth[7:] if auth.startswith("Bearer ") else ""
        if self.tokens.get(tok, 0) < time.time():
            return gerr(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected "
                        "OAuth 2 access token, login cookie or other valid authentication credential.")
        owner, scopes = self.token_owner.get(tok, ("", set()))
        if SCOPE not in scopes and CLOUD_PLATFORM not in scopes:
            return gerr(403, "PERMISSION_DENIED", "Request had insufficient authentication scopes.")
        if owner.startswith("principal://"):
            if not self.principal_access:
                return gerr(403, "PERMISSION_DENIED", "Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied "
                            "for %s." % owner)
        elif self.impersonate and owner != self.impersonate:
            return gerr(403, "PERMISSION_DENIED", "Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied for "
                        "%s: the key admits the customer's service account only." % owner)
        m = re.fullmatch(r"/v1/(projects/[^:]+?)(?::(encrypt|decrypt))?", path)
        if not m:
            return gerr(404, "NOT_FOUND", "no such method %s" % path)
        name, verb = m.group(1), m.group(2)
        vm = re.fullmatch(r"(.+)/cryptoKeyVersions/(\d+)", name)
        key_name = vm.group(1) if vm else name
        if not KEY_RE.fullmatch(key_name):
            return gerr(400, "INVALID_ARGUMENT", "Resource name [%s] does not represent a valid key." % name)
        if key_name in self.denied:
            return gerr(403, "PERMISSION_DENIED", "Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' "
                        "denied on resource '%s' (or it may not exist)." % key_name)
        key = self.keys.get(key_name)
        if key is None:
            return gerr(404, "NOT_FOUND", "%s not found." % key_name)
        if method == "GET" and verb is None:
            if vm:
                v = key["versions"].get(int(vm.group(2)))
                if v is None:
                    return gerr(404, "NOT_FOUND", "%s not found." % name)
                return 200, self._version_json(key_name, int(vm.group(2)), v), {}
            return 200, self._key_json(key_name, key), {}
        if method != "POST" or verb is None:
            return gerr(404, "NOT_FOUND", "no such method")
        try:
            req = json.loads(body)
        except ValueError:
            return gerr(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        aad = b64d(req.get("additionalAuthenticatedData", ""))
        if "additionalAuthenticatedDataCrc32c" in req and int(req["additionalAuthenticatedDataCrc32c"]) != \
                loopback.crc32c(aad):
            return gerr(400, "INVALID_ARGUMENT", "The checksum in field additional_authenticated_data_crc32c did "
                        "not match the data in field additional_authenticated_data.")
        tag = hashlib.sha256(key_name.encode()).digest()[:4]
        if verb == "encrypt":
            pt = b64d(req.get("plaintext", ""))
            if "plaintextCrc32c" in req and int(req["plaintextCrc32c"]) != loopback.crc32c(pt):
                return gerr(400, "INVALID_ARGUMENT", "The checksum in field plaintext_crc32c did not match the "
                            "data in field plaintext.")
            ver = key["primary"]
            v = key["versions"][ver]
            if v["state"] != "ENABLED":
                return gerr(400, "FAILED_PRECONDITION", "%s/cryptoKeyVersions/%d is not enabled, current state "
                            "is: %s." % (key_name, ver, v["state"]))
            nonce = os.urandom(12)
            ct = b"\x0a" + tag + ver.to_bytes(4, "big") + nonce + AESGCM(v["key"]).encrypt(nonce, pt, aad)
            return 200, {"name": "%s/cryptoKeyVersions/%d" % (key_name, ver),
                         "ciphertext": base64.b64encode(ct).decode(),
                         "ciphertextCrc32c": str(loopback.crc32c(ct)),
                         "verifiedPlaintextCrc32c": "plaintextCrc32c" in req,
                         "verifiedAdditionalAuthenticatedDataCrc32c": "additionalAuthenticatedDataCrc32c" in req,
                         "protectionLevel": "SOFTWARE"}, {}
        ct = b64d(req.get("ciphertext", ""))
        if "ciphertextCrc32c" in req and int(req["ciphertextCrc32c"]) != loopback.crc32c(ct):
            return gerr(400, "INVALID_ARGUMENT", "The checksum in field ciphertext_crc32c did not match the data "
                        "in field ciphertext.")
        invalid = gerr(400, "INVALID_ARGUMENT", "Decryption failed: the ciphertext is invalid.")
        if len(ct) < 9 + 12 + 16 or ct[0] != 0x0a or ct[1:5] != tag:
            return invalid
        ver = int.from_bytes(ct[5:9], "big")
        v = key["versions"].get(ver)
        if v is None:
            return invalid
        if v["state"] != "ENABLED":
            return gerr(400, "FAILED_PRECONDITION", "%s/cryptoKeyVersions/%d is not enabled, current state is: "
                        "%s." % (key_name, ver, v["state"]))
        try:
            pt = AESGCM(v["key"]).decrypt(ct[9:21], ct[21:], aad)
        except Exception:
            return invalid
        return 200, {"plaintext": base64.b64encode(pt).decode(), "plaintextCrc32c": str(loopback.crc32c(pt)),
                     "usedPrimary": ver == key["primary"], "protectionLevel": "SOFTWARE"}, {}

    @staticmethod
    def _version_json(key_name, ver, v):
        j = {"name": "%s/cryptoKeyVersions/%d" % (key_name, ver), "state": v["state"],
             "createTime": v["createTime"], "protectionLevel": "SOFTWARE",
             "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION", "generateTime": v["createTime"]}
        if v["state"] == "DESTROY_SCHEDULED":
            j["destroyTime"] = now_rfc3339()
        if v["state"] == "DESTROYED":
            j["destroyEventTime"] = now_rfc3339()
        return j

    def _key_json(self, key_name, key):
        return {"name": key_name, "purpose": "ENCRYPT_DECRYPT", "createTime": key["createTime"],
                "primary": self._version_json(key_name, key["primary"], key["versions"][key["primary"]]),
                "versionTemplate": {"protectionLevel": "SOFTWARE", "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"},
                "destroyScheduledDuration": "86400s"}


def main():
    p = loopback.base_args(__doc__.splitlines()[0])
    p.add_argument("--write-credentials", required=True, help="service-account key file to write (0600)")
    p.add_argument("--client-email", default="cmk-test@cmk-project.iam.gserviceaccount.com")
    p.add_argument("--token-ttl", type=int, default=3600)
    p.add_argument("--key", action="append")
    p.add_argument("--impersonate", default="", help="the customer's service account the base may impersonate")
    p.add_argument("--pool-provider", default="", help="serve STS /v1/token for this workload identity pool "
                   "provider (//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X)")
    args = p.parse_args()
    app = Kms(args)
    # The credentials name this server's token endpoint: written once the port is known.

    def on_listen(port):
        app.port = port
        app.write_credentials(port)

    loopback.serve(app, args, on_listen)


if __name__ == "__main__":
    main()
