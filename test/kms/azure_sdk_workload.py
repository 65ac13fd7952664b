#!/usr/bin/python3
"""Fidelity check of the loopback Entra ID's workload identity federation by the Azure
SDK for Python (Debian python3-azure): azure-identity's ClientAssertionCredential (the
credential under WorkloadIdentityCredential, which Debian's 1.13.0b2 lacks) sends the
projected service-account token of the server's state directory as the client
assertion, in the customer's tenant (a multi-tenant app), and must parse the server's
token answer (Key Vault calls with such a token are 064's azure_sdk_check.py); with the federated identity
credential removed, and with the app's consent in the tenant revoked, the SDK raises
ClientAuthenticationError carrying AADSTS70021 / AADSTS700016. The server's state is
restored at the end. Prints "ok ..." / "FAIL ..." lines; exit 1 on any failure.

  azure_sdk_workload.py STATE_DIR
"""

import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from azure_sdk_common import check, control, failures, server_log, setup  # noqa: E402

state_dir = sys.argv[1]
info = setup(state_dir)

from azure.identity import ClientAssertionCredential  # noqa: E402


def token_file():
    return open(os.path.join(state_dir, "federated_token")).read().strip()


scope = "https://vault.azure.net/.default"
# Debian's 1.13.0b2 passes ClientAssertionCredential's keyword arguments on to object()
# (a TypeError), so the authority comes from the environment, as the workload identity
# webhook sets it anyway.
os.environ["AZURE_AUTHORITY_HOST"] = info["authority_host"]
common = {}


def fresh():
    return ClientAssertionCredential(info["customer_tenant"], info["client_id"], token_file, **common)


def refused(label, code):
    try:
        fresh().get_token(scope)
        check(label, False, "token issued")
    except Exception as e:  # ClientAuthenticationError
        check(label, code in str(e), e)


try:
    cred = fresh()
    tok = cred.get_token(scope)
    check("ClientAssertionCredential (federated token) gets a token in the customer's tenant",
          bool(tok.token) and tok.expires_on > 0)
    entries = [e for e in server_log() if e.get("kind") == "token"]
    check("the server took it as a client assertion", entries and entries[-1].get("auth") == "assertion", entries[-1:])
    control("remove_federated")
    refused("the federated credential removed: AADSTS70021", "AADSTS70021")
    control("add_federated")
    control("revoke_consent")
    refused("the app's consent in the customer's tenant revoked: AADSTS700016", "AADSTS700016")
finally:
    control("add_federated")
    control("grant_consent")

sys.exit(1 if failures else 0)
