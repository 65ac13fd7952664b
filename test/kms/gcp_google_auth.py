#!/usr/bin/python3
"""Fidelity check of the loopback Google peer (gcp_kms_server.py) with Google's own
Python client, google-auth (python3-google-auth 2.x: Debian 13 and later; Debian 12's
1.5.1 has neither credential class used here). google-auth builds every request and
parses every answer below; the peer checks each request as it checks the provider's:

1. service-account key file -> OAuth 2.0 JWT bearer grant at the file's token_uri
   (the peer verifies google-auth's RS256 assertion with PyJWT: kid, iss, aud, scope,
   lifetime), then Cloud KMS encrypt/decrypt with that token.
2. Service-account impersonation: impersonated_credentials with the key file's
   credentials as source -> IAM Credentials generateAccessToken (the peer checks the
   bearer token's cloud-platform scope, the token creator binding, the body's scope,
   lifetime and delegates); google-auth parses accessToken/expireTime; the minted token
   encrypts and decrypts on the key. Binding removed at the peer -> google-auth raises
   RefreshError carrying PERMISSION_DENIED.
3. Workload identity federation: identity_pool (external_account) credentials with a
   subject token file -> STS /v1/token (RFC 8693 form as STS v1 takes it: the peer
   checks content type, no Authorization header, grant type, audience, scope, token
   types and the subject JWT); the federated token used on the key directly, and
   through the file's service_account_impersonation_url. Pool provider disabled at
   the peer -> OAuthError carrying invalid_grant; an unknown provider -> invalid_target.

Prints one "ok ..." line per check; exit 0 if all pass, an AssertionError otherwise.

Usage: gcp_google_auth.py URL SA_JSON KEY TARGET_EMAIL AUDIENCE SUBJECT_FILE
  URL: the peer (http://127.0.0.1:PORT); the peer must run with --impersonate
  TARGET_EMAIL and --pool-provider AUDIENCE; SUBJECT_FILE a subject token the peer
  wrote (control write_subject).
"""

import base64
import datetime
import json
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree

import google.auth  # noqa: E402
from google.auth import exceptions, identity_pool, impersonated_credentials  # noqa: E402
from google.auth.transport.requests import AuthorizedSession, Request  # noqa: E402
from google.oauth2 import service_account  # noqa: E402
import requests  # noqa: E402

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
CLOUDKMS = "https://www.googleapis.com/auth/cloudkms"


def control(url, **req):
    r = requests.post(url + "/__control", json=req, timeout=10)
    assert r.status_code == 200, (req, r.status_code, r.text)
    return r.json()


def round_trip(url, key, creds, label):
    """Cloud KMS encrypt then decrypt with google-auth's authorized session."""
    s = AuthorizedSession(creds)
    pt = os.urandom(32)
    r = s.post("%s/v1/%s:encrypt" % (url, key), json={"plaintext": base64.b64encode(pt).decode()}, timeout=10)
    assert r.status_code == 200, (label, r.status_code, r.text)
    ct = r.json()["ciphertext"]
    r = s.post("%s/v1/%s:decrypt" % (url, key), json={"ciphertext": ct}, timeout=10)
    assert r.status_code == 200, (label, r.status_code, r.text)
    assert base64.b64decode(r.json()["plaintext"]) == pt, label
    assert creds.token and creds.expiry is not None, label
    print("ok %s: encrypt + decrypt on the key (token expires %s)" % (label, creds.expiry.isoformat()))


def refused(creds, what, label):
    try:
        creds.refresh(Request())
    except exceptions.GoogleAuthError as e:  # RefreshError (IAM), OAuthError (STS)
        assert what in str(e), (label, str(e))
        print("ok %s: google-auth raises %s (%s)" % (label, type(e).__name__, what))
        return
    raise AssertionError("%s: the refresh succeeded" % label)


def main():
    url, sa_json, key, target, audience, subject = sys.argv[1:7]
    print("google-auth %s" % google.auth.__version__)

    # 1. the service account's own token (JWT bearer grant), used on the key. The peer's
    # key admits only the customer's account (--impersonate): PERMISSION_DENIED for it.
    sa = service_account.Credentials.from_service_account_file(sa_json, scopes=[CLOUD_PLATFORM])
    sa.refresh(Request())
    before = control(url, action="stats")
    assert before["verified_assertions"] >= 1, before
    print("ok service-account JWT bearer grant: the peer verified google-auth's assertion")
    r = AuthorizedSession(sa).post("%s/v1/%s:encrypt" % (url, key), json={"plaintext": "AAAA"}, timeout=10)
    assert r.status_code == 403 and "PERMISSION_DENIED" in r.text, (r.status_code, r.text)
    print("ok the operator's own token is refused by the customer's key (403 PERMISSION_DENIED)")

    # 2. impersonation through generateAccessToken
    endpoint = "%s/v1/projects/-/serviceAccounts/%s:generateAccessToken" % (url, target)
    imp = impersonated_credentials.Credentials(source_credentials=sa, target_principal=target,
                                               target_scopes=[CLOUDKMS], lifetime=600,
                                               iam_endpoint_override=endpoint)
    imp.refresh(Request())
    after = control(url, action="stats")
    assert after["minted"] == before["minted"] + 1, (before, after)
    left = imp.expiry - datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)  # naive UTC
    assert datetime.timedelta(seconds=500) < left <= datetime.timedelta(seconds=601), left
    print("ok generateAccessToken: minted for %s, expireTime parsed (%d s left)" % (target, left.total_seconds()))
    round_trip(url, key, imp, "impersonated token")
    control(url, action="token_creator", value="off")
    refused(impersonated_credentials.Credentials(source_credentials=sa, target_principal=target,
                                                 target_scopes=[CLOUDKMS], iam_endpoint_override=endpoint),
            "PERMISSION_DENIED", "token creator binding removed")
    control(url, action="token_creator", value="on")

    # 3. workload identity federation (external_account, file-sourced subject token)
    info = {"type": "external_account", "audience": audience,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": url + "/v1/token",
            "credential_source": {"file": subject, "format": {"type": "text"}}}
    fed = identity_pool.Credentials.from_info(info, scopes=[CLOUD_PLATFORM])
    s0 = control(url, action="stats")
    fed.refresh(Request())
    s1 = control(url, action="stats")
    assert s1["sts_exchanges"] == s0["sts_exchanges"] + 1 and s1["sts_refused"] == s0["sts_refused"], (s0, s1)
    print("ok STS token exchange: the peer took google-auth's RFC 8693 request")
    round_trip(url, key, fed, "federated token, on the key directly")
    info_imp = dict(info, service_account_impersonation_url=endpoint,
                    service_account_impersonation={"token_lifetime_seconds": 600})
    fed_imp = identity_pool.Credentials.from_info(info_imp, scopes=[CLOUD_PLATFORM])
    fed_imp.refresh(Request())
    s2 = control(url, action="stats")
    assert s2["minted"] == s1["minted"] + 1, (s1, s2)
    round_trip(url, key, fed_imp, "federated token impersonating %s" % target)
    control(url, action="provider", value="off")
    refused(identity_pool.Credentials.from_info(info, scopes=[CLOUD_PLATFORM]), "invalid_grant",
            "pool provider disabled")
    control(url, action="provider", value="on")
    bad = dict(info, audience=audience.replace("/providers/", "/providers/x"))
    refused(identity_pool.Credentials.from_info(bad, scopes=[CLOUD_PLATFORM]), "invalid_target",
            "unknown pool provider")
    return 0


if __name__ == "__main__":
    sys.exit(main())
