#!/usr/bin/python3
"""The PyKMIP server (Debian python3-pykmip 0.10) for the KMIP provider tests.

Serves KMIP over mutual TLS 1.2 on 127.0.0.1, on a free port (PyKMIP refuses port 0:
we ask the kernel for a free one and retry on a lost race; written to DIR/port once
the server listens), with its SQLite database, config and
log in DIR. It stops by itself: when its parent process goes away, after a hard
lifetime limit (--lifetime seconds, default 900), or on SIGTERM/SIGINT.

Why the settings: OpenSSL 3 (Debian 12) refuses TLS 1.0, which PyKMIP's default
"Basic" auth suite asks for, so auth_suite = TLS1.2; its TLS 1.2 suite list keeps the
ECDHE-RSA ones that an RSA server certificate can use.

Usage: pykmip_server.py --dir DIR --certs CERTDIR [--lifetime SECONDS] [--port PORT]
A restart with the same DIR keeps the keys (SQLite); --port keeps the address.
"""
import argparse
import os
import signal
import socket
import sys
import threading
import time

from kmip.services.server import server as kmip_server
from kmip.core import exceptions as kmip_exceptions
from kmip.services.server import session as kmip_session

# PyKMIP's session thread retries its message loop after any exception other than
# ConnectionClosed; a client that went away (a postmaster killed by the kill switch)
# raises BrokenPipeError there on newer Pythons (Debian 13+), and the thread spins on it
# for ever, starving the server until requests time out. A socket error ends the
# session, as a closed connection does.
_message_loop = kmip_session.KmipSession._handle_message_loop


def _message_loop_ending_on_socket_errors(self):
    try:
        return _message_loop(self)
    except OSError as e:
        raise kmip_exceptions.ConnectionClosed() from e


kmip_session.KmipSession._handle_message_loop = _message_loop_ending_on_socket_errors


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--certs", required=True)
    ap.add_argument("--lifetime", type=int, default=900)
    ap.add_argument("--port", type=int, default=0, help="reuse this port (a restart after a stop)")
    args = ap.parse_args()
    d = os.path.abspath(args.dir)
    c = os.path.abspath(args.certs)
    os.makedirs(os.path.join(d, "policies"), exist_ok=True)
    conf = os.path.join(d, "server.conf")
    port = args.port or free_port()
    # PyKMIP passes key_path as the certificate file and certificate_path as the key
    # file of ssl.load_cert_chain (swapped); older Python and OpenSSL forgave it, newer
    # ones (Debian 13+) do not. One PEM holding both serves either argument.
    both = os.path.join(d, "server_both.pem")
    with open(both, "w") as f:
        for name in ("server.pem", "server.key"):
            with open(os.path.join(c, name)) as part:
                f.write(part.read())
    os.chmod(both, 0o600)
    with open(conf, "w") as f:
        f.write(
            "[server]\n"
            "hostname=127.0.0.1\n"
            "port={p}\n"
            "certificate_path={b}\n"
            "key_path={b}\n"
            "ca_path={c}/ca.pem\n"
            "auth_suite=TLS1.2\n"
            "policy_path={d}/policies\n"
            "enable_tls_client_auth=True\n"
            "tls_cipher_suites=TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384,"
            "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256,TLS_RSA_WITH_AES_256_CBC_SHA256\n"
            "logging_level=INFO\n"
            "database_path={d}/pykmip.db\n".format(b=both, c=c, d=d, p=port)
        )
    port_file = os.path.join(d, "port")
    if os.path.exists(port_file):
        os.unlink(port_file)

    parent = os.getppid()
    started = time.monotonic()
    srv = kmip_server.KmipServer(config_path=conf, log_path=os.path.join(d, "server.log"))

    def reaper():
        # Parent death or the lifetime limit: ask serve() to stop, then make sure.
        while True:
            time.sleep(0.5)
            if os.getppid() != parent or time.monotonic() - started > args.lifetime:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(15)
                os._exit(1)

    threading.Thread(target=reaper, daemon=True).start()
    with srv:
        port = srv._socket.getsockname()[1]
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.rename(tmp, port_file)
        print("pykmip_server: listening on 127.0.0.1:%d" % port, flush=True)
        srv.serve()
    print("pykmip_server: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
