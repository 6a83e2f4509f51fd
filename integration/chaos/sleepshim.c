/* Preloaded before Debian's libfaketime 0.9.10 for the clock-step peer (see clock.py).
 *
 * With FAKETIME_DONT_FAKE_MONOTONIC=1, that libfaketime turns an absolute
 * clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, ...) into a negative deadline and
 * the call fails with EINVAL, so Python's time.sleep() raises OSError and distcrond
 * cannot start. This clock_nanosleep, found first, makes the real system call: the
 * monotonic clock is not faked anyway, and the wall clock stays faked by libfaketime.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *request,
                    struct timespec *remain)
{
    long r = syscall(SYS_clock_nanosleep, clock_id, flags, request, remain);
    return r == -1 ? errno : 0;
}
