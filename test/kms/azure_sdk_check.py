#!/usr/bin/python3
"""Fidelity check of test/kms/azure_kv_server.py by independent code: the Azure SDK for
Python (Debian python3-azure: azure-identity, azure-keyvault-keys) is run against the
running test server and must accept its answers. Run by test/t/064_azure.pl; exits
non-zero (and says why) if the SDK rejects anything.

  azure_sdk_check.py STATE_DIR

What the SDK does here, each a check:
  - ClientSecretCredential and CertificateCredential (MSAL builds and signs its own
    client assertion, which the server verifies) get tokens from the server's Entra ID;
  - ManagedIdentityCredential gets tokens over the IMDS protocol
    (AZURE_POD_IDENTITY_AUTHORITY_HOST) and the App Service protocol
    (IDENTITY_ENDPOINT / IDENTITY_HEADER);
  - KeyClient.get_key reads the key bundle (the SDK first elicits the 401 challenge);
  - CryptographyClient wraps a key (locally, with the JWK public key from the bundle,
    and remotely) and unwraps it remotely with RSA-OAEP-256, and A256KW on the oct-HSM
    key; the values round-trip;
  - after the key is disabled / deleted / access is denied (through the control
    endpoint) the SDK sees enabled=False / ResourceNotFoundError(KeyNotFound) /
    HttpResponseError 403 Forbidden, i.e. it parses the server's error bodies.
The server's state is restored at the end.
"""

import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from azure_sdk_common import check, control, failures, server_log, setup  # noqa: E402

state_dir = sys.argv[1]
info = setup(state_dir)
ca = os.path.join(state_dir, "ca.pem")

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError  # noqa: E402
from azure.identity import CertificateCredential, ClientSecretCredential, ManagedIdentityCredential  # noqa: E402
from azure.keyvault.keys import KeyClient  # noqa: E402
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm  # noqa: E402

secret = open(os.path.join(state_dir, "client_secret")).read().strip()
scope = "https://vault.azure.net/.default"
common = dict(authority=info["authority_host"], instance_discovery=False)
vault = info["vault_url"]
kid = vault + "/keys/k/v1"
# The vault's host (127.0.0.1) is not under the challenge's resource domain
# (vault.azure.net): that check is for real vault names, so it is turned off here.
# Debian's SDK (azure-keyvault-keys 4.8.0b3) knows 7.3 and 7.4-preview.1, not 7.4 GA,
# which our provider sends; wrapkey/unwrapkey/key GET are the same in all three.
client_kw = dict(api_version="7.3", verify_challenge_resource=False)

