#!/usr/bin/python3
"""Searches a core file for a cmk_lakebase cluster's keys (TAP 052_core_dumps).

Learns the keys independently of the product's code, from the files and documented
formats alone (docs/providers/local.md, src/core/keys/keymap.cpp's header comment,
docs/backups.md's WAL key scheme): the CMK from the local key store, the KEK unwrapped
from keyring.json, every DEK and the WAL master key unsealed from the key map, the
WAL segment keys derived for every segment in pg_wal. For each AES-256 key (each half
of a 64-byte XTS key, the KEK, the CMK) it expands the key schedule with its own
FIPS-197 key expansion and looks for every 16-byte round key, in FIPS byte order
(AES-NI code) and with each 32-bit word byte-swapped (OpenSSL's C code), at every
4-byte alignment of the core; it also looks for the raw 64-byte keys.

Usage: cmk_core_keys.py PGDATA KEY_STORE KEY_ID CORE
       cmk_core_keys.py PGDATA KEY_STORE KEY_ID --print IDENTITY   (one DEK in hex: controls)
Prints "keys N" (how many keys were learnt), then one line per key that was found:
"found KIND IDENTITY: R round keys[, raw key]", then "hits H" (keys found).
Exit 0 when it ran (whatever it found), 2 on a usage or format error.
"""
import base64
import json
import os
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def die(msg):
    print("cmk_core_keys: " + msg, file=sys.stderr)
    sys.exit(2)


def open_blob(key, blob, aad):  # 12-byte nonce || ciphertext || 16-byte tag
    return AESGCM(key).decrypt(blob[:12], blob[12:], aad)


# ---- FIPS-197 AES-256 key expansion
def _xtime(x):
    return ((x << 1) ^ (0x1B if x & 0x80 else 0)) & 0xFF


def _gmul(a, b):
    r = 0
    while b:
        if b & 1:
            r ^= a
        a = _xtime(a)
        b >>= 1
    return r


def _sbox():
    inv = [0] * 256
    for x in range(1, 256):
        for c in range(1, 256):
            if _gmul(x, c) == 1:
                inv[x] = c
                break
    box = []
    for x in range(256):
        i = inv[x]
        s = i
        for k in range(1, 5):
            s ^= ((i << k) | (i >> (8 - k))) & 0xFF
        box.append(s ^ 0x63)
    return box


SBOX = _sbox()


def expand256(key):
    w = [list(key[4 * i:4 * i + 4]) for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = list(w[i - 1])
        if i % 8 == 0:
            t = t[1:] + t[:1]
            t = [SBOX[b] for b in t]
            t[0] ^= rcon
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            t = [SBOX[b] for b in t]
        w.append([a ^ b for a, b in zip(w[i - 8], t)])
    flat = bytes(b for word in w for b in word)
    return [flat[16 * r:16 * r + 16] for r in range(15)]


def swapped(rk):
    return b"".join(rk[i:i + 4][::-1] for i in range(0, 16, 4))


# ---- the cluster's keys
def learn_keys(pgdata, store, key_id):
    keys = []  # (kind, identity, key bytes)
    keyring = json.load(open(os.path.join(pgdata, "cmk_lakebase", "keyring.json")))
    kf = json.load(open(os.path.join(store, key_id + ".key")))
    wrapped = base64.b64decode(keyring["wrapped_kek"])
    if wrapped[0] != 1:
        die("wrapped KEK of an unknown format")
    version = struct.unpack(">I", wrapped[1:5])[0]
    material = [base64.b64decode(v["material"]) for v in kf["versions"] if v["version"] == version]
    if not material:
        die("the key file has no version %d" % version)
    cmk = material[0]
    keys.append(("cmk", key_id, cmk))
    kek = open_blob(cmk, wrapped[5:], b"cmk_lakebase local wrap v1\0" + key_id.encode())
    keys.append(("kek", "generation %s" % keyring.get("kek_generation"), kek))

    data = open(os.path.join(pgdata, "cmk_lakebase", "keymap"), "rb").read()
    if data[:8] != b"CMKKMAP1":
        die("not a key map")
    generation = struct.unpack("<I", data[12:16])[0]
    deks = {}
    off = 96
    while off + 8 <= len(data):
        (length,) = struct.unpack("<I", data[off:off + 4])
        if length == 0 or off + 8 + length + 4 > len(data):
            break  # torn or zero tail
        body = data[off + 8:off + 8 + length]
        off += 8 + length + 4
        rtype = body[0]
        (idlen,) = struct.unpack("<H", body[2:4])
        ident = body[4:4 + idlen].decode()
        if rtype == 2:
            deks.pop(ident, None)
            continue
        (wlen,) = struct.unpack("<H", body[4 + idlen:6 + idlen])
        blob = body[6 + idlen:6 + idlen + wlen]
        if blob.count(0) == len(blob) or b"\0" * 8 in blob:
            # shredded in place when its file was removed (keymap.cpp, shred_locked):
            # a removal; a sealed DEK is random and has no run of eight zero bytes
            deks.pop(ident, None)
            continue
        aad = b"cmk_lakebase dek v1\0" + str(generation).encode() + b"\0" + ident.encode()
        deks[ident] = open_blob(kek, blob, aad)
    master = deks.pop("cmk_lakebase/wal-master", None)
    for ident, dek in sorted(deks.items()):
        keys.append(("dek", ident, dek))
    if master is not None:
        keys.append(("wal-master", "cmk_lakebase/wal-master", master))
        for name in sorted(os.listdir(os.path.join(pgdata, "pg_wal"))):
            seg = name[:24]
            if len(seg) != 24 or any(c not in "0123456789ABCDEF" for c in seg):
                continue
            info = b"cmk_lakebase wal v1 " + seg[8:].encode()
            k = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=info).derive(master)
            keys.append(("wal", "pg_wal/" + seg, k))
    return keys


def main():
    if len(sys.argv) == 6 and sys.argv[4] == "--print":
        for kind, ident, k in learn_keys(*sys.argv[1:4]):
            if kind == "dek" and ident == sys.argv[5]:
                print(k.hex())
                return
        die("no DEK for " + sys.argv[5])
    if len(sys.argv) != 5:
        die("usage: cmk_core_keys.py PGDATA KEY_STORE KEY_ID CORE")
    pgdata, store, key_id, core_path = sys.argv[1:]
    keys = learn_keys(pgdata, store, key_id)
    print("keys %d" % len(keys))

    # round key -> index of the key it belongs to
    needles = {}
    for n, (kind, ident, k) in enumerate(keys):
        halves = [k[i:i + 32] for i in range(0, len(k), 32) if len(k[i:i + 32]) == 32]
        for h in halves:
            for rk in expand256(h):
                needles[rk] = n
                needles[swapped(rk)] = n

    core = open(core_path, "rb").read()
    rounds = {}
    for align in (0, 4, 8, 12):
        view = memoryview(core)[align:]
        chunks = {bytes(view[i:i + 16]) for i in range(0, len(view) - 15, 16)}
        for rk in chunks.intersection(needles):
            rounds.setdefault(needles[rk], set()).add(rk)
        del chunks
    hits = 0
    for n, (kind, ident, k) in enumerate(keys):
        raw = core.find(k) >= 0
        r = len(rounds.get(n, ()))
        if r or raw:
            hits += 1
            print("found %s %s: %d round keys%s" % (kind, ident, r, ", raw key" if raw else ""))
    print("hits %d" % hits)


if __name__ == "__main__":
    main()
