/* LD_PRELOAD shim that makes LMDB's writes to data.mdb fail with EIO, on demand.
 *
 * py-lmdb's LMDB calls libc's write/pwrite/pwritev/fdatasync/msync through the dynamic
 * linker, so a preloaded library sees them before libc does: a real I/O error at the
 * syscall boundary under LMDB, no FUSE or device mapper needed.
 *
 * Armed when the file named by $TORTURE_EIO_FLAG exists and holds a mode:
 *   data  - writes of data pages (file offset >= 2 pages) fail; with writemap, the msync
 *           of the data pages (a range reaching past the meta pages) fails
 *   meta  - writes of the two meta pages (offset < 2 pages) fail; with writemap, the
 *           msync of a meta page (a range inside the first two pages) fails
 *   sync  - fsync/fdatasync of data.mdb fail; with writemap, the data msync fails
 *   slow  - nothing fails: each fsync/fdatasync/msync of data.mdb first creates the file
 *           "$TORTURE_EIO_FLAG.inside" (so a parent knows a commit is inside its sync and can
 *           send a real signal then), then takes $TORTURE_SLOW_MS milliseconds (default 300;
 *           a signal does not cut the wait short), then syncs for real
 * Only descriptors whose path ends in "data.mdb" (and mappings of that file) are affected.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define META_BYTES (2 * 4096)

static int mode_is(const char *mode) {
    const char *flag = getenv("TORTURE_EIO_FLAG");
    char buf[16] = {0};
    if (!flag) return 0;
    int fd = open(flag, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    return strncmp(buf, mode, strlen(mode)) == 0;
}

/* Mode "slow": say that a sync of data.mdb is under way, then take a while (see the top). */
static void slow_sync(void) {
    const char *flag = getenv("TORTURE_EIO_FLAG");
    const char *ms_env = getenv("TORTURE_SLOW_MS");
    char inside[4096];
    long ms = ms_env ? atol(ms_env) : 300;
    struct timespec start, now;
    if (!flag) return;
    snprintf(inside, sizeof inside, "%s.inside", flag);
    int fd = open(inside, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) close(fd);
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {  /* nanosleep returns early on a signal: sleep again until the time is up */
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed = (now.tv_sec - start.tv_sec) * 1000L + (now.tv_nsec - start.tv_nsec) / 1000000L;
        if (elapsed >= ms) break;
        struct timespec pause = {0, 5 * 1000000L};
        nanosleep(&pause, NULL);
    }
}

static int is_data_file(int fd) {
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 8) return 0;
    target[n] = 0;
    return strcmp(target + n - 8, "data.mdb") == 0;
}

static int fail_write(int fd, off_t offset) {
    if (!is_data_file(fd)) return 0;
    if (offset >= META_BYTES) return mode_is("data");
    return mode_is("meta");
}

#define REAL(name, ret, args) \
    static ret(*real_##name) args; \
    if (!real_##name) real_##name = (ret(*) args)dlsym(RTLD_NEXT, #name)

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite, ssize_t, (int, const void *, size_t, off_t));
    if (fail_write(fd, offset)) { errno = EIO; return -1; }
    return real_pwrite(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite64, ssize_t, (int, const void *, size_t, off_t));
    if (fail_write(fd, offset)) { errno = EIO; return -1; }
    return real_pwrite64(fd, buf, count, offset);
}

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write, ssize_t, (int, const void *, size_t));
    if (is_data_file(fd) && fail_write(fd, lseek(fd, 0, SEEK_CUR))) { errno = EIO; return -1; }
    return real_write(fd, buf, count);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev, ssize_t, (int, const struct iovec *, int));
    if (is_data_file(fd) && fail_write(fd, lseek(fd, 0, SEEK_CUR))) { errno = EIO; return -1; }
    return real_writev(fd, iov, iovcnt);
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    REAL(pwritev, ssize_t, (int, const struct iovec *, int, off_t));
    if (fail_write(fd, offset)) { errno = EIO; return -1; }
    return real_pwritev(fd, iov, iovcnt, offset);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    REAL(pwritev64, ssize_t, (int, const struct iovec *, int, off_t));
    if (fail_write(fd, offset)) { errno = EIO; return -1; }
    return real_pwritev64(fd, iov, iovcnt, offset);
}

int fdatasync(int fd) {
    REAL(fdatasync, int, (int));
    if (is_data_file(fd) && mode_is("sync")) { errno = EIO; return -1; }
    if (is_data_file(fd) && mode_is("slow")) slow_sync();
    return real_fdatasync(fd);
}

int fsync(int fd) {
    REAL(fsync, int, (int));
    if (is_data_file(fd) && mode_is("sync")) { errno = EIO; return -1; }
    if (is_data_file(fd) && mode_is("slow")) slow_sync();
    return real_fsync(fd);
}

/* The file offset of ``addr`` if it lies in a mapping of a file named data.mdb, else -1. */
static long long data_file_offset(const void *addr) {
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[4608];
    long long found = -1;
    if (!maps) return -1;
    while (fgets(line, sizeof line, maps)) {
        unsigned long long lo, hi, off;
        char path[4096] = {0};
        if (sscanf(line, "%llx-%llx %*s %llx %*s %*s %4095s", &lo, &hi, &off, path) < 3) continue;
        size_t n = strlen(path);
        if ((uintptr_t)addr >= lo && (uintptr_t)addr < hi && n >= 8 && strcmp(path + n - 8, "data.mdb") == 0) {
            found = (long long)(off + ((uintptr_t)addr - lo));
            break;
        }
    }
    fclose(maps);
    return found;
}

int msync(void *addr, size_t length, int flags) {
    REAL(msync, int, (void *, size_t, int));
    long long offset = data_file_offset(addr);
    if (offset >= 0) {
        int meta_only = offset + (long long)length <= META_BYTES;
        if ((meta_only && mode_is("meta")) || (!meta_only && (mode_is("data") || mode_is("sync")))) {
            errno = EIO;
            return -1;
        }
        if (mode_is("slow")) slow_sync();
    }
    return real_msync(addr, length, flags);
}