try:
    cred = ClientSecretCredential(info["tenant"], info["client_id"], secret, **common)
    tok = cred.get_token(scope)
    check("ClientSecretCredential gets a token", bool(tok.token) and tok.expires_on > 0)

    bad = ClientSecretCredential(info["tenant"], info["client_id"], secret + "x", **common)
    try:
        bad.get_token(scope)
        check("a wrong client secret is refused", False, "token issued")
    except Exception as e:  # ClientAuthenticationError
        check("a wrong client secret is refused", "AADSTS7000215" in str(e), e)

    cert_cred = CertificateCredential(info["tenant"], info["client_id"],
                                      certificate_path=os.path.join(state_dir, "client.pem"), **common)
    check("CertificateCredential (MSAL's signed assertion) gets a token", bool(cert_cred.get_token(scope).token))
    entries = [e for e in server_log() if e.get("kind") == "token" and e.get("auth") == "assertion"]
    check("the server saw and verified the assertion", entries and "assertion_error" not in entries[-1], entries[-1:])

    os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = "http://127.0.0.1:%d" % info["http_port"]
    mi = ManagedIdentityCredential()
    check("ManagedIdentityCredential (IMDS protocol) gets a token", bool(mi.get_token(scope).token))
    del os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"]
    os.environ["IDENTITY_ENDPOINT"] = info["appservice_endpoint"]
    os.environ["IDENTITY_HEADER"] = open(os.path.join(state_dir, "identity_header")).read().strip()
    mi2 = ManagedIdentityCredential()
    check("ManagedIdentityCredential (App Service protocol) gets a token", bool(mi2.get_token(scope).token))
    del os.environ["IDENTITY_ENDPOINT"], os.environ["IDENTITY_HEADER"]

    keys = KeyClient(vault, cred, **client_kw)
    key = keys.get_key("k", "v1")
    check("KeyClient.get_key parses the key bundle",
          key.id == kid and key.properties.enabled is True and str(key.key_type) in ("RSA", "KeyType.rsa")
          and key.key.n and key.key.e, (key.id, key.properties.enabled, key.key_type))
    latest = keys.get_key("k")
    check("KeyClient.get_key without a version gives the latest version", latest.properties.version == "v2",
          latest.properties.version)

    kek = os.urandom(32)
    crypto = CryptographyClient(key, cred, **client_kw)  # has the public key: wraps locally
    w = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, kek)
    check("wrap_key returns 256 bytes under the key id", len(w.encrypted_key) == 256 and w.key_id == kid,
          (len(w.encrypted_key), w.key_id))
    u = crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w.encrypted_key)
    check("unwrap_key (remote) returns the wrapped key", u.key == kek)
    remote = CryptographyClient(kid, cred, **client_kw)

    # The SDK's own REST operations (its generated client: request and response
    # models), so that wrapkey is sent to the server instead of done locally.
    from azure.keyvault.keys._generated.models import KeyOperationsParameters

    def rest(op, name, alg, value):
        fn = getattr(remote._client, op)
        r = fn(vault_base_url=vault, key_name=name, key_version="v1",
               parameters=KeyOperationsParameters(algorithm=alg, value=value))
        return r.result

    def count(op, name):
        return len([e for e in server_log() if e.get("op") == op and e["path"].startswith("/keys/%s/" % name)])

    n_before = count("wrapkey", "k")
    w2 = rest("wrap_key", "k", "RSA-OAEP-256", kek)
    check("remote wrapkey through the SDK's REST client", count("wrapkey", "k") == n_before + 1 and len(w2) == 256,
          (n_before, len(w2)))
    check("remote wrap unwraps through the SDK", remote.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w2).key == kek)
    check("the SDK sent api-version 7.3", all(e.get("api_version") == "7.3" for e in server_log()
                                             if e.get("kind") == "vault" and e.get("has_token")))

    hw = rest("wrap_key", "hsmk", "A256KW", kek)
    hu = rest("unwrap_key", "hsmk", "A256KW", hw)
    check("A256KW wrapkey/unwrapkey on the oct-HSM key (remote)", len(hw) == 40 and hu == kek
          and count("wrapkey", "hsmk") == 1 and count("unwrapkey", "hsmk") == 1, (len(hw),))

    control("disable")
    check("disabled: get_key shows enabled=False", keys.get_key("k", "v1").properties.enabled is False)
    try:
        remote.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w.encrypted_key)
        check("disabled: unwrap_key is refused", False, "unwrapped")
    except HttpResponseError as e:
        check("disabled: unwrap_key is refused 403 KeyDisabled", e.status_code == 403 and e.error.code == "Forbidden",
              (e.status_code, e.error and e.error.code))
    control("enable")
    control("delete")
    try:
        keys.get_key("k", "v1")
        check("deleted: get_key raises ResourceNotFoundError", False, "found")
    except ResourceNotFoundError as e:
        check("deleted: get_key raises ResourceNotFoundError (KeyNotFound)", e.error.code == "KeyNotFound", e.error)
    control("restore")
    control("deny")
    try:
        keys.get_key("k", "v1")
        check("access denied: get_key raises 403", False, "allowed")
    except HttpResponseError as e:
        check("access denied: get_key raises 403 Forbidden", e.status_code == 403 and e.error.code == "Forbidden",
              (e.status_code, e.error and e.error.code))
    control("allow")
    control("expire")
    p = keys.get_key("k", "v1").properties
    check("expired: get_key shows expires_on in the past", p.expires_on is not None)
    control("restore")
except Exception as e:  # anything unexpected is a failure of the check, with its reason
    import traceback
    traceback.print_exc()
    failures.append("unexpected %s: %s" % (type(e).__name__, e))
    try:
        control("restore")
        control("allow")
    except Exception:
        pass

print("azure_sdk_check: %d failure(s)%s" % (len(failures), (": " + "; ".join(failures)) if failures else ""))
sys.exit(1 if failures else 0)
