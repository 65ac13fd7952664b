"""Shared plumbing of the loopback KMS test servers (vault_server.py, gcp_kms_server.py).

A ThreadingHTTPServer bound to 127.0.0.1 on a free port (written to --port-file once
listening), optionally TLS (--tls-cert/--tls-key), that stops by itself: after
--lifetime seconds, or when its parent process goes away (the TAP test died), or on
SIGTERM. Run with /usr/bin/python3 (Debian's python3-cryptography, python3-jwt).

Behaviour switches shared by both servers, set through the control endpoint:
  mode normal | error500 | throttle | stall   (stall: hold the request for --stall s, or
                                               for "seconds" given with the mode)
Control requests (POST /__control, JSON {"action": ...}) are answered in every mode.
"""

import argparse
import json
import os
import signal
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def base_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--port-file", required=True, help="write the listening port here")
    p.add_argument("--lifetime", type=float, default=900.0, help="hard limit in seconds")
    p.add_argument("--stall", type=float, default=30.0, help="how long a stalled request hangs")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--log", help="append one line per request here")
    return p


class Handler(BaseHTTPRequestHandler):
    """Subclasses implement route(method, path, headers, body) -> (status, obj|bytes, headers)."""

    protocol_version = "HTTP/1.1"
    server_version = "cmk-loopback/1"

    def log_message(self, fmt, *args):  # quiet; see --log
        pass

    def _reply(self, status, payload, extra_headers=None):
        data = payload if isinstance(payload, (bytes, bytearray)) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        st = self.server.state
        if self.path.startswith("/__control"):
            try:
                req = json.loads(body or b"{}")
                status, obj = self.server.app.control(req)
            except Exception as e:  # a test bug: say so loudly
                status, obj = 400, {"error": "control: %s" % e}
            return self._reply(status, obj)
        with st.lock:
            st.requests.append({"method": method, "path": self.path,
                                "headers": {k.lower(): v for k, v in self.headers.items()}})
            mode = st.mode
            stall = st.stall if st.stall is not None else self.server.stall
        if self.server.logf:
            self.server.logf.write("%s %s mode=%s\n" % (method, self.path, mode))
            self.server.logf.flush()
        if mode == "stall":
            time.sleep(stall)
            return self._reply(503, self.server.app.transient_error(503))
        if mode == "error500":
            return self._reply(500, self.server.app.transient_error(500))
        if mode == "throttle":
            return self._reply(429, self.server.app.transient_error(429))
        try:
            status, obj, hdrs = self.server.app.route(method, self.path, self.headers, body)
        except Exception as e:
            status, obj, hdrs = 500, self.server.app.transient_error(500, "test server bug: %r" % e), {}
        return self._reply(status, obj, hdrs)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")


class State:
    def __init__(self):
        self.lock = threading.RLock()
        self.mode = "normal"
        self.stall = None
        self.requests = []


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that gave up on a stalled request: expected, not worth a traceback.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def serve(app, args, on_listen=None):
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = app.state
    httpd.app = app
    httpd.stall = args.stall
    httpd.logf = open(args.log, "a") if args.log else None
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    port = httpd.server_address[1]
    if on_listen:
        on_listen(port)  # before the port file appears: the test waits for that file
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.rename(tmp, args.port_file)

    parent = os.getppid()
    deadline = time.monotonic() + args.lifetime

    def watchdog():
        while True:
            time.sleep(0.5)
            if time.monotonic() > deadline or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    httpd.serve_forever()


def common_control(state, req):
    """Handles the actions both servers share; returns a reply or None."""
    a = req.get("action")
    if a == "mode":
        if req.get("value") not in ("normal", "error500", "throttle", "stall"):
            raise ValueError("unknown mode %r" % req.get("value"))
        with state.lock:
            state.mode = req["value"]
            # "seconds": how long a request of this stall is held (else --stall)
            state.stall = float(req["seconds"]) if "seconds" in req else None
        return 200, {"mode": state.mode}
    if a == "requests":
        with state.lock:
            return 200, {"requests": list(state.requests)}
    if a == "ping":
        return 200, {"ok": True}
    return None


def crc32c(data):
    """CRC-32C (Castagnoli), as Cloud KMS uses for its integrity fields."""
    table = _CRC_TABLE
    c = 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _make_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_CRC_TABLE = _make_table()
assert crc32c(b"123456789") == 0xE3069283
