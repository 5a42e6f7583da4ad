/*
 * A VMM's use of a lease, in C: connect to the broker, create a lease, map it and write to it,
 * open the same lease again and read the bytes back through a second mapping, release it and
 * disconnect.
 *
 * Build (from the workspace root, after `cargo build -p membroker-ffi`):
 *
 *   cc -std=c11 -Wall -Wextra -I ffi/include ffi/examples/lease.c \
 *      -L target/debug -lmembroker_ffi -Wl,-rpath,"$PWD/target/debug" -o lease
 *
 * or statically: replace `-L ... -rpath...` with `target/debug/libmembroker_ffi.a -lm`.
 *
 *   ./lease [SOCKET [NAME]]     (no SOCKET: the default socket, as the membroker CLI uses)
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "membroker.h"

static int fail(const char *what)
{
    /* membroker_last_error() is never NULL after a failed call. */
    fprintf(stderr, "lease: %s: %s (errno %d)\n", what, membroker_last_error(),
            membroker_last_errno());
    return 1;
}

/* Maps a whole lease fd and closes the fd: the mapping keeps the memory, and the connection
 * (not the fd) keeps the lease. */
static void *map_lease(int fd, uint64_t size, int prot)
{
    void *addr = mmap(NULL, size, prot, MAP_SHARED, fd, 0);
    close(fd);
    return addr == MAP_FAILED ? NULL : addr;
}

int main(int argc, char **argv)
{
    const char *socket_path = argc > 1 ? argv[1] : NULL;
    const char *name = argc > 2 ? argv[2] : "example/ram0";
    const uint64_t size = 4u << 20;
    static const char message[] = "hello from C through a membroker lease";

    membroker *b = membroker_connect(socket_path);
    if (!b)
        return fail("connect");
    printf("connected\n");

    membroker_lease_info info;
    int fd = membroker_create_ex(b, name, size, 0, NULL, 0600, false, &info);
    if (fd < 0)
        return fail("create");
    printf("created %s: %llu bytes, %llu-byte pages, pool %s, mode %04o\n", name,
           (unsigned long long)info.size, (unsigned long long)info.page_size, info.pool,
           (unsigned)info.mode);

    char *ram = map_lease(fd, info.size, PROT_READ | PROT_WRITE);
    if (!ram) {
        perror("lease: mmap");
        return 1;
    }
    memcpy(ram, message, sizeof message);
    memcpy(ram + info.size - sizeof message, message, sizeof message);
    printf("wrote %zu bytes at both ends\n", sizeof message);

    /* Another holder (here the same process, read-only) sees the same memory. */
    fd = membroker_open(b, name, false);
    if (fd < 0)
        return fail("open");
    const char *view = map_lease(fd, info.size, PROT_READ);
    if (!view) {
        perror("lease: mmap");
        return 1;
    }
    if (memcmp(view, message, sizeof message) != 0 ||
        memcmp(view + info.size - sizeof message, message, sizeof message) != 0) {
        fprintf(stderr, "lease: the second mapping reads different bytes\n");
        return 1;
    }
    printf("read back through a second mapping: %s\n", view);

    if (membroker_release(b, name) != 0)
        return fail("release");
    printf("released\n");
    munmap((void *)view, info.size);
    munmap(ram, info.size);
    membroker_disconnect(b);
    printf("disconnected\n");
    return 0;
}
