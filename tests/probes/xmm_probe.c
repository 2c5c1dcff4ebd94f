/*
 * Register-integrity probe: do the 16 xmm registers of a user process survive system calls,
 * preemption and fork? Each round loads distinct 128-bit patterns into xmm0-xmm15, spins with
 * general registers only (so the timer can preempt it and other tasks, and the kernel's own
 * SIMD users, run), makes one system call (sched_yield, getpid, or fork) from the same asm
 * block, and stores the registers back; any register that differs from what was loaded is
 * printed with both values. Parent and child of a fork both check.
 *
 * Built static (gcc -O2 -static), so the guest runs it without the host's libraries.
 * Usage: xmm_probe SECONDS [LABEL]; exit status 0 when no register ever changed, 1 otherwise.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct { uint64_t lo, hi; } xmm_t;

static long round_trip(const xmm_t *in, xmm_t *out, long nr, long spin)
{
    long ret;
    __asm__ volatile(
        "movdqu   0(%[in]), %%xmm0\n\t"  "movdqu  16(%[in]), %%xmm1\n\t"
        "movdqu  32(%[in]), %%xmm2\n\t"  "movdqu  48(%[in]), %%xmm3\n\t"
        "movdqu  64(%[in]), %%xmm4\n\t"  "movdqu  80(%[in]), %%xmm5\n\t"
        "movdqu  96(%[in]), %%xmm6\n\t"  "movdqu 112(%[in]), %%xmm7\n\t"
        "movdqu 128(%[in]), %%xmm8\n\t"  "movdqu 144(%[in]), %%xmm9\n\t"
        "movdqu 160(%[in]), %%xmm10\n\t" "movdqu 176(%[in]), %%xmm11\n\t"
        "movdqu 192(%[in]), %%xmm12\n\t" "movdqu 208(%[in]), %%xmm13\n\t"
        "movdqu 224(%[in]), %%xmm14\n\t" "movdqu 240(%[in]), %%xmm15\n\t"
        "mov %[spin], %%rcx\n"
        "1: dec %%rcx\n\t" "jnz 1b\n\t"
        "mov %[nr], %%rax\n\t"
        "syscall\n\t"
        "mov %[spin], %%rcx\n"
        "2: dec %%rcx\n\t" "jnz 2b\n\t"
        "movdqu %%xmm0,    0(%[out])\n\t" "movdqu %%xmm1,   16(%[out])\n\t"
        "movdqu %%xmm2,   32(%[out])\n\t" "movdqu %%xmm3,   48(%[out])\n\t"
        "movdqu %%xmm4,   64(%[out])\n\t" "movdqu %%xmm5,   80(%[out])\n\t"
        "movdqu %%xmm6,   96(%[out])\n\t" "movdqu %%xmm7,  112(%[out])\n\t"
        "movdqu %%xmm8,  128(%[out])\n\t" "movdqu %%xmm9,  144(%[out])\n\t"
        "movdqu %%xmm10, 160(%[out])\n\t" "movdqu %%xmm11, 176(%[out])\n\t"
        "movdqu %%xmm12, 192(%[out])\n\t" "movdqu %%xmm13, 208(%[out])\n\t"
        "movdqu %%xmm14, 224(%[out])\n\t" "movdqu %%xmm15, 240(%[out])\n\t"
        : "=&a"(ret)
        : [in] "r"(in), [out] "r"(out), [nr] "r"(nr), [spin] "r"(spin)
        : "rcx", "r11", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
          "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    return ret;
}

static int compare(const xmm_t *in, const xmm_t *out, const char *what, long round)
{
    int bad = 0;
    for (int i = 0; i < 16; i++) {
        if (in[i].lo != out[i].lo || in[i].hi != out[i].hi) {
            printf("MISMATCH round %ld after %s (pid %d): xmm%d loaded %016llx%016llx, read %016llx%016llx\n",
                   round, what, (int)getpid(), i, (unsigned long long)in[i].hi,
                   (unsigned long long)in[i].lo, (unsigned long long)out[i].hi,
                   (unsigned long long)out[i].lo);
            bad = 1;
        }
    }
    fflush(stdout);
    return bad;
}

int main(int argc, char **argv)
{
    long seconds = argc > 1 ? atol(argv[1]) : 60;
    const char *label = argc > 2 ? argv[2] : "probe";
    xmm_t in[16], out[16];
    long rounds = 0, forks = 0, mismatches = 0;
    time_t end = time(NULL) + seconds;
    while (time(NULL) < end) {
        for (int i = 0; i < 16; i++) {
            in[i].lo = 0x1111111111111111ull * (uint64_t)(i + 1) ^ (uint64_t)rounds;
            in[i].hi = ~in[i].lo ^ ((uint64_t)getpid() << 32);
        }
        long choice = rounds % 16;
        long nr = choice == 0 ? SYS_fork : choice % 2 ? SYS_sched_yield : SYS_getpid;
        memset(out, 0, sizeof out);
        long ret = round_trip(in, out, nr, 200000);
        const char *what = nr == SYS_fork ? "fork" : nr == SYS_sched_yield ? "sched_yield" : "getpid";
        if (nr == SYS_fork && ret == 0)
            _exit(compare(in, out, "fork (child)", rounds) ? 3 : 0);
        if (compare(in, out, what, rounds))
            mismatches++;
        if (nr == SYS_fork && ret > 0) {
            int status = 0;
            forks++;
            if (waitpid((pid_t)ret, &status, 0) == ret && WIFEXITED(status) && WEXITSTATUS(status) == 3)
                mismatches++;
        }
        rounds++;
    }
    printf("%s: %ld rounds, %ld forks, %ld mismatches in %ld s\n", label, rounds, forks, mismatches, seconds);
    return mismatches ? 1 : 0;
}
