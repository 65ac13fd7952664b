#!/usr/bin/python3
"""Loopback AWS KMS test server for cmk_lakebase's AWS provider tests.

Speaks the AWS JSON 1.1 protocol of KMS (X-Amz-Target: TrentService.Encrypt, Decrypt,
DescribeKey) on 127.0.0.1, plus STS AssumeRoleWithWebIdentity and STS AssumeRole (query
protocol, XML answer) and the EC2 instance metadata service (IMDSv2) when asked to.
AssumeRole (--assume-role ARN [--external-id X]) is SigV4-verified by botocore like the
KMS calls (service "sts"), checks the role, the ExternalId (the trust policy's
sts:ExternalId condition), the session name and the duration as STS does, and issues
session credentials bound to the role; control op "role" {trust, revoke_sessions}
withdraws the trust (AssumeRole -> AccessDenied) and, as IAM's "revoke active sessions"
does, makes the sessions issued so far fail every KMS call with AccessDeniedException;
its "expiry" sets how long the next sessions live (--sts-expiry). The SigV4
signature of EVERY KMS request is verified with botocore's own signer
(botocore.auth.SigV4Auth) under the credentials the server knows: a request whose
signature does not match is refused (InvalidSignatureException) and counted, so a test
that checks /_test/stats fails on any bad signature.

Keys live in memory with the states a test changes through the control endpoint
(POST /_test/<op>, JSON): create_key, set (KeyState, deny ops, destroy), fail (500,
throttle, stall for some or all operations), stats, reset_stats. Ciphertext blobs are
AES-256-GCM under the key's material with the canonical JSON of the encryption
context as associated data, so a wrong key or context fails like KMS does.

The server stops by itself: after --lifetime seconds, or when --parent-pid dies.
Usage: aws_kms_server.py --port-file F --cred AKID:SECRET [--cred ...] [--region R]
       [--role-arn ARN --web-identity-token TOKEN] [--imds-role NAME] [--parent-pid P]
       [--assume-role ARN [--external-id X] [--sts-expiry SECONDS]]
"""

import argparse
import base64
import datetime
import hmac
import json
import os
import re
import secrets
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ARGS = None
LOCK = threading.Lock()
KEYS = {}      # key uuid -> dict(arn, state, material, deny=set(ops), created, deletion)
ALIASES = {}   # "alias/name" -> key uuid
CREDS = {}     # access key id -> (secret, session token or None)
IMDS_TOKENS = set()
FAIL = {"mode": "none", "ops": None}
STATS = {"verified": 0, "bad_signatures": 0, "unknown_keys": 0, "requests": {}, "last_auth_error": "", "sts": 0,
         "imds": 0, "assume_role": 0, "assume_role_denied": 0}
ROLE = {"trust": True, "revoked_before": 0.0}  # the --assume-role role's trust and session revocation
SESSIONS = {}  # access key id of an AssumeRole session -> (role arn, issue time)
KMS_OPS = ("Encrypt", "Decrypt", "DescribeKey")
AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/,\s]+)/(\d{8})/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request,\s*"
    r"SignedHeaders=([a-z0-9;-]+),\s*Signature=([0-9a-f]{64})$")


class KmsFault(Exception):
    def __init__(self, status, type_, message):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


def arn_of(kid):
    return "arn:aws:kms:%s:%s:key/%s" % (ARGS.region, ARGS.account, kid)


def resolve(key_ref):
    """KeyId as KMS accepts it -> key uuid, or NotFoundException."""
    ref = key_ref or ""
    m = re.match(r"^arn:aws:kms:([a-z0-9-]+):(\d{12}):(key/.+|alias/.+)$", ref)
    if m:
        if m.group(1) != ARGS.region or m.group(2) != ARGS.account:
            raise KmsFault(400, "NotFoundException", "Invalid arn %s" % ref)
        ref = m.group(3)
        if ref.startswith("key/"):
            ref = ref[4:]
    if ref.startswith("alias/"):
        kid = ALIASES.get(ref)
        if kid is None or kid not in KEYS:
            raise KmsFault(400, "NotFoundException", "Alias %s is not found." % arn_alias(ref))
        return kid
    if ref not in KEYS:
        raise KmsFault(400, "NotFoundException", "Key '%s' does not exist" % arn_of(ref))
    return ref


