/*
 * Drives every call of libmembroker_ffi against a broker and prints what each returned, one
 * line per step, for tests/tests/ffi.rs to check. Usage: calls SOCKET MISSING_SOCKET. After the
 * line `upgrade the broker` it waits for a line on stdin: meanwhile the test upgrades the
 * broker in place (which closes this connection) and removes the lease ffi/b.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "membroker.h"

/* A failed call: its return value, errno by name, and the library's message. */
static void failed(const char *step, long rc)
{
    int err = errno;
    const char *name = strerrorname_np(err);
    printf("%s: rc=%ld errno=%s same=%d error=%s\n", step, rc, name ? name : "?",
           err == membroker_last_errno(), membroker_last_error());
}

static void print_info(const char *step, const membroker_lease_info *info)
{
    printf("%s: size=%llu page_size=%llu pool=%s device=%s mode=%04o persistent=%d writable=%d "
           "state=%u holders=%u poison_ranges=%u\n",
           step, (unsigned long long)info->size, (unsigned long long)info->page_size, info->pool,
           info->device, (unsigned)info->mode, info->persistent, info->writable,
           (unsigned)info->state, (unsigned)info->holders, (unsigned)info->poison_ranges);
}

/* Several threads share one handle: every stat succeeds, and each thread's failed open leaves
 * its own message (the lease it asked for) in its own last error. */
#define THREADS 4
static membroker *shared;

static void *hammer(void *arg)
{
    char missing[32], want[64];
    snprintf(missing, sizeof missing, "ffi/missing-%d", (int)(intptr_t)arg);
    snprintf(want, sizeof want, "lease %s: no such lease", missing);
    for (int i = 0; i < 50; i++) {
        membroker_lease_info info;
        if (membroker_stat(shared, "ffi/a", &info) != 0 || info.size != 8 << 20)
            return "stat failed";
        if (membroker_open(shared, missing, false) != -1 || strcmp(membroker_last_error(), want))
            return "wrong error";
    }
    return NULL;
}

static const char *share_between_threads(membroker *b)
{
    pthread_t threads[THREADS];
    const char *verdict = "ok";
    shared = b;
    for (intptr_t i = 0; i < THREADS; i++)
        pthread_create(&threads[i], NULL, hammer, (void *)i);
    for (int i = 0; i < THREADS; i++) {
        void *result;
        pthread_join(threads[i], &result);
        if (result)
            verdict = result;
    }
    return verdict;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: calls SOCKET MISSING_SOCKET\n");
        return 2;
    }
    printf("before any failure: %s\n", membroker_last_error() ? "message" : "NULL");

    membroker *none = membroker_connect(argv[2]);
    if (!none)
        failed("connect to nothing", 0);

    membroker *b = membroker_connect(argv[1]);
    if (!b) {
        failed("connect", 0);
        return 1;
    }
    printf("connected\n");

    membroker_lease_info info;
    failed("NULL handle", membroker_create(NULL, "ffi/a", 4096, 0600, false));
    failed("NULL name", membroker_open(b, NULL, true));
    failed("NULL out", membroker_stat(b, "ffi/a", NULL));
    failed("missing lease", membroker_open(b, "ffi/missing", true));
    failed("bad page size", membroker_create_ex(b, "ffi/a", 8 << 20, 12345, NULL, 0600, false, &info));
    failed("unknown pool", membroker_create_ex(b, "ffi/a", 8 << 20, 0, "nopool", 0600, false, &info));

    int fd = membroker_create_ex(b, "ffi/a", 8 << 20, 4096, "t", 0640, true, &info);
    if (fd < 0) {
        failed("create", fd);
        return 1;
    }
    close(fd);
    print_info("created", &info);
    failed("create again", membroker_create(b, "ffi/a", 8 << 20, 0600, true));

    printf("report poison: %d\n", membroker_report_poison(b, "ffi/a", 4096, 4096));
    failed("poison outside", membroker_report_poison(b, "ffi/a", 8 << 20, 4096));
    int total = membroker_poison_ranges(b, "ffi/a", NULL, 0);
    membroker_range ranges[4];
    int filled = membroker_poison_ranges(b, "ffi/a", ranges, 4);
    printf("poison ranges: %d %d [%llu+%llu]\n", total, filled,
           (unsigned long long)ranges[0].offset, (unsigned long long)ranges[0].len);
    failed("ranges into NULL", membroker_poison_ranges(b, "ffi/a", NULL, 4));
    if (membroker_stat(b, "ffi/a", &info) != 0) {
        failed("stat", -1);
        return 1;
    }
    print_info("stat", &info);
    printf("%d threads on one handle: %s\n", THREADS, share_between_threads(b));

    fd = membroker_open_ex(b, "ffi/b", true, &info);
    failed("open b before it exists", fd);
    fd = membroker_create(b, "ffi/b", 4 << 20, 0600, true);
    printf("created b: %s\n", fd >= 0 ? "fd" : membroker_last_error());
    close(fd);

    membroker_lost_lease lost;
    printf("lost before: %d\n", membroker_next_lost_lease(b, &lost));
    printf("reconnect needed before: %d\n", membroker_reconnect_if_closed(b));
    int sock = membroker_fd(b);

    printf("upgrade the broker\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 1;

    printf("reconnect needed after: %d\n", membroker_reconnect_if_closed(b));
    printf("same socket fd: %d\n", sock >= 0 && membroker_fd(b) == sock);
    while (membroker_next_lost_lease(b, &lost) == 1) {
        const char *name = strerrorname_np(lost.error);
        printf("lost: %s writable=%d errno=%s reason=%s\n", lost.name, lost.writable,
               name ? name : "?", lost.reason);
    }
    printf("lost after: %d\n", membroker_next_lost_lease(b, &lost));
    if (membroker_stat(b, "ffi/a", &info) != 0) {
        failed("stat after upgrade", -1);
        return 1;
    }
    print_info("stat after upgrade", &info);
    printf("reconnect now: %d\n", membroker_reconnect(b));

    printf("no transparent reconnect: %d\n", membroker_set_reconnect_timeout(b, 0));
    printf("release: %d\n", membroker_release(b, "ffi/a"));
    failed("release again", membroker_release(b, "ffi/a"));
    printf("remove: %d\n", membroker_remove(b, "ffi/a"));
    failed("stat removed", membroker_stat(b, "ffi/a", &info));
    membroker_disconnect(b);
    membroker_disconnect(NULL);
    printf("done\n");
    return 0;
}
