// run_in_child (child.hpp): a clone child, a pipe read with a deadline, and the
// children killed past it until they are reaped.
#include "cmk_lakebase/base/child.hpp"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <exception>
#include <mutex>
#include <vector>

#include "cmk_lakebase/base/sys.hpp"

namespace cmk::sys {
namespace {

std::mutex g_left_mu;
std::vector<pid_t> g_left;  // killed, not yet reaped

void leave_behind(pid_t pid) {
    std::lock_guard<std::mutex> g(g_left_mu);
    g_left.push_back(pid);
}

}  // namespace

int children_left_behind() {
    std::lock_guard<std::mutex> g(g_left_mu);
    g_left.erase(std::remove_if(g_left.begin(), g_left.end(),
                                [](pid_t pid) {
                                    int st;
                                    pid_t w = ::waitpid(pid, &st, WNOHANG | __WALL);
                                    return w == pid || (w < 0 && errno == ECHILD);
                                }),
                 g_left.end());
    return static_cast<int>(g_left.size());
}

ChildRun run_in_child(const std::function<int(int fd)>& work, long timeout_ms, size_t max_bytes, std::string& out) {
    ChildRun res;
    out.clear();
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) {
        res.outcome = ChildRun::Outcome::NotStarted;
        res.error = errno;
        return res;
    }
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &old);
    // fork() without an exit signal: the copy of this (single-threaded) process runs on.
    const pid_t pid = static_cast<pid_t>(::syscall(SYS_clone, 0UL, nullptr, nullptr, nullptr, nullptr));
    if (pid == 0) {
        ::close(p[0]);
        ::prctl(PR_SET_DUMPABLE, 0);
        int rc = 1;
        try {
            rc = work(p[1]);
        } catch (...) {
            rc = 1;
        }
        ::_exit(rc);
    }
    const int clone_errno = errno;
    sigprocmask(SIG_SETMASK, &old, nullptr);
    ::close(p[1]);
    if (pid < 0) {
        ::close(p[0]);
        res.outcome = ChildRun::Outcome::NotStarted;
        res.error = clone_errno;
        return res;
    }
    out.reserve(max_bytes);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    char buf[4096];
    bool timed_out = false, failed = false;
    for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            timed_out = true;
            break;
        }
        struct pollfd pf = {p[0], POLLIN, 0};
        int r = ::poll(&pf, 1, static_cast<int>(std::min<long long>(left.count(), 1 << 30)));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            failed = true;
            break;
        }
        if (r == 0) continue;  // the deadline is checked above
        ssize_t n = ::read(p[0], buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            failed = n < 0;
            break;
        }
        if (out.size() + static_cast<size_t>(n) > max_bytes) {
            failed = true;
            break;
        }
        out.append(buf, static_cast<size_t>(n));
    }
    OPENSSL_cleanse(buf, sizeof buf);
    ::close(p[0]);
    // A child cut short is killed and never waited for: its wait may not be killable.
    // One that closed the pipe is ending and is waited for.
    const bool cut = timed_out || failed;
    if (cut) ::kill(pid, SIGKILL);
    int status = 0;
    pid_t w;
    while ((w = ::waitpid(pid, &status, (cut ? WNOHANG : 0) | __WALL)) < 0 && errno == EINTR) {
    }
    if (w != pid && !(w < 0 && errno == ECHILD)) leave_behind(pid);  // not gone yet
    if (timed_out) {
        res.outcome = ChildRun::Outcome::TimedOut;
        return res;
    }
    // Its exit status says whether it sent everything (reaped by someone else: the
    // answer alone, which the caller's parse must judge).
    const bool sent_all = w != pid || (WIFEXITED(status) && WEXITSTATUS(status) == 0);
    res.outcome = failed || !sent_all ? ChildRun::Outcome::Failed : ChildRun::Outcome::Done;
    return res;
}

}  // namespace cmk::sys