def arn_alias(name):
    return "arn:aws:kms:%s:%s:%s" % (ARGS.region, ARGS.account, name)


def check_access(kid, op):
    if op in KEYS[kid]["deny"]:
        raise KmsFault(400, "AccessDeniedException",
                       "User: arn:aws:iam::%s:user/cmk-test is not authorized to perform: kms:%s on resource: "
                       "%s because no identity-based policy allows the kms:%s action" % (ARGS.account, op,
                                                                                        arn_of(kid), op))


def check_usable(kid):
    st = KEYS[kid]["state"]
    if st == "Enabled":
        return
    if st == "Disabled":
        raise KmsFault(400, "DisabledException", "%s is disabled." % arn_of(kid))
    raise KmsFault(400, "KMSInvalidStateException", "%s is pending deletion." % arn_of(kid)
                   if st == "PendingDeletion" else "%s is %s." % (arn_of(kid), st))


def aad(ctx):
    if not isinstance(ctx, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()):
        raise KmsFault(400, "ValidationException", "EncryptionContext must be a map of strings")
    return json.dumps(ctx, sort_keys=True, separators=(",", ":")).encode()


def key_metadata(kid):
    k = KEYS[kid]
    md = {
        "AWSAccountId": ARGS.account, "KeyId": kid, "Arn": k["arn"], "CreationDate": k["created"],
        "Enabled": k["state"] == "Enabled", "Description": "cmk_lakebase test key",
        "KeyUsage": "ENCRYPT_DECRYPT", "KeyState": k["state"], "Origin": "AWS_KMS", "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT", "KeySpec": "SYMMETRIC_DEFAULT",
        "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"], "MultiRegion": False,
    }
    if k["state"] == "PendingDeletion":
        md["DeletionDate"] = k["deletion"]
        md["PendingDeletionWindowInDays"] = 7
    return md


