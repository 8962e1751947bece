/* Bells: one futex word per queue set side (spec/device.md DEV-9, RING-6).
 *
 * A producer that published into a ring whose consumer set NEED_WAKEUP adds 1
 * to the consumer's bell and wakes it. A consumer reads the bell *before* its
 * last re-check of the rings and sleeps only while the word still holds that
 * value, so a ring rung after the re-check is never lost. The words live in a
 * MAP_SHARED region, so these are shared (not FUTEX_PRIVATE) futexes.
 */
#ifndef NK_BELL_H
#define NK_BELL_H

#include <errno.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449 /* the same on every architecture (Linux >= 5.16) */
#endif
#ifndef FUTEX_32
#define FUTEX_32 2
#endif
#define NK_BELL_WAITV_MAX 128
#define NK_POLL_MIN_NS 50000LL   /* VM-2: the first bounded sleep after work on a POLLED device */
#define NK_POLL_MAX_NS 1000000LL /* ... doubling while nothing comes, up to this */

/* The bell's current value: read it before the last ring re-check. */
static inline uint32_t nk_bell_value(uint32_t *bell)
{
	/* acquire: nothing the re-check reads may move above this load */
	return atomic_load_explicit((_Atomic uint32_t *)bell, memory_order_acquire);
}

/* Ring: +1 then FUTEX_WAKE every sleeper. Returns sleepers woken or -errno. */
static inline int nk_bell_ring(uint32_t *bell)
{
	/* seq_cst RMW: ordered after the tail store the caller made */
	atomic_fetch_add_explicit((_Atomic uint32_t *)bell, 1, memory_order_seq_cst);
	long rc = syscall(SYS_futex, bell, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
	return rc < 0 ? -errno : (int)rc;
}

/* Ring without the wake-up: +1 only. For a POLLED device (spec/vm.md VM-2) whose other
 * side is in another kernel: a FUTEX_WAKE would reach nobody there (and fails with EFAULT on
 * a guest's PCI BAR); the sleeper sees the word change when its bounded sleep ends. */
static inline void nk_bell_bump(uint32_t *bell)
{
	/* seq_cst RMW: ordered after the tail store the caller made, as in nk_bell_ring */
	atomic_fetch_add_explicit((_Atomic uint32_t *)bell, 1, memory_order_seq_cst);
}

static inline struct timespec nk_ns_to_timespec(int64_t ns)
{
	struct timespec ts = { .tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000 };
	return ts;
}

/* Sleep while *bell == expected, at most timeout_ns (< 0: no limit).
 * Returns 0 (woken or the word had changed), -ETIMEDOUT, -EINTR. */
static inline int nk_bell_wait(uint32_t *bell, uint32_t expected, int64_t timeout_ns)
{
	struct timespec ts = nk_ns_to_timespec(timeout_ns < 0 ? 0 : timeout_ns);
	long rc = syscall(SYS_futex, bell, FUTEX_WAIT, expected,
			  timeout_ns < 0 ? NULL : &ts, NULL, 0);
	if (rc == 0 || errno == EAGAIN)
		return 0;
	return -errno;
}

/* VM-2: wait for *bell to differ from `expected` without futex (a POLLED device: the
 * ringer is in another kernel, and FUTEX_WAIT on a guest's PCI BAR fails with EFAULT).
 * Sleeps in steps of *step_ns, re-reading the word after each; the step doubles up to
 * max_ns and stays doubled for the next call (the caller resets it when work comes).
 * At most timeout_ns in all. Returns 0 (the word changed) or -ETIMEDOUT. */
static inline int nk_bell_poll_wait(uint32_t *bell, uint32_t expected, int64_t timeout_ns,
				    int64_t *step_ns, int64_t max_ns)
{
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		/* acquire, as nk_bell_value: the rings read after a change are at least as new */
		if (nk_bell_value(bell) != expected)
			return 0;
		clock_gettime(CLOCK_MONOTONIC, &t);
		int64_t spent = (int64_t)(t.tv_sec - t0.tv_sec) * 1000000000 + (t.tv_nsec - t0.tv_nsec);
		if (spent >= timeout_ns)
			return -ETIMEDOUT;
		int64_t step = *step_ns < timeout_ns - spent ? *step_ns : timeout_ns - spent;
		struct timespec ts = nk_ns_to_timespec(step);
		nanosleep(&ts, NULL);
		if (*step_ns < max_ns)
			*step_ns = *step_ns * 2 > max_ns ? max_ns : *step_ns * 2;
	}
}

/* futex_waitv: sleep until any of n bells differs from its expected value.
 * abs_deadline is CLOCK_MONOTONIC; NULL waits without limit. Returns the index
 * of a woken bell, 0 if a word had already changed, -ETIMEDOUT, -EINTR. */
struct nk_futex_waitv {
	uint64_t val;
	uint64_t uaddr;
	uint32_t flags;
	uint32_t __reserved;
};

/* The raw futex_waitv: the index of a woken bell, -EAGAIN if a word had
 * already changed, -ETIMEDOUT, -EINTR, -ENOSYS (Linux < 5.16), -EINVAL. */
static inline int nk_bell_waitv(uint32_t *const *bells, const uint32_t *expected,
				unsigned n, const struct timespec *abs_deadline)
{
	struct nk_futex_waitv w[NK_BELL_WAITV_MAX];
	if (n == 0 || n > NK_BELL_WAITV_MAX)
		return -EINVAL;
	for (unsigned i = 0; i < n; i++) {
		w[i].val = expected[i];
		w[i].uaddr = (uint64_t)(uintptr_t)bells[i];
		w[i].flags = FUTEX_32; /* shared: no FUTEX_PRIVATE_FLAG */
		w[i].__reserved = 0;
	}
	long rc = syscall(SYS_futex_waitv, w, n, 0, abs_deadline, CLOCK_MONOTONIC);
	return rc >= 0 ? (int)rc : -errno;
}

static inline int nk_bell_wait_any(uint32_t *const *bells, const uint32_t *expected,
				   unsigned n, const struct timespec *abs_deadline)
{
	int rc = nk_bell_waitv(bells, expected, n, abs_deadline);
	return rc == -EAGAIN ? 0 : rc;
}

/* nk_bell_waitv with a relative timeout (< 0: no limit), turned into an
 * absolute CLOCK_MONOTONIC deadline: the same raw results (-EAGAIN distinct). */
static inline int nk_bell_waitv_ns(uint32_t *const *bells, const uint32_t *expected,
				   unsigned n, int64_t timeout_ns)
{
	struct timespec at;
	if (timeout_ns < 0)
		return nk_bell_waitv(bells, expected, n, NULL);
	clock_gettime(CLOCK_MONOTONIC, &at);
	at.tv_sec += timeout_ns / 1000000000;
	at.tv_nsec += timeout_ns % 1000000000;
	if (at.tv_nsec >= 1000000000) {
		at.tv_sec++;
		at.tv_nsec -= 1000000000;
	}
	return nk_bell_waitv(bells, expected, n, &at);
}

#endif
