/* clone(CLONE_VM) a child (not a thread), then ask the broker at argv[1] for
   protection and print its reply line. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
static char stack[65536];
static int child(void *arg) { (void)arg; for (;;) pause(); return 0; }
int main(int argc, char **argv) {
    if (argc != 2) return 2;
    pid_t pid = clone(child, stack + sizeof stack, CLONE_VM | SIGCHLD, NULL);
    if (pid < 0) { perror("clone"); return 1; }
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); kill(pid, SIGKILL); return 1; }
    const char req[] = "{\"op\": \"protect\"}\n";
    if (write(s, req, sizeof req - 1) < 0) { perror("write"); }
    char buf[4096];
    ssize_t n = read(s, buf, sizeof buf - 1);
    kill(pid, SIGKILL);
    if (n <= 0) return 1;
    fwrite(buf, 1, (size_t)n, stdout);
    return 0;
}
