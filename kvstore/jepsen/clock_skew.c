/*
 * LD_PRELOAD shim for the clock nemesis: moves CLOCK_REALTIME (and time(),
 * gettimeofday()) of one process by a whole number of seconds read from the
 * file named by $KVSTORE_CLOCK_SKEW_FILE (e.g. "+3600"), re-read at most once
 * a second, so the skew can change while the process runs. Nothing else is
 * touched: CLOCK_MONOTONIC, sleeps, condition variables and the GIL's timed
 * waits run as they would (libfaketime also wraps those, and under thread
 * contention that made a node's event loop stall for hundreds of ms).
 *
 * Built by kvstore/jepsen/clock.py with the system C compiler when a run needs
 * it; the built library is never committed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static clock_gettime_fn real_clock_gettime;
static long skew_seconds;    /* the offset in force */
static long next_read = -1;  /* CLOCK_MONOTONIC second at which the file is read again */

static long read_skew(void) {
    const char *path = getenv("KVSTORE_CLOCK_SKEW_FILE");
    char buf[32];
    long value = __atomic_load_n(&skew_seconds, __ATOMIC_RELAXED);
    if (path == NULL)
        return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return value;  /* keep the last offset while the file is being replaced */
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n > 0) {
        buf[n] = '\0';
        value = strtol(buf, NULL, 10);
    }
    return value;
}

static long current_skew(void) {
    struct timespec now;
    if (real_clock_gettime(CLOCK_MONOTONIC, &now) == 0
            && now.tv_sec >= __atomic_load_n(&next_read, __ATOMIC_RELAXED)) {
        __atomic_store_n(&next_read, now.tv_sec + 1, __ATOMIC_RELAXED);
        __atomic_store_n(&skew_seconds, read_skew(), __ATOMIC_RELAXED);
    }
    return __atomic_load_n(&skew_seconds, __ATOMIC_RELAXED);
}

int clock_gettime(clockid_t clock, struct timespec *tp) {
    if (real_clock_gettime == NULL)
        real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    int r = real_clock_gettime(clock, tp);
    if (r == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE))
        tp->tv_sec += current_skew();
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0) {  /* glibc declares tv non-null */
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return r;
}

time_t time(time_t *out) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return (time_t)-1;
    if (out != NULL)
        *out = ts.tv_sec;
    return ts.tv_sec;
}
