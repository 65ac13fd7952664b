"""A FUSE file system that can hang, for TAP 053: a local key store on a hung NFS mount.

It mirrors a backing directory at a mount point (getattr, readdir, open, read, write,
create, rename, unlink, mkdir, chmod, fsync; not fsyncdir) and, while the control file exists,
holds every operation on it without an answer until the file is removed: a stat, an
open or a read of a key file then blocks in the kernel, as on a hard NFS mount whose
server went away. Like NFS (TASK_KILLABLE since Linux 2.6.25), a held operation of a
process that is being killed (SIGKILL pending, or it is gone) is answered EINTR, so a
process that exits is not left in D state; nothing else ends the hold.

Started as root by test/run_all.sh (only root can open /dev/fuse here) with
allow_other: the TAP test, running as postgres, creates and removes the control file
(in a directory outside the mount) to hang and release the store. Files created
through the mount are given to the caller's uid and gid, and the kernel checks the
mirrored modes (default_permissions), so the store behaves like a local directory of
the postgres user. Attribute and entry caches are off, so every stat reaches here.

It stops by itself: after --lifetime seconds, when its parent process goes away, on
SIGTERM/SIGINT (libfuse's handlers), or when it is unmounted; on the first two it
releases every held operation (EIO), unmounts lazily and exits, so no dead mount stays.
Run with /usr/bin/python3 (Debian's python3-fuse, libfuse2; fusermount3 from fuse3).

  hang_fs.py --backing DIR --mountpoint MNT --control FILE [--lifetime S] [--log FILE]
"""

import argparse
import errno
import os
import subprocess
import sys
import threading
import time

import fuse
from fuse import Fuse

fuse.fuse_python_api = (0, 2)

SIGKILL_BIT = 1 << (9 - 1)

server = None  # the HangFs instance, for the file class


def log(msg):
    if server is not None and server.logf is not None:
        server.logf.write("%.3f %s\n" % (time.time(), msg))
        server.logf.flush()


def being_killed(tid):
    """True if thread tid has a fatal signal pending or no longer exists."""
    try:
        with open("/proc/%d/status" % tid) as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & SIGKILL_BIT:
                    return True
    except (OSError, ValueError):
        return True
    return False


def gate(what, path):
    """Holds the calling FUSE request while the control file exists."""
    if not os.path.exists(server.control):
        return
    tid = server.GetContext().get("pid", 0)
    log("held %s %s (pid %d)" % (what, path, tid))
    while os.path.exists(server.control):
        if server.stopping:
            log("stopping: %s %s answered EIO" % (what, path))
            raise OSError(errno.EIO, "hang_fs stopping")
        if tid and being_killed(tid):
            log("caller %d killed: %s %s answered EINTR" % (tid, what, path))
            raise OSError(errno.EINTR, "caller killed")
        time.sleep(0.05)
    log("released %s %s" % (what, path))


def real(path):
    return server.backing + path


def give_to_caller(p):
    ctx = server.GetContext()
    os.lchown(p, ctx.get("uid", -1), ctx.get("gid", -1))


class HangFile(object):
    """An open file of the mount: one descriptor of the backing file."""

    def __init__(self, path, flags, *mode):
        gate("open", path)
        self.path = path
        existed = os.path.lexists(real(path))
        self.fd = os.open(real(path), flags, *mode)
        if flags & os.O_CREAT and not existed:
            give_to_caller(real(path))

    def read(self, length, offset):
        gate("read", self.path)
        return os.pread(self.fd, length, offset)

    def write(self, buf, offset):
        gate("write", self.path)
        return os.pwrite(self.fd, buf, offset)

    def fgetattr(self):
        gate("fgetattr", self.path)
        return os.fstat(self.fd)

    def ftruncate(self, length):
        gate("ftruncate", self.path)
        os.ftruncate(self.fd, length)

    def fsync(self, datasync):
        gate("fsync", self.path)
        os.fsync(self.fd)

    def flush(self):
        gate("flush", self.path)

    def release(self, flags):
        os.close(self.fd)  # never held: the kernel sends it after close() returned


