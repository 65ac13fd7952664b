// Work in a child process under a deadline (sys::run_in_child), and the host name
// resolution built on it that keeps a process with one thread from getting a second
// one from libcurl's threaded resolver (http::resolve_entries, http::perform).
#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/single_threaded.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cmk_lakebase/base/child.hpp"
#include "cmk_lakebase/base/sys.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "core/kms/http.hpp"
#include "test_helpers.hpp"

namespace {

using Outcome = cmk::sys::ChildRun::Outcome;
using Clock = std::chrono::steady_clock;

long ms_since(Clock::time_point t0) {
    return static_cast<long>(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count());
}

// run_in_child is for a process with one thread (a copy of a multi-threaded process
// may only call async-signal-safe functions): these tests run only while the test
// binary has one.
int threads_now() {
    int n = 0;
    if (DIR* d = ::opendir("/proc/self/task")) {
        while (struct dirent* e = ::readdir(d))
            if (e->d_name[0] != '.') ++n;
        ::closedir(d);
    }
    return n;
}

#define REQUIRE_ONE_THREAD()                                                                 \
    do {                                                                                     \
        if (threads_now() != 1) GTEST_SKIP() << threads_now() << " threads in this process"; \
    } while (0)

volatile sig_atomic_t g_sigchld = 0;
void on_sigchld(int) { g_sigchld = g_sigchld + 1; }

int put(int fd, const std::string& s) { return cmk::sys::write_full(fd, s.data(), s.size()) == 0 ? 0 : 1; }

// Waits (up to 2 s) until every child killed past its deadline has been reaped.
int left_behind_after_a_while() {
    for (int i = 0; i < 100 && cmk::sys::children_left_behind() > 0; ++i) usleep(20000);
    return cmk::sys::children_left_behind();
}

void unset_proxies(cmk_test::EnvGuard& env) {
    for (const char* v : {"http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"})
        env.unset(v);
}

cmk::KmsError error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const cmk::KmsError& e) {
        return e;
    }
    return cmk::KmsError(cmk::KmsErrorKind::Config, "(no error)");
}

}  // namespace

TEST(RunInChild, AnswersFromAnotherProcessWithSignalsBlockedAndNoSigchld) {
    REQUIRE_ONE_THREAD();
    struct sigaction sa, old;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigchld;
    sigemptyset(&sa.sa_mask);
    ASSERT_EQ(sigaction(SIGCHLD, &sa, &old), 0);
    g_sigchld = 0;
    sigset_t before, after;
    sigemptyset(&before);
    sigemptyset(&after);
    sigprocmask(SIG_SETMASK, nullptr, &before);
    const pid_t self = getpid();
    std::string out;
    auto run = cmk::sys::run_in_child(
        [self](int fd) {
            sigset_t m;
            sigprocmask(SIG_SETMASK, nullptr, &m);
            std::string s = std::to_string(getpid()) + (getpid() != self ? " other" : " same");
            s += sigismember(&m, SIGTERM) && sigismember(&m, SIGINT) && sigismember(&m, SIGCHLD) ? " blocked" : " open";
            s += prctl(PR_GET_DUMPABLE) == 0 ? " undumpable" : " dumpable";
            return put(fd, s);
        },
        5000, 4096, out);
    usleep(100000);  // a SIGCHLD, had there been one, has arrived
    sigaction(SIGCHLD, &old, nullptr);
    EXPECT_EQ(run.outcome, Outcome::Done);
    const pid_t child = static_cast<pid_t>(std::atoi(out.c_str()));
    EXPECT_GT(child, 0) << out;
    EXPECT_EQ(out.substr(out.find(' ')), " other blocked undumpable");
    EXPECT_EQ(g_sigchld, 0) << "the child's end sent SIGCHLD";
    errno = 0;
    EXPECT_TRUE(::kill(child, 0) == -1 && errno == ESRCH) << "the child was not reaped";
    sigprocmask(SIG_SETMASK, nullptr, &after);
    for (int sig = 1; sig < NSIG; ++sig)
        EXPECT_EQ(sigismember(&before, sig), sigismember(&after, sig)) << "the caller's mask changed for " << sig;
    EXPECT_EQ(cmk::sys::children_left_behind(), 0);
}

