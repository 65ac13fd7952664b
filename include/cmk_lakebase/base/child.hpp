// Work done in a child process under a deadline, for a process that must keep one
// thread. glibc marks a process that ever started a thread as multi-threaded for good,
// and every process it forks after: each cancellable system call (pread, send, recv,
// ...) then takes glibc's slower cancellation path. The postmaster forks every server
// process, so work that may hang (a key file on a hung mount, a host name whose DNS
// server does not answer) runs there in a child, not on a thread (bench/README.md,
// 7 December: 0.86 against 0.38 us per select-only transaction in libc's system-call
// wrappers on PG 18).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <functional>
#include <string>

namespace cmk::sys {

struct ChildRun {
    enum class Outcome {
        Done,        // the child sent its answer, closed the pipe and exited 0
        TimedOut,    // no end of the answer within the deadline: the child was killed
        Failed,      // it exited non-zero, died, or sent more than max_bytes
        NotStarted,  // no pipe or no process (error holds errno)
    };
    Outcome outcome = Outcome::Failed;
    int error = 0;
};

// Runs work(fd) in a "clone child" of this process: a copy (clone without CLONE_VM)
// with no exit signal, reaped with __WALL, so its end sends no SIGCHLD and waitpid(-1)
// never sees it: neither the postmaster's reaper nor a tool that watches its own
// children (pg_basebackup takes any SIGCHLD for the end of its WAL streamer) meets a
// process it did not start. The child runs with every signal blocked (the handlers are
// the caller's), is not dumpable, writes its answer to fd and ends with work's return
// value as its exit status (1 if work throws). The caller reads the answer into `out`
// (reserved once for max_bytes, so a caller that scrubs `out` scrubs every copy) until
// the child closes the pipe or timeout_ms passes; a child cut short is killed and, if
// it is not gone at once (a wait that is not killable), reaped later by
// children_left_behind(). Only for a process with one thread: a copy of a
// multi-threaded process may only call async-signal-safe functions.
ChildRun run_in_child(const std::function<int(int fd)>& work, long timeout_ms, size_t max_bytes, std::string& out);

// Children killed past their deadline that have not ended yet; reaps those that have.
// Callers bound it (a key store hung for days under a watchdog retrying every few
// seconds must not pile up processes: RLIMIT_NPROC counts them against the cluster's
// OS user, and the postmaster forks under the same limit).
int children_left_behind();

}  // namespace cmk::sys
