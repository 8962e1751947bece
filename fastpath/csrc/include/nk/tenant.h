/* A minimal, synchronous C tenant over an attached tenant device (spec/guestlib.md,
 * spec/nqe.md, spec/device.md): the seed of the C GuestLib (issue 5).
 *
 * The caller attaches (engine.sock, RUNTIME.md) and maps vm-<id>.nk; this library
 * takes the mapping and speaks NQEs on queue set 0, single-threaded, liburing-like:
 *
 *   - requests go on JOB (SEND and BUF_RETURN on SEND) through a small outbox, and
 *     the ENGINE bell is rung when the CoreEngine's consumer sleeps (RING-6);
 *   - a request's tag is the index of its slot in the table of calls in flight,
 *     so a reply is matched by (sock_id, tag) in O(1) (NQE-9);
 *   - EV_DATA buffers are held per socket until recv() consumed them, then go
 *     back with BUF_RETURN naming exactly their span (BUF-4, GL-11); EV_FIN,
 *     EV_ERROR (sock_id 0: every socket) and EV_ACCEPTABLE update the socket;
 *   - send() copies into send-half buffers (the C bufpool, BUF-1, BUF-3) and
 *     returns once the SENDs are published: up to max_sends per socket are in
 *     flight, their buffers reclaimed on the replies, like a kernel socket buffer;
 *   - waiting spins (polling the rings) for spin_ns, then sets NEED_WAKEUP on
 *     COMPLETION and RECEIVE and sleeps on the DEVICE bell (RING-6, RING-7).
 *
 * Every function returns >= 0 or -errno, with Linux's errnos. Socket handles are
 * the NetKernel socket IDs (>= 1). Not thread-safe: one thread per nk_tenant.
 */
#ifndef NK_TENANT_H
#define NK_TENANT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

struct nk_tenant;

struct nk_tenant_opts {
	int64_t spin_ns;    /* poll this long before sleeping on the DEVICE bell (< 0: default) */
	uint32_t max_sends; /* SENDs in flight per socket (0: default) */
	int control_fd;     /* engine.sock, checked for EOF while sleeping (-1: none) */
	uint32_t send_batch; /* publish SENDs once this many are queued or before any wait
			      * (0, 1: at the end of every send call, as a socket would) */
};

/* No spin beyond one poll and RING-6's re-check: on 2 cores with 4 processes in the run,
 * 0 beat 2, 5, 20 and 100 us in every alternated bench.kernel_nsm pair (RR ~25% over 5 us). */
#define NK_TENANT_SPIN_NS_DEFAULT 0
#define NK_TENANT_MAX_SENDS_DEFAULT 64
#define NK_TENANT_EXIT_NS 5000000000LL /* GL-10: how long nk_tenant_exit waits for SENDs/CLOSEs */

struct nk_tenant_stats {
	uint64_t requests;   /* NQEs published on JOB and SEND, BUF_RETURN included */
	uint64_t replies;    /* replies matched to a call */
	uint64_t unmatched;  /* replies no call waits for (a rejected BUF_RETURN, BUF-5) */
	uint64_t events;     /* EV_* read from RECEIVE */
	uint64_t buf_returns;
	uint64_t bells;      /* ENGINE bell rung (the CoreEngine slept) */
	uint64_t sleeps;     /* futex waits on the DEVICE bell */
	uint64_t spins;      /* empty polls while spinning */
	uint64_t waits;      /* nk_tenant_wait calls that found nothing at once */
};

/* Validate the mapped device [base, base+len) (DEV-2, DEV-12..14: a READY tenant
 * device) and set up the tenant: 0 and *out, -EINVAL/-EPROTO/-EBADMSG, -ENOMEM.
 * opts may be NULL. The mapping must outlive the tenant. */
int nk_tenant_init(struct nk_tenant **out, void *base, uint64_t len,
		   const struct nk_tenant_opts *opts);
/* GL-10: wait up to timeout_ns (< 0: NK_TENANT_EXIT_NS) for the SENDs and CLOSEs in
 * flight to be answered, then free the tenant. Sockets left open are not closed:
 * the device's detach closes them (NSM-12). Returns 0 or -ETIMEDOUT. */
int nk_tenant_exit(struct nk_tenant *t, int64_t timeout_ns);

int nk_tenant_socket(struct nk_tenant *t, int domain, int type, int protocol);
int nk_tenant_bind(struct nk_tenant *t, int s, const struct sockaddr *addr, socklen_t len);
int nk_tenant_listen(struct nk_tenant *t, int s, int backlog);
/* Blocks until a connection is taken; the peer's address into addr (may be NULL). */
int nk_tenant_accept(struct nk_tenant *t, int s, struct sockaddr *addr, socklen_t *len);
int nk_tenant_connect(struct nk_tenant *t, int s, const struct sockaddr *addr, socklen_t len);
int nk_tenant_setsockopt(struct nk_tenant *t, int s, int level, int name, const void *val,
			 socklen_t len);
int nk_tenant_getsockname(struct nk_tenant *t, int s, struct sockaddr *addr, socklen_t *len);
/* Queues all of buf (TCP) and returns len without waiting for the replies, or the
 * socket's pending error (-EPIPE after a reset, SOCK-6). */
ssize_t nk_tenant_send(struct nk_tenant *t, int s, const void *buf, size_t len, int flags);
/* Blocks until data, EOF (0) or an error; MSG_* flags are not supported (-EINVAL). */
ssize_t nk_tenant_recv(struct nk_tenant *t, int s, void *buf, size_t len, int flags);
/* SHUT_WR/RDWR wait for the socket's SENDs first: SHUTDOWN on JOB would overtake them. */
int nk_tenant_shutdown(struct nk_tenant *t, int s, int how);
/* Received buffers go back at once; CLOSE follows the socket's last SEND reply, with
 * ABORT if received data was never read (GL-2, NSM-8). The tenant makes progress only
 * inside its calls, so close waits (up to NK_TENANT_EXIT_NS) for those replies, as
 * close(2) with SO_LINGER would; past that the CLOSE leaves at a later call or exit. */
int nk_tenant_close(struct nk_tenant *t, int s);

/* Wait for progress: poll COMPLETION and RECEIVE, spin, then sleep on the DEVICE
 * bell for at most timeout_ns. Returns NQEs handled (>= 0), -ECONNRESET once the
 * CoreEngine is gone. The blocking calls above are loops around it. */
int nk_tenant_wait(struct nk_tenant *t, int64_t timeout_ns);
/* Handle what is on COMPLETION and RECEIVE now, never blocking: NQEs handled. */
int nk_tenant_poll(struct nk_tenant *t);

void nk_tenant_get_stats(const struct nk_tenant *t, struct nk_tenant_stats *out);
void nk_tenant_set_spin(struct nk_tenant *t, int64_t spin_ns);

#endif
