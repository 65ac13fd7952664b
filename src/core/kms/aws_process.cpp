// AWS credential_process: split, checked, run with a deadline, answer parsed
// (aws_process.hpp).
#include "aws_process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include <cerrno>
#include <cstring>
#include <ctime>

#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/base/sys.hpp"
#include "kit.hpp"

extern char** environ;

namespace cmk::aws {

using kit::config_error;
using kit::Secret;
using kit::unavailable;
using kit::wipe;

std::vector<std::string> split_process_command(const std::string& field, const std::string& command) {
    std::vector<std::string> out;
    std::string cur;
    bool have = false;  // an argument is being built (also an empty '' one)
    enum { Plain, Single, Double } q = Plain;
    for (size_t i = 0; i < command.size(); ++i) {
        char c = command[i];
        if (c == '\0') throw config_error(field + ": contains a NUL byte");
        switch (q) {
            case Plain:
                if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
                    if (have) out.push_back(std::move(cur));
                    cur.clear();
                    have = false;
                } else if (c == '\'') {
                    q = Single;
                    have = true;
                } else if (c == '"') {
                    q = Double;
                    have = true;
                } else if (c == '\\') {
                    if (i + 1 == command.size()) throw config_error(field + ": ends with a lone backslash");
                    cur.push_back(command[++i]);
                    have = true;
                } else {
                    cur.push_back(c);
                    have = true;
                }
                break;
            case Single:
                if (c == '\'')
                    q = Plain;
                else
                    cur.push_back(c);
                break;
            case Double:
                if (c == '"') {
                    q = Plain;
                } else if (c == '\\' && i + 1 < command.size() &&
                           (command[i + 1] == '"' || command[i + 1] == '\\')) {
                    cur.push_back(command[++i]);
                } else {
                    cur.push_back(c);
                }
                break;
        }
    }
    if (q != Plain) throw config_error(field + ": has an unclosed " + (q == Single ? "'" : "\"") + " quote");
    if (have) out.push_back(std::move(cur));
    if (out.empty()) throw config_error(field + ": is empty");
    if (out.size() > 256) throw config_error(field + ": has more than 256 arguments");
    return out;
}

void check_process_executable(const std::string& field, const std::vector<std::string>& argv) {
    const std::string& exe = argv.at(0);
    if (exe.empty() || exe[0] != '/')
        throw config_error(field + ": \"" + exe +
                           "\" is not an absolute path (the server does not search PATH for the credential "
                           "helper; give its full path)");
    struct stat sb;
    if (::stat(exe.c_str(), &sb) != 0)
        throw config_error(field + ": cannot use \"" + exe + "\": " + std::strerror(errno));
    if (!S_ISREG(sb.st_mode)) throw config_error(field + ": \"" + exe + "\" is not a regular file");
    if (::access(exe.c_str(), X_OK) != 0)
        throw config_error(field + ": \"" + exe + "\" is not executable by this user");
}

namespace {

long ms_since(const struct timespec& t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
}

struct Fds {
    int fd[4] = {-1, -1, -1, -1};  // out read, out write, err read, err write
    ~Fds() {
        for (int f : fd)
            if (f >= 0) sys::close(f);
    }
    void close(int i) {
        if (fd[i] >= 0) sys::close(fd[i]);
        fd[i] = -1;
    }
};

struct SpawnAttrs {
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    SpawnAttrs() {
        posix_spawn_file_actions_init(&fa);
        posix_spawnattr_init(&at);
    }
    ~SpawnAttrs() {
        posix_spawn_file_actions_destroy(&fa);
        posix_spawnattr_destroy(&at);
    }
};

// Kills the helper's whole process group and reaps the helper.
void kill_and_reap(pid_t pid) {
    ::kill(-pid, SIGKILL);
    int st;
    while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
}

}  // namespace