TEST(RunInChild, KillsAChildPastItsDeadline) {
    REQUIRE_ONE_THREAD();
    std::string out;
    auto t0 = Clock::now();
    auto run = cmk::sys::run_in_child(
        [](int fd) {
            put(fd, "started");
            ::sleep(30);
            return 0;
        },
        300, 4096, out);
    long took = ms_since(t0);
    EXPECT_EQ(run.outcome, Outcome::TimedOut);
    EXPECT_GE(took, 290);
    EXPECT_LT(took, 3000);
    EXPECT_EQ(left_behind_after_a_while(), 0) << "the killed child was never reaped";
}

TEST(RunInChild, FailsOnAnExitStatusAThrowOrAnAnswerPastItsBound) {
    REQUIRE_ONE_THREAD();
    std::string out;
    EXPECT_EQ(cmk::sys::run_in_child([](int fd) { return put(fd, "half") + 3; }, 5000, 4096, out).outcome,
              Outcome::Failed);
    EXPECT_EQ(cmk::sys::run_in_child([](int) -> int { throw std::runtime_error("x"); }, 5000, 4096, out).outcome,
              Outcome::Failed);
    auto t0 = Clock::now();
    auto run = cmk::sys::run_in_child(
        [](int fd) {
            std::string big(1 << 16, 'x');
            put(fd, big);
            ::sleep(30);
            return 0;
        },
        10000, 100, out);
    EXPECT_EQ(run.outcome, Outcome::Failed);
    EXPECT_LE(out.size(), 100u);
    EXPECT_LT(ms_since(t0), 3000) << "a flood is cut at once, not at the deadline";
    EXPECT_EQ(cmk::sys::run_in_child([](int fd) { return put(fd, "whole"); }, 5000, 5, out).outcome, Outcome::Done);
    EXPECT_EQ(out, "whole");
    EXPECT_EQ(left_behind_after_a_while(), 0);
}

// ------------------------------------------------------------------ resolve_entries

TEST(ResolveEntry, NumericHosts) {
    for (const char* h : {"127.0.0.1", "10.1.2.3", "::1", "[::1]", "[2001:db8::1]", "2001:db8::1"})
        EXPECT_TRUE(cmk::kit::numeric_host(h)) << h;
    for (const char* h : {"localhost", "kms.example.com", "127.1", "[127.0.0.1]", "[::1", "", "1.2.3.4:80"})
        EXPECT_FALSE(cmk::kit::numeric_host(h)) << h;
}

TEST(ResolveEntry, NothingToResolveForAnAddressLiteral) {
    cmk_test::EnvGuard env;
    unset_proxies(env);
    EXPECT_TRUE(cmk::http::resolve_entries("https://127.0.0.1:8200/v1/transit", 1000).empty());
    EXPECT_TRUE(cmk::http::resolve_entries("http://[::1]:8080/", 1000).empty());
    EXPECT_TRUE(cmk::http::resolve_entries("not a url", 1000).empty());
}