class HangFs(Fuse):
    def getattr(self, path):
        gate("getattr", path)
        return os.lstat(real(path))

    def readdir(self, path, offset):
        gate("readdir", path)
        for e in [".", ".."] + os.listdir(real(path)):
            yield fuse.Direntry(e)

    def opendir(self, path):
        gate("opendir", path)
        os.listdir(real(path))  # ENOENT / EACCES as the directory would

    # No fsyncdir: python-fuse 1.0.5 crashes in it; without it the kernel answers a
    # directory fsync with success (ENOSYS is remembered as "not needed").

    def readlink(self, path):
        gate("readlink", path)
        return os.readlink(real(path))

    def unlink(self, path):
        gate("unlink", path)
        os.unlink(real(path))

    def rmdir(self, path):
        gate("rmdir", path)
        os.rmdir(real(path))

    def mkdir(self, path, mode):
        gate("mkdir", path)
        os.mkdir(real(path), mode)
        give_to_caller(real(path))

    def symlink(self, target, path):
        gate("symlink", path)
        os.symlink(target, real(path))
        give_to_caller(real(path))

    def rename(self, old, new):
        gate("rename", old)
        os.rename(real(old), real(new))

    def chmod(self, path, mode):
        gate("chmod", path)
        os.chmod(real(path), mode)

    def chown(self, path, uid, gid):
        gate("chown", path)
        os.lchown(real(path), uid, gid)

    def truncate(self, path, length):
        gate("truncate", path)
        os.truncate(real(path), length)

    def utimens(self, path, ts_acc, ts_mod):
        gate("utimens", path)
        os.utime(real(path), ns=(ts_acc.tv_sec * 10**9 + ts_acc.tv_nsec,
                                 ts_mod.tv_sec * 10**9 + ts_mod.tv_nsec))

    def access(self, path, mode):
        gate("access", path)
        if not os.path.lexists(real(path)):
            return -errno.ENOENT

    def statfs(self):
        gate("statfs", "/")
        return os.statvfs(server.backing)


def stop(why):
    """Releases held operations, detaches the mount and exits (the lifetime, the parent)."""
    log("stopping: " + why)
    server.stopping = True
    time.sleep(0.3)
    for cmd in (["fusermount3", "-u", "-z", server.mountpoint], ["umount", "-l", server.mountpoint]):
        try:
            if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                break
        except OSError:
            pass
    time.sleep(1)
    os._exit(0)


def watch(lifetime, parent):
    end = time.time() + lifetime
    while True:
        if time.time() >= end:
            stop("lifetime of %.0f s reached" % lifetime)
        if parent > 1 and os.getppid() != parent:
            stop("parent process gone")
        time.sleep(0.5)


def main():
    global server
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backing", required=True, help="directory mirrored by the mount")
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--control", required=True, help="while this file exists, every operation is held")
    p.add_argument("--lifetime", type=float, default=3600.0, help="hard limit in seconds")
    p.add_argument("--log", help="append one line per held operation here")
    a = p.parse_args()

    server = HangFs(version="%prog " + fuse.__version__, usage="", dash_s_do="setsingle")
    server.backing = os.path.abspath(a.backing)
    server.mountpoint = os.path.abspath(a.mountpoint)
    server.control = os.path.abspath(a.control)
    server.stopping = False
    server.logf = open(a.log, "a") if a.log else None
    server.multithreaded = True  # a held request must not hold the others
    server.file_class = HangFile
    server.fuse_args.mountpoint = server.mountpoint
    server.fuse_args.setmod("foreground")
    for opt in ("allow_other", "default_permissions", "attr_timeout=0", "entry_timeout=0",
                "negative_timeout=0", "fsname=cmk_hang_fs", "subtype=cmk_hang_fs"):
        server.fuse_args.add(opt)
    threading.Thread(target=watch, args=(a.lifetime, os.getppid()), daemon=True).start()
    log("mounting %s on %s, control %s" % (server.backing, server.mountpoint, server.control))
    server.main()
    log("unmounted")


if __name__ == "__main__":
    sys.exit(main())