std::string run_credential_process(const std::vector<std::string>& argv, long timeout_ms, const std::string& what) {
    Fds p;
    if (::pipe2(p.fd, O_CLOEXEC) != 0 || ::pipe2(p.fd + 2, O_CLOEXEC) != 0)
        throw unavailable(what + ": cannot make a pipe: " + std::strerror(errno));
    SpawnAttrs sa;
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    short flags = POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
    int rc = posix_spawnattr_setflags(&sa.at, flags);
    if (rc == 0) rc = posix_spawnattr_setpgroup(&sa.at, 0);
    if (rc == 0) rc = posix_spawnattr_setsigmask(&sa.at, &none);
    if (rc == 0) rc = posix_spawnattr_setsigdefault(&sa.at, &all);
    if (rc == 0) rc = posix_spawn_file_actions_addopen(&sa.fa, 0, "/dev/null", O_RDONLY, 0);
    if (rc == 0) rc = posix_spawn_file_actions_adddup2(&sa.fa, p.fd[1], 1);
    if (rc == 0) rc = posix_spawn_file_actions_adddup2(&sa.fa, p.fd[3], 2);
    if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&sa.fa, 3);
    if (rc != 0) throw unavailable(what + ": cannot prepare the helper: " + std::strerror(rc));
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    pid_t pid = -1;
    rc = posix_spawn(&pid, args[0], &sa.fa, &sa.at, args.data(), environ);
    if (rc != 0) throw unavailable(what + ": cannot run \"" + argv[0] + "\": " + std::strerror(rc));
    p.close(1);
    p.close(3);

    std::string out;
    size_t err_bytes = 0;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    const char* failure = nullptr;
    char buf[4096];
    while (p.fd[0] >= 0 || p.fd[2] >= 0) {
        long left = timeout_ms - ms_since(t0);
        if (left <= 0) {
            failure = "did not finish within timeout_ms";
            break;
        }
        struct pollfd pf[2] = {{p.fd[0], POLLIN, 0}, {p.fd[2], POLLIN, 0}};
        int n = ::poll(pf, 2, static_cast<int>(left > 1000 ? 1000 : left));
        if (n < 0) {
            if (errno == EINTR) continue;
            failure = "could not wait for its output";
            break;
        }
        for (int i = 0; i < 2; ++i) {
            if (pf[i].fd < 0 || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t r = sys::read(pf[i].fd, buf, sizeof buf);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                p.close(i * 2);
                continue;
            }
            if (i == 0) {
                if (out.size() + static_cast<size_t>(r) > kProcessOutputMax) {
                    failure = "wrote more than 64 KiB to its standard output";
                    break;
                }
                out.append(buf, static_cast<size_t>(r));
            } else {
                err_bytes += static_cast<size_t>(r);  // counted, never kept: it may echo secrets
            }
        }
        OPENSSL_cleanse(buf, sizeof buf);
        if (failure) break;
    }
    if (failure) {
        kill_and_reap(pid);
        wipe(out);
        throw unavailable(what + ": the helper \"" + argv[0] + "\" " + failure + "; it was killed");
    }
    // Output closed: the helper is ending. Its exit status, within what is left.
    int st = 0;
    for (;;) {
        pid_t w = ::waitpid(pid, &st, WNOHANG);
        if (w == pid) break;
        if (w < 0 && errno != EINTR) {
            st = -1;
            break;
        }
        if (ms_since(t0) >= timeout_ms) {
            kill_and_reap(pid);
            wipe(out);
            throw unavailable(what + ": the helper \"" + argv[0] +
                              "\" closed its output but did not exit within timeout_ms; it was killed");
        }
        struct timespec d = {0, 10 * 1000 * 1000};
        nanosleep(&d, nullptr);
    }
    ::kill(-pid, SIGKILL);  // anything it left running in its group
    if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        wipe(out);
        std::string how = st == -1               ? "could not be waited for"
                          : WIFSIGNALED(st)      ? "was killed by signal " + std::to_string(WTERMSIG(st))
                          : WIFEXITED(st)        ? "exited with status " + std::to_string(WEXITSTATUS(st))
                                                 : "ended abnormally";
        throw unavailable(what + ": the helper \"" + argv[0] + "\" " + how +
                          (err_bytes ? " (its standard error, " + std::to_string(err_bytes) +
                                           " bytes, is not logged: run the command by hand as this user)"
                                     : ""));
    }
    return out;
}

Credentials parse_process_output(std::string& text, const std::string& what) {
    kit::WipeOnExit scrub{text};
    rapidjson::Document d;
    std::string why;
    if (!parse_json_bounded_insitu(d, text, &why) || !d.IsObject())
        throw unavailable(what + ": the helper's output is not a JSON object" + (why.empty() ? "" : " (" + why + ")"));
    const rapidjson::Value* v = kit::member(d, "Version");
    if (!v || !v->IsInt() || v->GetInt() != 1)
        throw unavailable(what + ": the helper's output has no \"Version\": 1 (the only version AWS defines)");
    auto str = [&](const char* k, bool* present) -> std::string {
        const rapidjson::Value* m = kit::member(d, k);
        *present = m != nullptr;
        return m && m->IsString() ? std::string(m->GetString(), m->GetStringLength()) : "";
    };
    bool p_ak, p_sk, p_tok, p_exp;  // SessionToken absent, "" or null: long-term keys
    Credentials c;
    c.access_key_id = str("AccessKeyId", &p_ak);
    std::string sk = str("SecretAccessKey", &p_sk), tok = str("SessionToken", &p_tok);
    c.secret_access_key = Secret(sk);
    c.session_token = Secret(tok);
    wipe(sk);
    wipe(tok);
    std::string exp = str("Expiration", &p_exp);
    if (c.access_key_id.empty() || c.secret_access_key.empty())
        throw unavailable(what + ": the helper's output has no AccessKeyId and SecretAccessKey strings");
    if (c.access_key_id.size() > 128 ||
        c.access_key_id.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") != std::string::npos)
        throw unavailable(what + ": the helper's AccessKeyId is not an access key id");
    if (p_exp && !exp.empty() && !kit::parse_utc_time(exp, &c.expiration))
        throw unavailable(what + ": the helper's Expiration \"" + exp.substr(0, 40) + "\" is not an ISO 8601 time");
    return c;
}

}  // namespace cmk::aws