// Behind a proxy libcurl looks up the proxy's name, not the endpoint's (the proxy
// resolves that): only the proxy gets an entry, and the endpoint's name is never asked
// for here (a firewalled DNS that does not answer would eat the request's time).
TEST(ResolveEntry, BehindAProxyOnlyTheProxysName) {
    REQUIRE_ONE_THREAD();
    cmk_test::EnvGuard env;
    unset_proxies(env);
    auto addr_of = [](const std::string& host, const std::string& port) -> std::vector<std::string> {
        if (host == "proxy.corp") return {"10.9.9." + std::to_string(std::stoi(port) % 256)};
        ::sleep(30);  // the endpoint's name: must not be asked for
        return {"10.0.0.1"};
    };
    env.set("https_proxy", "http://proxy.corp");
    auto t0 = Clock::now();
    EXPECT_EQ(cmk::http::resolve_entries("https://kms.example.com/", 2000, addr_of),
              (std::vector<std::string>{"proxy.corp:1080:10.9.9.56"}));
    EXPECT_LT(ms_since(t0), 1500) << "the endpoint's name was looked up";
    env.set("https_proxy", "https://proxy.corp");
    EXPECT_EQ(cmk::http::resolve_entries("https://kms.example.com/", 2000, addr_of),
              (std::vector<std::string>{"proxy.corp:443:10.9.9.187"}));
    env.set("https_proxy", "proxy.corp:3128");
    EXPECT_EQ(cmk::http::resolve_entries("https://kms.example.com/", 2000, addr_of),
              (std::vector<std::string>{"proxy.corp:3128:10.9.9.56"}));
    // A proxy given by address needs no entry; one for another scheme is not used.
    env.set("https_proxy", "http://127.0.0.1:3128");
    env.set("http_proxy", "http://proxy.corp:8080");
    EXPECT_EQ(cmk::http::resolve_entries("https://kms.example.com/", 2000, addr_of), std::vector<std::string>{});
    EXPECT_EQ(cmk::http::resolve_entries("http://kms.example.com/", 2000, addr_of),
              (std::vector<std::string>{"proxy.corp:8080:10.9.9.144"}));
    env.unset("https_proxy");
    env.unset("http_proxy");
    env.set("HTTP_PROXY", "http://proxy.corp:8080");  // libcurl ignores it (httpoxy)
    env.set("ALL_PROXY", "socks5://proxy.corp:1081");
    EXPECT_EQ(cmk::http::resolve_entries("http://kms.example.com/", 2000, addr_of),
              (std::vector<std::string>{"proxy.corp:1081:10.9.9.57"}));
    // As in libcurl the first proxy variable set wins: the others' names are never looked
    // up (one that does not answer would eat the request's time).
    env.set("https_proxy", "http://proxy.corp:3129");
    env.set("all_proxy", "http://other.corp:3128");
    env.set("ALL_PROXY", "http://other.corp:3130");
    t0 = Clock::now();
    EXPECT_EQ(cmk::http::resolve_entries("https://kms.example.com/", 2000, addr_of),
              (std::vector<std::string>{"proxy.corp:3129:10.9.9.57"}));
    EXPECT_LT(ms_since(t0), 1500) << "a proxy libcurl does not use was looked up";
    env.unset("https_proxy");
    env.set("HTTPS_PROXY", "http://[::1");  // set but unparsable: libcurl reports it
    t0 = Clock::now();
    EXPECT_EQ(cmk::http::resolve_entries("https://kms.example.com/", 2000, addr_of), std::vector<std::string>{});
    EXPECT_LT(ms_since(t0), 1500) << "a name was looked up behind an unparsable proxy";
    env.unset("HTTPS_PROXY");
    env.unset("all_proxy");
    // A proxy's name that does not resolve: no entry, no error (libcurl reports it).
    env.set("ALL_PROXY", "http://no-such-proxy.invalid:3128");
    EXPECT_EQ(cmk::http::resolve_entries("http://kms.example.com/", 2000,
                                         [](const std::string&, const std::string&) -> std::vector<std::string> {
                                             throw std::runtime_error("Name or service not known");
                                         }),
              std::vector<std::string>{});
    EXPECT_EQ(left_behind_after_a_while(), 0);
}