def kms_op(op, req):
    if not isinstance(req, dict):
        raise KmsFault(400, "SerializationException", "request body is not a JSON object")
    if op == "DescribeKey":
        kid = resolve(req.get("KeyId"))
        check_access(kid, op)
        return {"KeyMetadata": key_metadata(kid)}
    if op == "Encrypt":
        kid = resolve(req.get("KeyId"))
        check_access(kid, op)
        check_usable(kid)
        try:
            pt = base64.b64decode(req.get("Plaintext", ""), validate=True)
        except Exception:
            raise KmsFault(400, "SerializationException", "Plaintext is not base64")
        if not 1 <= len(pt) <= 4096:
            raise KmsFault(400, "ValidationException", "Plaintext must be 1 to 4096 bytes")
        nonce = secrets.token_bytes(12)
        ct = AESGCM(KEYS[kid]["material"]).encrypt(nonce, pt, aad(req.get("EncryptionContext", {})))
        blob = b"\x01" + kid.encode() + nonce + ct
        return {"CiphertextBlob": base64.b64encode(blob).decode(), "KeyId": arn_of(kid),
                "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
    if op == "Decrypt":
        try:
            blob = base64.b64decode(req.get("CiphertextBlob", ""), validate=True)
        except Exception:
            raise KmsFault(400, "SerializationException", "CiphertextBlob is not base64")
        if len(blob) < 1 + 36 + 12 + 16 or blob[0] != 1:
            raise KmsFault(400, "InvalidCiphertextException", "")
        kid = blob[1:37].decode(errors="replace")
        if kid not in KEYS:
            raise KmsFault(400, "NotFoundException", "Key '%s' does not exist" % arn_of(kid))
        if req.get("KeyId") is not None and resolve(req.get("KeyId")) != kid:
            raise KmsFault(400, "IncorrectKeyException",
                           "The key ID in the request does not identify a CMK that can perform this operation.")
        check_access(kid, op)
        check_usable(kid)
        try:
            pt = AESGCM(KEYS[kid]["material"]).decrypt(blob[37:49], blob[49:], aad(req.get("EncryptionContext", {})))
        except Exception:
            raise KmsFault(400, "InvalidCiphertextException", "")
        return {"Plaintext": base64.b64encode(pt).decode(), "KeyId": arn_of(kid),
                "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
    raise KmsFault(400, "UnknownOperationException", "")


def access_key_of(headers):
    m = AUTH_RE.match(headers.get("Authorization") or "")
    return m.group(1) if m else ""


def check_session(akid):
    """A revoked AssumeRole session is refused like IAM's AWSRevokeOldSessions policy does."""
    s = SESSIONS.get(akid)
    if s and s[1] <= ROLE["revoked_before"]:
        session = s[0].replace(":iam::", ":sts::").replace(":role/", ":assumed-role/")
        raise KmsFault(400, "AccessDeniedException",
                       "User: %s is not authorized to perform: kms:* with an explicit deny in an identity-based "
                       "policy" % session)


def verify_sigv4(method, path, headers, body, service, required=("host", "x-amz-date", "x-amz-target", "content-type")):
    """Raises KmsFault unless the request carries a valid SigV4 signature (by botocore)."""
    auth = headers.get("Authorization") or ""
    m = AUTH_RE.match(auth)
    if not m:
        raise KmsFault(400, "IncompleteSignatureException", "Authorization header is missing or malformed")
    akid, date8, region, svc, signed, given = m.groups()
    if akid not in CREDS:
        raise KmsFault(400, "UnrecognizedClientException", "The security token included in the request is invalid.")
    secret, token = CREDS[akid]
    amz_date = headers.get("X-Amz-Date") or ""
    if region != ARGS.region or svc != service or amz_date[:8] != date8:
        raise KmsFault(400, "InvalidSignatureException",
                       "Credential should be scoped to a valid region/service/date: %s/%s/%s" % (date8, region, svc))
    try:
        t = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        raise KmsFault(400, "IncompleteSignatureException", "X-Amz-Date is missing or malformed")
    if abs(time.time() - t.timestamp()) > 300:
        raise KmsFault(400, "InvalidSignatureException", "Signature expired: %s" % amz_date)
    names = signed.split(";")
    required = set(required)
    if token is not None:
        required.add("x-amz-security-token")
        if not hmac.compare_digest((headers.get("X-Amz-Security-Token") or "").encode(), token.encode()):
            raise KmsFault(400, "UnrecognizedClientException", "The security token included in the request is invalid.")
    if not required.issubset(names):
        raise KmsFault(400, "InvalidSignatureException", "SignedHeaders must include %s" % ";".join(sorted(required)))
    sent = {}
    for n in names:
        vals = headers.get_all(n)
        if vals is None:
            raise KmsFault(400, "InvalidSignatureException", "signed header %s is not in the request" % n)
        sent[n] = ",".join(vals)
    request = AWSRequest(method=method, url="http://" + sent["host"] + path, data=body, headers=sent)
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(akid, secret, token), service, region)
    if signer.signed_headers(signer.headers_to_sign(request)) != signed:
        raise KmsFault(400, "InvalidSignatureException", "SignedHeaders do not match the headers botocore signs")
    canonical = signer.canonical_request(request)
    expect = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expect, given):
        raise KmsFault(400, "InvalidSignatureException",
                       "The request signature we calculated does not match the signature you provided.")


