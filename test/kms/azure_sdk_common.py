"""What the Azure SDK fidelity checks (azure_sdk_check.py, azure_sdk_workload.py) share:
the loopback server's description, an environment in which the SDK talks only to it
(its CA trusted, no Azure variables, no proxy), one "ok"/"FAIL" line per check, and the
server's control and request log."""

import json
import os
import urllib.request

failures = []
info = {}


def setup(state_dir):
    """Reads server.json of the state directory and prepares the environment; returns info."""
    info.update(json.load(open(os.path.join(state_dir, "server.json"))))
    # requests (under MSAL and azure-core) verifies the server with this CA bundle.
    os.environ["REQUESTS_CA_BUNDLE"] = os.path.join(state_dir, "ca.pem")
    for v in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE",
              "AZURE_AUTHORITY_HOST", "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET",
              "AZURE_POD_IDENTITY_AUTHORITY_HOST", "HTTPS_PROXY", "https_proxy"):
        os.environ.pop(v, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    return info


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else ": " + str(detail)), flush=True)
    if not cond:
        failures.append(name)


def control(action, **kw):
    kw["action"] = action
    req = urllib.request.Request(info["control_url"], data=json.dumps(kw).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def server_log():
    return json.loads(urllib.request.urlopen("http://127.0.0.1:%d/_log" % info["http_port"], timeout=10).read())