TEST(ResolveEntry, ANameBecomesAnEntryForItsPort) {
    REQUIRE_ONE_THREAD();
    cmk_test::EnvGuard env;
    unset_proxies(env);
    auto one = [](const std::string& url, const cmk::http::Resolver& r = nullptr) {
        std::vector<std::string> v = cmk::http::resolve_entries(url, 2000, r);
        EXPECT_EQ(v.size(), 1u) << url;
        return v.empty() ? std::string() : v[0];
    };
    std::string e = one("https://localhost:8200/v1/x");
    EXPECT_EQ(e.rfind("localhost:8200:", 0), 0u) << e;
    EXPECT_NE(e.find("127.0.0.1"), std::string::npos) << e;
    EXPECT_EQ(one("https://localhost/").rfind("localhost:443:", 0), 0u);
    EXPECT_EQ(one("http://localhost/x?y").rfind("localhost:80:", 0), 0u);
    // The resolver runs in the child, and sees the host and port libcurl will use.
    auto fixed = [](const std::string& host, const std::string& port) {
        if (host != "kms.example.com" || port != "443") throw std::runtime_error("asked for " + host + ":" + port);
        return std::vector<std::string>{"10.1.2.3", "[2001:db8::1]"};
    };
    EXPECT_EQ(one("https://kms.example.com/keys", fixed), "kms.example.com:443:10.1.2.3,[2001:db8::1]");
    // At most 16 addresses reach libcurl.
    auto many = [](const std::string&, const std::string&) {
        std::vector<std::string> v;
        for (int i = 1; i <= 20; ++i) v.push_back("10.0.0." + std::to_string(i));
        return v;
    };
    std::string m = one("https://kms.example.com:9443/", many);
    EXPECT_EQ(m.rfind("kms.example.com:9443:10.0.0.1,", 0), 0u) << m;
    EXPECT_NE(m.find(",10.0.0.16"), std::string::npos) << m;
    EXPECT_EQ(m.find("10.0.0.17"), std::string::npos) << m;
}

TEST(ResolveEntry, FailuresAreUnavailableAndNameTheHost) {
    REQUIRE_ONE_THREAD();
    cmk_test::EnvGuard env;
    unset_proxies(env);
    const std::string url = "https://kms.example.com/";
    auto e = error_of([&] {
        cmk::http::resolve_entries(url, 2000, [](const std::string&, const std::string&) -> std::vector<std::string> {
            throw std::runtime_error("Name or service not known");
        });
    });
    EXPECT_EQ(e.kind, cmk::KmsErrorKind::Unavailable);
    EXPECT_STREQ(e.what(), "could not resolve host kms.example.com: Name or service not known");
    // A resolver that never answers is killed at the deadline.
    auto t0 = Clock::now();
    e = error_of([&] {
        cmk::http::resolve_entries(url, 300, [](const std::string&, const std::string&) {
            ::sleep(30);
            return std::vector<std::string>{"10.0.0.1"};
        });
    });
    EXPECT_LT(ms_since(t0), 3000);
    EXPECT_EQ(e.kind, cmk::KmsErrorKind::Unavailable);
    EXPECT_STREQ(e.what(), "could not resolve host kms.example.com: no answer within 300 ms");
    // Only numeric addresses become an entry: nothing else is passed on to libcurl.
    for (const char* bad : {"10.0.0.1:80", "example.org", "[10.0.0.1]", "2001:db8::1", ""}) {
        e = error_of([&] {
            cmk::http::resolve_entries(url, 2000, [bad](const std::string&, const std::string&) {
                return std::vector<std::string>{"10.0.0.2", bad};
            });
        });
        EXPECT_EQ(e.kind, cmk::KmsErrorKind::Unavailable) << bad;
        EXPECT_NE(std::string(e.what()).find("answered"), std::string::npos) << bad << ": " << e.what();
    }
    e = error_of([&] {
        cmk::http::resolve_entries(url, 2000,
                                 [](const std::string&, const std::string&) { return std::vector<std::string>{}; });
    });
    EXPECT_STREQ(e.what(), "could not resolve host kms.example.com: no address");
    EXPECT_EQ(left_behind_after_a_while(), 0);
}

// ------------------------------------------------------------------ perform, one thread