def xml_escape(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cmk-aws-kms-test"

    def log_message(self, fmt, *args):
        sys.stderr.write("aws_kms_server: %s\n" % (fmt % args))

    def reply(self, status, body, ctype="application/x-amz-json-1.1", extra=None):
        data = body if isinstance(body, bytes) else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # --- IMDSv2 -------------------------------------------------------------------
    def do_PUT(self):
        self.body()
        if ARGS.imds_role and self.path == "/latest/api/token" and \
                self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            tok = secrets.token_urlsafe(24)
            with LOCK:
                IMDS_TOKENS.add(tok)
            return self.reply(200, tok, "text/plain")
        self.reply(404, "not found", "text/plain")

    def do_GET(self):
        if self.path == "/_test/stats":
            with LOCK:
                return self.reply(200, json.dumps(STATS), "application/json")
        if ARGS.imds_role and self.path.startswith("/latest/meta-data/iam/security-credentials/"):
            with LOCK:
                ok = self.headers.get("X-aws-ec2-metadata-token") in IMDS_TOKENS
            if not ok:
                return self.reply(401, "", "text/plain")
            role = self.path[len("/latest/meta-data/iam/security-credentials/"):]
            if role == "":
                return self.reply(200, ARGS.imds_role, "text/plain")
            if role != ARGS.imds_role:
                return self.reply(404, "", "text/plain")
            akid, secret, token, exp = issue_temporary()
            with LOCK:
                STATS["imds"] += 1
            return self.reply(200, json.dumps({
                "Code": "Success", "LastUpdated": iso(time.time()), "Type": "AWS-HMAC", "AccessKeyId": akid,
                "SecretAccessKey": secret, "Token": token, "Expiration": iso(exp)}), "text/plain")
        self.reply(404, "not found", "text/plain")

    def do_POST(self):
        body = self.body()
        if self.path.startswith("/_test/"):
            return self.control(self.path[len("/_test/"):], body)
        target = self.headers.get("X-Amz-Target") or ""
        if not target:
            return self.sts(body)
        op = target[len("TrentService."):] if target.startswith("TrentService.") else ""
        try:
            with LOCK:
                STATS["requests"][op or target] = STATS["requests"].get(op or target, 0) + 1
            try:
                verify_sigv4("POST", self.path, self.headers, body, "kms")
            except KmsFault as f:
                with LOCK:
                    # an access key the server does not know is not a signature error
                    STATS["unknown_keys" if f.type == "UnrecognizedClientException" else "bad_signatures"] += 1
                    STATS["last_auth_error"] = "%s: %s" % (f.type, f.message)
                raise
            with LOCK:
                STATS["verified"] += 1
                mode, ops = FAIL["mode"], FAIL["ops"]
                check_session(access_key_of(self.headers))
            if mode != "none" and (ops is None or op in ops):
                if mode == "stall":
                    time.sleep(ARGS.stall_seconds)
                    raise KmsFault(500, "KMSInternalException", "stalled")
                if mode == "500":
                    raise KmsFault(500, "KMSInternalException", "We encountered an internal error.")
                if mode == "throttle":
                    raise KmsFault(400, "ThrottlingException", "Rate exceeded")
                if mode == "unavailable":
                    raise KmsFault(400, "KeyUnavailableException", "The key is unavailable. You can retry.")
            if op not in KMS_OPS:
                raise KmsFault(400, "UnknownOperationException", "")
            if (self.headers.get("Content-Type") or "") != "application/x-amz-json-1.1":
                raise KmsFault(400, "SerializationException", "Content-Type must be application/x-amz-json-1.1")
            try:
                req = json.loads(body or b"{}")
            except ValueError:
                raise KmsFault(400, "SerializationException", "body is not JSON")
            with LOCK:
                out = kms_op(op, req)
            self.reply(200, json.dumps(out))
        except KmsFault as f:
            self.reply(f.status, json.dumps({"__type": f.type, "message": f.message}),
                       extra={"x-amzn-ErrorType": f.type + ":"})

    # --- STS AssumeRoleWithWebIdentity (unsigned, query protocol) ------------------
    def sts(self, body):
        form = dict(urllib.parse.parse_qsl(body.decode(errors="replace")))
        rid = str(uuid.uuid4())

        def error(status, code, msg):
            x = ("<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>"
                 "<Code>%s</Code><Message>%s</Message></Error><RequestId>%s</RequestId></ErrorResponse>"
                 % (code, xml_escape(msg), rid))
            self.reply(status, x, "text/xml")

        if form.get("Action") == "AssumeRole" and ARGS.assume_role:
            return self.assume_role(form, body, error, rid)
        if form.get("Action") != "AssumeRoleWithWebIdentity" or not ARGS.role_arn:
            return error(400, "InvalidAction", "Could not find operation %s" % form.get("Action"))
        with LOCK:
            STATS["sts"] += 1
            mode = FAIL["mode"]
        if mode == "sts_deny" or form.get("RoleArn") != ARGS.role_arn:
            return error(403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
        if not hmac.compare_digest(form.get("WebIdentityToken", "").encode(), ARGS.web_identity_token.encode()):
            return error(400, "InvalidIdentityToken", "The web identity token that was passed is not valid")
        akid, secret, token, exp = issue_temporary()
        x = ("<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">"
             "<AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>%s</AccessKeyId>"
             "<SecretAccessKey>%s</SecretAccessKey><SessionToken>%s</SessionToken><Expiration>%s</Expiration>"
             "</Credentials><SubjectFromWebIdentityToken>system:serviceaccount:db:postgres"
             "</SubjectFromWebIdentityToken><AssumedRoleUser><Arn>%s/%s</Arn></AssumedRoleUser>"
             "</AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>%s</RequestId></ResponseMetadata>"
             "</AssumeRoleWithWebIdentityResponse>"
             % (akid, xml_escape(secret), xml_escape(token), iso(exp),
                ARGS.role_arn.replace(":role/", ":assumed-role/"), xml_escape(form.get("RoleSessionName", "")),
                rid))
        self.reply(200, x, "text/xml")

    # --- STS AssumeRole (query protocol, SigV4-signed for service "sts") -------------
    def assume_role(self, form, body, error, rid):
        try:
            verify_sigv4("POST", self.path, self.headers, body, "sts", required=("host", "x-amz-date"))
        except KmsFault as f:
            with LOCK:
                STATS["unknown_keys" if f.type == "UnrecognizedClientException" else "bad_signatures"] += 1
                STATS["last_auth_error"] = "%s: %s" % (f.type, f.message)
            code = {"UnrecognizedClientException": "InvalidClientTokenId",
                    "InvalidSignatureException": "SignatureDoesNotMatch"}.get(f.type, f.type)
            return error(403 if code != "IncompleteSignature" else 400, code, f.message)
        with LOCK:
            STATS["verified"] += 1
            STATS["assume_role"] += 1
            mode = FAIL["mode"]
            trust = ROLE["trust"]
        if mode == "sts_500":
            return error(500, "InternalFailure", "An internal error occurred.")
        if (self.headers.get("Content-Type") or "").split(";")[0] != "application/x-www-form-urlencoded":
            return error(400, "InvalidParameterValue", "Content-Type must be application/x-www-form-urlencoded")
        if form.get("Version") != "2011-06-15":
            return error(400, "InvalidParameterValue", "Version must be 2011-06-15")
        session = form.get("RoleSessionName", "")
        if not re.match(r"^[\w+=,.@-]{2,64}$", session):
            return error(400, "ValidationError", "1 validation error detected: Value at 'roleSessionName' failed "
                         "to satisfy constraint")
        try:
            duration = int(form.get("DurationSeconds", "3600"))
        except ValueError:
            duration = -1
        if not 900 <= duration <= 43200:
            return error(400, "ValidationError", "1 validation error detected: Value at 'durationSeconds' failed "
                         "to satisfy constraint")
        caller = access_key_of(self.headers)
        external = form.get("ExternalId")
        ext_ok = (external is None and not ARGS.external_id) or (
            external is not None and hmac.compare_digest(external.encode(), ARGS.external_id.encode()))
        if form.get("RoleArn") != ARGS.assume_role or not trust or not ext_ok:
            with LOCK:
                STATS["assume_role_denied"] += 1
            return error(403, "AccessDenied", "User: arn:aws:iam::%s:user/cmk-operator is not authorized to perform: "
                         "sts:AssumeRole on resource: %s" % (ARGS.account, form.get("RoleArn", "")))
        akid, secret, token, exp = issue_temporary()
        now = time.time()
        exp = now + (ARGS.sts_expiry or duration)
        with LOCK:
            SESSIONS[akid] = (ARGS.assume_role, now)
        role_name = ARGS.assume_role.split(":role/", 1)[1].split("/")[-1]
        x = ("<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>"
             "<AssumedRoleUser><Arn>arn:aws:sts::%s:assumed-role/%s/%s</Arn>"
             "<AssumedRoleId>AROA3XFRBF535EXAMPLE:%s</AssumedRoleId></AssumedRoleUser>"
             "<Credentials><AccessKeyId>%s</AccessKeyId><SecretAccessKey>%s</SecretAccessKey>"
             "<SessionToken>%s</SessionToken><Expiration>%s</Expiration></Credentials>"
             "</AssumeRoleResult><ResponseMetadata><RequestId>%s</RequestId></ResponseMetadata>"
             "</AssumeRoleResponse>"
             % (ARGS.account, xml_escape(role_name), xml_escape(session), xml_escape(session), akid,
                xml_escape(secret), xml_escape(token), iso(exp), rid))
        note = "caller %s" % caller
        sys.stderr.write("aws_kms_server: AssumeRole %s by %s\n" % (ARGS.assume_role, note))
        self.reply(200, x, "text/xml")

    # --- control --------------------------------------------------------------------
    def control(self, op, body):
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return self.reply(400, json.dumps({"error": "not JSON"}), "application/json")
        with LOCK:
            if op == "create_key":
                kid = str(uuid.uuid4())
                KEYS[kid] = {"arn": arn_of(kid), "state": "Enabled", "material": secrets.token_bytes(32),
                             "deny": set(), "created": time.time(), "deletion": None}
                if req.get("alias"):
                    ALIASES[req["alias"]] = kid
                return self.reply(200, json.dumps({"KeyId": kid, "Arn": arn_of(kid)}), "application/json")
            if op == "set":
                kid = req.get("key")
                kid = ALIASES.get(kid, kid)  # a key id or one of its aliases
                if kid not in KEYS:
                    return self.reply(404, json.dumps({"error": "no key %s" % kid}), "application/json")
                if req.get("destroy"):
                    del KEYS[kid]
                    return self.reply(200, "{}", "application/json")
                if "state" in req:
                    KEYS[kid]["state"] = req["state"]
                    KEYS[kid]["deletion"] = time.time() + 7 * 86400 if req["state"] == "PendingDeletion" else None
                if "deletion" in req:  # DescribeKey's DeletionDate, as given (any JSON number)
                    KEYS[kid]["deletion"] = req["deletion"]
                if "deny" in req:
                    KEYS[kid]["deny"] = set(req["deny"] or [])
                return self.reply(200, json.dumps({"KeyState": KEYS[kid]["state"]}), "application/json")
            if op == "role":
                if "trust" in req:
                    ROLE["trust"] = bool(req["trust"])
                if req.get("revoke_sessions"):
                    ROLE["revoked_before"] = time.time()
                if "expiry" in req:  # seconds the next sessions live (0: as asked)
                    ARGS.sts_expiry = float(req["expiry"])
                return self.reply(200, json.dumps({"trust": ROLE["trust"]}), "application/json")
            if op == "fail":
                FAIL["mode"] = req.get("mode", "none")
                FAIL["ops"] = set(req["ops"]) if req.get("ops") else None
                return self.reply(200, "{}", "application/json")
            if op == "reset_stats":
                STATS.update({"verified": 0, "bad_signatures": 0, "unknown_keys": 0, "requests": {}, "last_auth_error": "",
                              "sts": 0, "imds": 0, "assume_role": 0, "assume_role_denied": 0})
                return self.reply(200, "{}", "application/json")
        return self.reply(404, json.dumps({"error": "unknown control op %s" % op}), "application/json")


def iso(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def issue_temporary():
    akid = "ASIA" + secrets.token_hex(8).upper()
    secret = base64.b64encode(secrets.token_bytes(30)).decode()
    token = base64.b64encode(secrets.token_bytes(48)).decode()
    with LOCK:
        CREDS[akid] = (secret, token)
    return akid, secret, token, time.time() + 3600


def watchdog(deadline, parent):
    while True:
        time.sleep(0.5)
        if time.time() > deadline:
            sys.stderr.write("aws_kms_server: lifetime reached, exiting\n")
            os._exit(0)
        if parent:
            try:
                os.kill(parent, 0)
            except OSError:
                sys.stderr.write("aws_kms_server: parent %d gone, exiting\n" % parent)
                os._exit(0)


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--port-file", required=True)
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--account", default="111122223333")
    p.add_argument("--cred", action="append", default=[], help="AKID:SECRET")
    p.add_argument("--role-arn", default="")
    p.add_argument("--web-identity-token", default="")
    p.add_argument("--imds-role", default="")
    p.add_argument("--assume-role", default="", help="role ARN that STS AssumeRole admits")
    p.add_argument("--external-id", default="", help="the ExternalId the role's trust policy requires")
    p.add_argument("--sts-expiry", type=float, default=0, help="seconds issued sessions live (default: asked)")
    p.add_argument("--stall-seconds", type=float, default=30)
    p.add_argument("--lifetime", type=float, default=1800)
    p.add_argument("--parent-pid", type=int, default=0)
    ARGS = p.parse_args()
    for c in ARGS.cred:
        akid, _, secret = c.partition(":")
        CREDS[akid] = (secret, None)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=watchdog, args=(time.time() + ARGS.lifetime, ARGS.parent_pid), daemon=True).start()
    tmp = ARGS.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % httpd.server_address[1])
    os.rename(tmp, ARGS.port_file)
    sys.stderr.write("aws_kms_server: listening on 127.0.0.1:%d\n" % httpd.server_address[1])
    httpd.serve_forever()


if __name__ == "__main__":
    main()
