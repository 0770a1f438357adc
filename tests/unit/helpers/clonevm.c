#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static char stack[65536];
static int child(void *arg) { (void)arg; for (;;) pause(); return 0; }
int main(void) {
    pid_t pid = clone(child, stack + sizeof stack, CLONE_VM | SIGCHLD, NULL);
    if (pid < 0) { perror("clone"); return 1; }
    printf("%d\n", pid); fflush(stdout);
    for (;;) pause();
}