namespace {

// A name of this machine that resolves to 127.0.0.1 and that libcurl does not treat
// as loopback itself ("localhost" it answers without a resolver), or "".
std::string loopback_name() {
    char h[256] = {0};
    if (::gethostname(h, sizeof h - 1) != 0 || !*h || std::strcmp(h, "localhost") == 0) return "";
    struct addrinfo hints;
    std::memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    struct addrinfo* res = nullptr;
    if (::getaddrinfo(h, nullptr, &hints, &res) != 0) return "";
    bool loop = true;
    for (struct addrinfo* a = res; a; a = a->ai_next)
        if (reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr.s_addr != htonl(INADDR_LOOPBACK)) loop = false;
    ::freeaddrinfo(res);
    return loop ? h : "";
}

// A one-request HTTP server on 127.0.0.1 in a child process: answers "ok" to a request
// whose first line starts with `want`, "no" to any other. Its pid (-1 on failure).
pid_t serve_one_request(const std::string& want, uint16_t* port) {
    int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct sockaddr_in a;
    std::memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(s, 1) != 0 ||
        ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &alen) != 0) {
        ::close(s);
        return -1;
    }
    *port = ntohs(a.sin_port);
    const pid_t server = ::fork();
    if (server == 0) {
        ::alarm(20);
        int c = ::accept(s, nullptr, nullptr);
        std::string req;
        char buf[1024];
        ssize_t n;
        while (req.find("\r\n\r\n") == std::string::npos && (n = ::read(c, buf, sizeof buf)) > 0) req.append(buf, n);
        const std::string ok = req.rfind(want, 0) == 0 ? "ok" : "no";
        put(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n" + ok);
        ::_exit(0);
    }
    ::close(s);
    return server;
}

}  // namespace

// The whole point: a request to a host name leaves a process that had one thread with
// one thread (glibc's __libc_single_threaded still set). Without resolve_entries,
// Debian's libcurl resolves the name on a thread and glibc marks the process
// multi-threaded for good. Runs in a fresh copy of this binary, which has never
// started a thread.
TEST(HttpPerform, AHostNameLeavesAProcessWithOneThreadWithOne) {
    if (!std::getenv("CMK_UNIT_FRESH_PROCESS")) {
        cmk_test::TempDir d;
        const std::string log = d.sub("fresh.log");
        const std::string cmd = "CMK_UNIT_FRESH_PROCESS=1 /proc/" + std::to_string(getpid()) +
                                "/exe --gtest_filter=HttpPerform.AHostNameLeavesAProcessWithOneThreadWithOne > " +
                                log + " 2>&1";
        int rc = std::system(cmd.c_str());
        std::string out = cmk_test::slurp(log);
        ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << out;
        if (out.find("[  SKIPPED ]") != std::string::npos) GTEST_SKIP() << out;
        EXPECT_NE(out.find("[  PASSED  ] 1 test"), std::string::npos) << out;
        return;
    }
    ASSERT_TRUE(__libc_single_threaded) << "the fresh process already started a thread";
    cmk_test::EnvGuard env;
    unset_proxies(env);
    const std::string name = loopback_name();
    if (name.empty()) GTEST_SKIP() << "this machine's host name does not resolve to 127.0.0.1 only";
    auto probe = [](const std::string& url) {
        cmk::http::Request r;
        r.method = "GET";
        r.url = url;
        r.timeout_ms = 10000;
        return cmk::http::perform(r);
    };
    // Straight to the server by its name.
    uint16_t port = 0;
    pid_t server = serve_one_request("GET /probe ", &port);
    ASSERT_GT(server, 0);
    cmk::http::Response resp = probe("http://" + name + ":" + std::to_string(port) + "/probe");
    ::waitpid(server, nullptr, 0);
    EXPECT_EQ(resp.status, 200);
    EXPECT_EQ(resp.body, "ok");
    EXPECT_TRUE(__libc_single_threaded) << "the request to " << name << " started a thread";
    // Through an HTTP proxy named by the same name (http_proxy), to a KMS whose name only
    // the proxy could resolve.
    server = serve_one_request("GET http://kms.example.invalid/probe ", &port);
    ASSERT_GT(server, 0);
    env.set("http_proxy", "http://" + name + ":" + std::to_string(port));
    resp = probe("http://kms.example.invalid/probe");
    ::waitpid(server, nullptr, 0);
    EXPECT_EQ(resp.status, 200);
    EXPECT_EQ(resp.body, "ok");
    EXPECT_TRUE(__libc_single_threaded) << "the request through the proxy " << name << " started a thread";
}
