/* ServiceLib and the kernel-stack NSM (spec/nsm.md, spec/device.md DEV-8, BUF-*).
 *
 * The C twin of netkernel.reference.servicelib + netkernel.reference.nsm_kernel,
 * written to be read side by side with them: the same functions in the same
 * order (_dispatch, _tenant_map, _socket, _accept, _try_send, _readable, ...),
 * the same decisions, so every reply, errno and event is the reference's.
 * Tenant sockets are non-blocking Linux sockets; payload goes between the
 * tenant's data area and the kernel in place (sendto from the send half,
 * recvfrom into a receive buffer of the NSM's slice): one copy, by the kernel.
 *
 * Threads and sleeping. A futex (the DEVICE bells, DEV-9) and epoll (the
 * sockets) cannot be waited on at once, so there are two threads:
 *
 *   - the loop thread (nk_nsm_run) owns everything: it consumes COMPLETION
 *     and RECEIVE, executes calls, reads sockets, produces on JOB and SEND.
 *     It sleeps in epoll_wait() only, on the sockets, the control
 *     connection, the stop fd and one eventfd;
 *   - the bell thread does nothing but sleep on the DEVICE bells
 *     (futex_waitv) and write the eventfd whenever a bell word changed since
 *     it last looked (the reference's watcher, in C).
 *
 * Only the loop thread touches rings, sockets and tenant areas, so there is
 * no lock anywhere; the threads share the eventfd, the bell words (read-only
 * here) and an atomic quit flag. Before sleeping the loop sets NEED_WAKEUP on
 * every incoming ring and re-checks them (RING-6, nk_ring_prepare_sleep); a
 * CoreEngine that publishes after that sees the flag and rings a bell, the
 * bell thread wakes and writes the eventfd, and epoll_wait returns. The bell
 * thread compares each bell with the value it saw last, not with the value at
 * the loop's decision, so a ring between its wake-up and its next wait is not
 * lost either. The cost is one extra thread hop per wake-up from sleep; while
 * work flows, the loop polls (spins NK_NSM_SPIN_NS before it sleeps) and the
 * CoreEngine makes no system call at all (RING-11).
 *
 * Sleeps are bounded by 50 ms (RING-7: our side has RING-6's full fences,
 * but a Python CoreEngine cannot emit them, so a bell may be lost on its
 * side) and by 1 ms while outputs wait for
 * ring room, for a ticket (a CLOSE reply, NSM-17) or a gate (a new
 * connection's events, NSM-17): a producer gets no wake-up for free room
 * (RING-4), so those are polled.
 */
#define _GNU_SOURCE
#include "nk/nsm.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "nk/bell.h"
#include "nk/device.h"
#include "nk/nqe.h"
#include "nk/ring.h"

#define NK_NSM_BATCH 64                 /* NQEs taken from one ring per poll (RING-8) */
#define NK_NSM_RX_CHUNK (64u << 10)     /* largest TCP EV_DATA buffer */
#define NK_NSM_READS_PER_EVENT 8
#define NK_NSM_MAX_BACKLOG 4096         /* net.core.somaxconn's default */
#ifndef NK_NSM_SPIN_NS
/* Poll this long before sleeping (RING-7). A wake-up from sleep costs the bell thread's
 * hop; measured with `python -m bench --only rr --rounds 3 --seconds 2` (64 B request/
 * response under `netkernel run`, 2 cores): 50 us gave 4.7-5.8k round trips/s, 200 us
 * 8.4-9.8k, 1000 us 9.1-9.3k, 0 us 3.5-3.9k; 8 KB streaming was the same for all.
 * Env NK_NSM_SPIN_US overrides it. */
#define NK_NSM_SPIN_NS 250000
#endif
#define NK_NSM_MAX_SLEEP_MS 50          /* RING-7: the reference CoreEngine has no fences */
#define NK_NSM_BUSY_SLEEP_MS 1          /* outputs wait for room, a ticket or a gate */
#define NK_NSM_BELL_SLEEP_NS 50000000LL /* the bell thread re-checks its quit flag */
#define NK_NSM_SOCKADDR_MAX 128         /* sizeof(struct sockaddr_storage) */
#define NK_NSM_ACCEPT_NOWAIT (1ull << 32)
#define NK_NSM_HALF (1u << 31)
/* MSG_* flags a SEND may carry: OOB, DONTROUTE, DONTWAIT, EOR, CONFIRM, MORE. */
#define NK_NSM_SEND_FLAGS (MSG_OOB | MSG_DONTROUTE | MSG_DONTWAIT | MSG_EOR | MSG_CONFIRM | MSG_MORE)

/* ---------------------------------------------------------------------------------------
 * A FIFO of fixed-size elements (the reference's deques).
 */
struct nk_nsm_q {
	char *buf;
	uint32_t head, len, cap, esz;
};

static void nk_nsm_oom(void)
{
	fputs("nsm: out of memory\n", stderr);
	abort();
}

static void q_init(struct nk_nsm_q *q, uint32_t esz)
{
	memset(q, 0, sizeof(*q));
	q->esz = esz;
}

static void *q_at(const struct nk_nsm_q *q, uint32_t i)
{
	return q->buf + (size_t)((q->head + i) % q->cap) * q->esz;
}

static void *q_push(struct nk_nsm_q *q, const void *e)
{
	if (q->len == q->cap) {
		uint32_t cap = q->cap ? 2 * q->cap : 8;
		char *buf = malloc((size_t)cap * q->esz);
		if (!buf)
			nk_nsm_oom();
		for (uint32_t i = 0; i < q->len; i++)
			memcpy(buf + (size_t)i * q->esz, q_at(q, i), q->esz);
		free(q->buf);
		q->buf = buf;
		q->cap = cap;
		q->head = 0;
	}
	void *slot = q->buf + (size_t)((q->head + q->len) % q->cap) * q->esz;
	memcpy(slot, e, q->esz);
	q->len++;
	return slot;
}

static void q_pop(struct nk_nsm_q *q, uint32_t n)
{
	q->head = (q->head + n) % (q->cap ? q->cap : 1);
	q->len -= n;
}

static void q_free(struct nk_nsm_q *q)
{
	free(q->buf);
	q_init(q, q->esz);
}

/* ---------------------------------------------------------------------------------------
 * The receive slice: first fit over sorted free runs of granules (the
 * reference's bufpool.Allocator), plus what each lent buffer is (BUF-2, BUF-4).
 */
struct nk_nsm_lent {
	uint32_t size;   /* bytes allocated (0: no live buffer starts at this granule) */
	uint32_t named;  /* the size its EV_DATA named (0: not named yet) */
	uint32_t owner;  /* sock_id of the socket it was read for */
	uint32_t serial; /* that socket's serial: a later socket with the same ID is another */
};

struct nk_nsm_alloc {
	uint64_t base;   /* offset of the slice in the data area */
	uint64_t size;
	uint32_t granule;
	uint32_t total;  /* granules */
	uint32_t nfree;  /* granules in the free runs */
	uint32_t nruns;
	uint32_t *starts, *counts; /* free runs, sorted, never adjacent */
	struct nk_nsm_lent *lent;  /* per granule */
};

static int alloc_init(struct nk_nsm_alloc *a, uint64_t base, uint64_t size, uint32_t granule)
{
	memset(a, 0, sizeof(*a));
	if (size / granule > UINT32_MAX - 2)
		return -EINVAL;
	a->base = base;
	a->size = size;
	a->granule = granule;
	a->total = (uint32_t)(size / granule);
	a->starts = calloc(a->total / 2 + 2, sizeof(uint32_t));
	a->counts = calloc(a->total / 2 + 2, sizeof(uint32_t));
	a->lent = calloc(a->total, sizeof(*a->lent)); /* untouched pages cost nothing */
	if (!a->starts || !a->counts || !a->lent) {
		free(a->starts);
		free(a->counts);
		free(a->lent);
		return -ENOMEM;
	}
	a->starts[0] = 0;
	a->counts[0] = a->total;
	a->nfree = a->total;
	a->nruns = 1;
	return 0;
}

static void alloc_free_all(struct nk_nsm_alloc *a)
{
	free(a->starts);
	free(a->counts);
	free(a->lent);
}

static uint64_t alloc_largest_free(const struct nk_nsm_alloc *a)
{
	uint32_t best = 0;
	for (uint32_t i = 0; i < a->nruns; i++)
		if (a->counts[i] > best)
			best = a->counts[i];
	return (uint64_t)best * a->granule;
}

/* A buffer of size bytes (0 < size <= slice): its offset, or UINT64_MAX when no run fits (BUF-7). */
static uint64_t alloc_get(struct nk_nsm_alloc *a, uint32_t size, uint32_t owner, uint32_t serial)
{
	uint32_t need = (uint32_t)(((uint64_t)size + a->granule - 1) / a->granule);
	for (uint32_t i = 0; i < a->nruns; i++) {
		if (a->counts[i] < need)
			continue;
		uint32_t first = a->starts[i];
		if (a->counts[i] == need) {
			memmove(&a->starts[i], &a->starts[i + 1], (a->nruns - i - 1) * sizeof(uint32_t));
			memmove(&a->counts[i], &a->counts[i + 1], (a->nruns - i - 1) * sizeof(uint32_t));
			a->nruns--;
		} else {
			a->starts[i] += need;
			a->counts[i] -= need;
		}
		a->lent[first] = (struct nk_nsm_lent){ size, 0, owner, serial };
		a->nfree -= need;
		return a->base + (uint64_t)first * a->granule;
	}
	return UINT64_MAX;
}

/* Give back the live buffer at granule `first` (checked by the caller). */
static void alloc_put(struct nk_nsm_alloc *a, uint32_t first)
{
	uint32_t count = (uint32_t)(((uint64_t)a->lent[first].size + a->granule - 1) / a->granule);
	a->lent[first].size = 0;
	a->lent[first].named = 0;
	a->nfree += count;
	uint32_t i = 0;
	while (i < a->nruns && a->starts[i] < first)
		i++;
	memmove(&a->starts[i + 1], &a->starts[i], (a->nruns - i) * sizeof(uint32_t));
	memmove(&a->counts[i + 1], &a->counts[i], (a->nruns - i) * sizeof(uint32_t));
	a->starts[i] = first;
	a->counts[i] = count;
	a->nruns++;
	/* coalesce with the next run, then with the previous one */
	if (i + 1 < a->nruns && first + count == a->starts[i + 1]) {
		a->counts[i] += a->counts[i + 1];
		memmove(&a->starts[i + 1], &a->starts[i + 2], (a->nruns - i - 2) * sizeof(uint32_t));
		memmove(&a->counts[i + 1], &a->counts[i + 2], (a->nruns - i - 2) * sizeof(uint32_t));
		a->nruns--;
	}
	if (i > 0 && a->starts[i - 1] + a->counts[i - 1] == first) {
		a->counts[i - 1] += a->counts[i];
		memmove(&a->starts[i], &a->starts[i + 1], (a->nruns - i - 1) * sizeof(uint32_t));
		memmove(&a->counts[i], &a->counts[i + 1], (a->nruns - i - 1) * sizeof(uint32_t));
		a->nruns--;
	}
}

/* [off, off+size) inside [base, base+span), never forming off+size (NQE-14). */
static bool nk_nsm_within(uint64_t base, uint64_t span, uint64_t off, uint64_t size)
{
	if (off < base)
		return false;
	uint64_t room = base + span - off; /* base + span cannot wrap: both describe a mapping */
	return off - base <= span && size <= room;
}

/* ---------------------------------------------------------------------------------------
 * Tenants, sockets, calls.
 */
struct nk_nsm_call {
	struct nk_nqe nqe;
	uint8_t qset; /* the queue set and ring it was read from: its reply goes on the pair */
	uint8_t ring;
};

struct nk_nsm_ticket {
	uint8_t qset;
	uint8_t out;    /* 0 JOB, 1 SEND */
	uint32_t index; /* the ring index the output occupies once published */
};

struct nk_nsm_send {
	struct nk_nsm_call call;
	char *payload;
	char *dest;
	uint32_t length;
	uint32_t dest_len;
	uint32_t done;
	int flags;
};

struct nk_nsm_sock;

/* A connection waiting in a listener's accept queue: a Linux one (fd >= 0), or a
 * paired one (fd -1, spec/shm.md SHM-3) whose client is `client`, or NULL once the
 * client closed before the ACCEPT (the server then starts with EV_FIN, or with a reset
 * when `gone_reset`). */
struct nk_nsm_pending_conn {
	int fd;
	uint32_t len;
	uint8_t addr[NK_NSM_SOCKADDR_MAX];  /* the client's address: ACCEPT's answer */
	struct nk_nsm_sock *client;          /* paired: the client, while it is open */
	uint32_t dest_len;
	uint8_t dest[NK_NSM_SOCKADDR_MAX];  /* paired: the address the client connected to */
	bool gone_reset;                     /* paired, client closed: abortively */
};

struct nk_nsm_sock {
	struct nk_nsm_sock *hnext; /* hash chain */
	struct nk_nsm_sock *dnext; /* dead list: freed after the epoll batch */
	uint32_t sock_id;
	uint32_t serial;
	uint8_t vm_id;
	uint8_t qset;
	int fd;
	int family;
	bool stream;
	bool reading;  /* stream: connected, not at EOF or error; datagram: always */
	bool paused;   /* no receive buffer, or the socket's cap reached (BUF-7) */
	bool starved;  /* in its tenant's starved list */
	bool gated;    /* reading waits until the CoreEngine read `gate` (NSM-17) */
	bool listening;
	bool accept_stalled;
	bool shut_wr_later;
	bool closed;
	bool has_connect;
	struct nk_nsm_ticket gate;
	struct nk_nsm_call connect;
	int backlog_cap;
	struct nk_nsm_q backlog; /* struct nk_nsm_pending_conn */
	struct nk_nsm_q accepts; /* struct nk_nsm_call */
	struct nk_nsm_q sendq;   /* struct nk_nsm_send */
	uint64_t rx_bytes;       /* receive buffers the tenant holds from this socket */
	uint32_t mask;           /* the epoll interest registered now */
	/* On-host pairing (spec/shm.md). A paired end's fd is an unconnected TCP socket that
	 * only holds its options (and, for the client, its bound port): it is never in epoll
	 * (it would report EPOLLOUT|EPOLLHUP at once), its bytes go to `peer` in memory. */
	bool connect_failed;     /* a Linux connect failed; the next connect() collects it */
	bool paired;
	bool is_client;          /* paired by its CONNECT (not by an ACCEPT) */
	bool in_listeners;       /* in n->listeners (a listening TCP socket, placement != KERNEL) */
	bool close_abort;        /* the CLOSE being executed has ABORT: the peer sees a reset */
	bool wr_done;            /* this end's FIN was given to the peer (SHUT_WR done) */
	bool rx_done;            /* nothing more arrives here: later bytes for it are dropped */
	bool want_fin, fin_given;     /* EV_FIN to give (once its gate is open) / given */
	bool want_reset, reset_given; /* EV_ERROR ECONNRESET to give / given */
	uint8_t connects;        /* CONNECTs after the pairing one: the first is 0, then EISCONN */
	int backlog_max;         /* listen()'s backlog, clamped: Linux's queue holds it + 1 */
	struct nk_nsm_sock *peer;          /* the other end, while both are open */
	struct nk_nsm_sock *pend_listener; /* client: the listener whose accept queue holds it */
	struct nk_nsm_sock *lnext;         /* n->listeners chain */
	uint32_t local_len, remote_len;
	struct sockaddr_storage local, remote; /* a paired end's names (SHM-4) */
};

struct nk_nsm_tenant {
	uint8_t vm_id;
	char *map;
	size_t map_len;
	char *data;
	uint64_t data_size, send_size;
	uint32_t buf_size;
	uint64_t grant_off, grant_size;
	struct nk_nsm_alloc pool;
	struct nk_nsm_q starved; /* struct nk_nsm_sock * */
};

struct nk_nsm_held {
	struct nk_nsm_ticket ticket;
	struct nk_nsm_call call;
	int64_t result;
};

struct nk_nsm_out {
	struct nk_ring ring;
	struct nk_nsm_q box; /* struct nk_nqe, queued in order (RING-4) */
};

struct nk_nsm {
	char *base;
	uint64_t len;
	uint32_t n_qsets;
	char runtime[PATH_MAX];
	int control_fd, stop_fd, wake_fd, epfd;
	struct nk_ring *in;     /* [qset * 2 + 0] COMPLETION, [+1] RECEIVE */
	struct nk_nsm_out *out; /* [qset * 2 + 0] JOB, [+1] SEND */
	uint32_t **device_bells, **engine_bells;
	uint32_t bells_seen[NK_BELL_WAITV_MAX]; /* the bell thread's */
	struct nk_nsm_tenant *tenants[256];
	struct nk_nsm_sock **buckets;
	uint32_t nbuckets, nsocks, next_serial;
	struct nk_nsm_sock *dead;
	struct nk_nsm_q held;  /* struct nk_nsm_held: replies waiting for a ticket */
	struct nk_nsm_q gated; /* struct nk_nsm_sock * */
	struct nk_nsm_sock *listeners; /* listening TCP sockets a CONNECT may pair with (SHM-2) */
	struct nk_nsm_q kicks; /* struct nk_nsm_sock *: paired receivers a BUF_RETURN made room for */
	uint32_t rx_chunk;
	uint64_t rx_cap;
	uint8_t scratch[NK_NSM_SOCKADDR_MAX];
	atomic_bool stop;
	atomic_bool quit; /* the bell thread's */
	bool lost;
	int fatal;      /* RING-10: a ring with impossible indices; the loop ends with it */
	bool watching;
	pthread_t watcher;
	struct nk_nsm_counters c;
	_Atomic uint64_t bell_wakeups;
	int placement; /* enum nk_nsm_placement */
	int64_t spin_ns; /* poll this long before sleeping (NK_NSM_SPIN_NS, env NK_NSM_SPIN_US) */
	/* per tenant, read by other threads: every access is a relaxed atomic (nk_nsm_tc_add) */
	struct nk_nsm_tenant_counters tc[256];
	bool tc_mapped[256];
	uint32_t holders[256]; /* per tenant: its sockets that hold some of its slice (NSM-18) */
};

/* Per-tenant counters: written by the loop, read from any thread (no ordering needed:
 * each counter is a statistic on its own). */
#define nk_nsm_tc_add(n, vm, field, v) \
	__atomic_fetch_add(&(n)->tc[(vm)].field, (uint64_t)(v), __ATOMIC_RELAXED)
#define nk_nsm_tc_sub(n, vm, field, v) \
	__atomic_fetch_sub(&(n)->tc[(vm)].field, (uint64_t)(v), __ATOMIC_RELAXED)

/* epoll tags of the fds that are not sockets */
static char nk_nsm_tag_wake, nk_nsm_tag_control, nk_nsm_tag_stop;

enum { NK_NSM_OUT_JOB = 0, NK_NSM_OUT_SEND = 1 };

/* ---------------------------------------------------------------------------------------
 * Outputs (ServiceLib.reply / event / flush): queued per ring, in order,
 * published in batches; tickets tell when the CoreEngine has read one.
 */
static struct nk_nsm_out *out_of(struct nk_nsm *n, uint8_t qset, uint8_t out)
{
	return &n->out[qset * 2 + out];
}

static struct nk_nsm_ticket nk_nsm_enqueue(struct nk_nsm *n, uint8_t qset, uint8_t out,
					   const struct nk_nqe *e)
{
	struct nk_nsm_out *o = out_of(n, qset, out);
	q_push(&o->box, e);
	n->c.nqe_out++;
	/* our own tail (we are the producer): relaxed */
	uint32_t tail = atomic_load_explicit(NK_ATOMIC(o->ring.tail), memory_order_relaxed);
	return (struct nk_nsm_ticket){ qset, out, tail + o->box.len };
}

/* NQE-8, NQE-9, NQE-13: the reply keeps qset, vm_id, sock_id, data_ptr, size and tag. */
static struct nk_nsm_ticket nk_nsm_reply(struct nk_nsm *n, const struct nk_nsm_call *call,
					 int64_t result)
{
	struct nk_nqe r = call->nqe;
	r.op = nk_op_is_answerable(r.op) ? (uint8_t)(r.op | NK_REPLY_BIT) : NK_OP_UNKNOWN_REPLY;
	r.op_data = (uint64_t)result;
	memset(r.reserved, 0, sizeof(r.reserved)); /* NQE-4 */
	/* DEV-8: COMPLETION -> JOB, RECEIVE -> SEND */
	return nk_nsm_enqueue(n, call->qset, call->ring == NK_RING_COMPLETION ? NK_NSM_OUT_JOB
									    : NK_NSM_OUT_SEND, &r);
}

/* NSM-15: events go on SEND of the socket's queue set. */
static struct nk_nsm_ticket nk_nsm_event(struct nk_nsm *n, const struct nk_nsm_sock *s,
					 uint8_t op, int64_t op_data, uint64_t data_ptr,
					 uint32_t size)
{
	struct nk_nqe e;
	memset(&e, 0, sizeof(e));
	e.op = op;
	e.qset = s->qset;
	e.vm_id = s->vm_id;
	e.sock_id = s->sock_id;
	e.op_data = (uint64_t)op_data;
	e.data_ptr = data_ptr;
	e.size = size;
	return nk_nsm_enqueue(n, s->qset, NK_NSM_OUT_SEND, &e);
}

static struct nk_nsm_ticket nk_nsm_last_ticket(struct nk_nsm *n, uint8_t qset, uint8_t out)
{
	struct nk_nsm_out *o = out_of(n, qset, out);
	uint32_t tail = atomic_load_explicit(NK_ATOMIC(o->ring.tail), memory_order_relaxed);
	return (struct nk_nsm_ticket){ qset, out, tail + o->box.len };
}

/* True once the CoreEngine's head has passed the ticket (RING-3 arithmetic). */
static bool nk_nsm_consumed(struct nk_nsm *n, struct nk_nsm_ticket t)
{
	/* acquire: pairs with the CoreEngine's release of head (RING-5); what
	 * follows (publishing an event, a CLOSE reply) is ordered after it */
	uint32_t head = atomic_load_explicit(NK_ATOMIC(out_of(n, t.qset, t.out)->ring.head),
					     memory_order_acquire);
	return (uint32_t)(head - t.index) < NK_NSM_HALF;
}

static void nk_nsm_reply_after(struct nk_nsm *n, struct nk_nsm_ticket t,
			       const struct nk_nsm_call *call, int64_t result)
{
	if (nk_nsm_consumed(n, t)) {
		nk_nsm_reply(n, call, result);
		return;
	}
	struct nk_nsm_held h = { t, *call, result };
	q_push(&n->held, &h);
}

static uint32_t nk_nsm_pending_outputs(const struct nk_nsm *n)
{
	uint32_t total = n->held.len;
	for (uint32_t i = 0; i < n->n_qsets * 2; i++)
		total += n->out[i].box.len;
	return total;
}

/* Publish what fits (RING-4, RING-8), ring the CoreEngine's bell if it sleeps (RING-6). */
static void nk_nsm_flush(struct nk_nsm *n)
{
	if (n->held.len) {
		uint32_t keep = n->held.len;
		for (uint32_t i = 0; i < keep; i++) {
			struct nk_nsm_held h = *(struct nk_nsm_held *)q_at(&n->held, 0);
			q_pop(&n->held, 1);
			if (nk_nsm_consumed(n, h.ticket))
				nk_nsm_reply(n, &h.call, h.result);
			else
				q_push(&n->held, &h);
		}
	}
	for (uint32_t i = 0; i < n->n_qsets * 2; i++) {
		struct nk_nsm_out *o = &n->out[i];
		uint32_t pushed = 0;
		while (o->box.len) {
			/* the queued NQEs from head to the end of the buffer are contiguous */
			uint32_t run = o->box.cap - o->box.head;
			if (run > o->box.len)
				run = o->box.len;
			int64_t k = nk_ring_push(&o->ring, q_at(&o->box, 0), run);
			if (k < 0)
				n->fatal = (int)k; /* RING-10: stop using the device */
			if (k <= 0)
				break; /* full: keep them (RING-4) */
			q_pop(&o->box, (uint32_t)k);
			pushed += (uint32_t)k;
			if ((uint32_t)k < run)
				break;
		}
		if (pushed && nk_ring_consumer_sleeping(&o->ring))
			nk_bell_ring(n->engine_bells[i / 2]);
	}
}

/* ---------------------------------------------------------------------------------------
 * The socket table, keyed by (VM ID, socket ID) (NSM-14).
 */
static uint64_t nk_nsm_key(uint8_t vm, uint32_t sock)
{
	return (uint64_t)vm << 32 | sock;
}

static uint32_t nk_nsm_bucket(const struct nk_nsm *n, uint8_t vm, uint32_t sock)
{
	uint64_t h = nk_nsm_key(vm, sock) * 0x9E3779B97F4A7C15ull;
	return (uint32_t)(h >> 32) & (n->nbuckets - 1);
}

static struct nk_nsm_sock *nk_nsm_find(const struct nk_nsm *n, uint8_t vm, uint32_t sock)
{
	for (struct nk_nsm_sock *s = n->buckets[nk_nsm_bucket(n, vm, sock)]; s; s = s->hnext)
		if (s->vm_id == vm && s->sock_id == sock)
			return s;
	return NULL;
}

static void nk_nsm_insert(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	if (n->nsocks >= n->nbuckets) {
		uint32_t old = n->nbuckets;
		struct nk_nsm_sock **ob = n->buckets;
		n->nbuckets = old * 2;
		n->buckets = calloc(n->nbuckets, sizeof(*n->buckets));
		if (!n->buckets)
			nk_nsm_oom();
		for (uint32_t i = 0; i < old; i++) {
			for (struct nk_nsm_sock *x = ob[i], *next; x; x = next) {
				next = x->hnext;
				uint32_t b = nk_nsm_bucket(n, x->vm_id, x->sock_id);
				x->hnext = n->buckets[b];
				n->buckets[b] = x;
			}
		}
		free(ob);
	}
	uint32_t b = nk_nsm_bucket(n, s->vm_id, s->sock_id);
	s->hnext = n->buckets[b];
	n->buckets[b] = s;
	n->nsocks++;
}

static void nk_nsm_remove(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	struct nk_nsm_sock **p = &n->buckets[nk_nsm_bucket(n, s->vm_id, s->sock_id)];
	for (; *p; p = &(*p)->hnext) {
		if (*p == s) {
			*p = s->hnext;
			n->nsocks--;
			nk_nsm_tc_sub(n, s->vm_id, sockets, 1);
			if (s->rx_bytes) /* its buffers come back to no socket (NSM-18) */
				n->holders[s->vm_id]--;
			return;
		}
	}
}

static struct nk_nsm_sock *nk_nsm_sock_new(struct nk_nsm *n, const struct nk_nsm_call *call,
					   uint32_t sock_id, int fd, int family, bool stream)
{
	struct nk_nsm_sock *s = calloc(1, sizeof(*s));
	if (!s)
		nk_nsm_oom();
	s->sock_id = sock_id;
	s->serial = ++n->next_serial;
	s->vm_id = call->nqe.vm_id;
	s->qset = call->qset;
	s->fd = fd;
	s->family = family;
	s->stream = stream;
	q_init(&s->backlog, sizeof(struct nk_nsm_pending_conn));
	q_init(&s->accepts, sizeof(struct nk_nsm_call));
	q_init(&s->sendq, sizeof(struct nk_nsm_send));
	nk_nsm_insert(n, s);
	nk_nsm_tc_add(n, s->vm_id, sockets, 1);
	return s;
}

/* ---------------------------------------------------------------------------------------
 * Linux socket calls with io_uring-style results (reference/ksock.py).
 */
static int64_t nk_nsm_rc(long rc)
{
	return rc < 0 ? -errno : rc;
}

static int64_t nk_nsm_pending_error(int fd)
{
	int err = 0;
	socklen_t len = sizeof(err);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		return -errno;
	return err ? -err : 0;
}

static bool nk_nsm_lingers(int fd)
{
	struct linger l = { 0, 0 };
	socklen_t len = sizeof(l);
	if (getsockopt(fd, SOL_SOCKET, SO_LINGER, &l, &len) < 0)
		return false;
	return l.l_onoff && l.l_linger > 0;
}

static void *nk_nsm_close_thread(void *arg)
{
	close((int)(intptr_t)arg);
	return NULL;
}

/* close(2), in a helper thread when SO_LINGER would make it block the loop. */
static void nk_nsm_close_fd(int fd)
{
	bool lingers = nk_nsm_lingers(fd);
#ifdef NK_BROKEN_LINGER
	lingers = false; /* a deliberately broken build: tests/test_fastpath_nsm.py must notice */
#endif
	if (lingers) {
		pthread_t t;
		pthread_attr_t attr;
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		int rc = pthread_create(&t, &attr, nk_nsm_close_thread, (void *)(intptr_t)fd);
		pthread_attr_destroy(&attr);
		if (rc == 0)
			return;
	}
	close(fd);
}

/* ---------------------------------------------------------------------------------------
 * Interest and teardown.
 */
static void nk_nsm_update(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	if (s->closed || s->paired) /* a paired end's fd is never in epoll (SHM-5) */
		return;
	bool read = (s->listening && !s->accept_stalled &&
		     (s->accepts.len || (int)s->backlog.len < s->backlog_cap)) ||
		    s->accepts.len || (s->reading && !s->paused && !s->gated);
	bool write = s->has_connect || s->sendq.len;
	uint32_t mask = (read ? EPOLLIN : 0) | (write ? EPOLLOUT : 0);
	if (mask == s->mask)
		return;
	struct epoll_event ev = { .events = mask, .data.ptr = s };
	if (s->mask == 0)
		epoll_ctl(n->epfd, EPOLL_CTL_ADD, s->fd, &ev);
	else if (mask == 0)
		epoll_ctl(n->epfd, EPOLL_CTL_DEL, s->fd, NULL);
	else
		epoll_ctl(n->epfd, EPOLL_CTL_MOD, s->fd, &ev);
	s->mask = mask;
}

static void nk_nsm_pair_orphan(struct nk_nsm *n, struct nk_nsm_sock *c);

static void nk_nsm_drop_backlog(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	while (s->backlog.len) {
		struct nk_nsm_pending_conn *c = q_at(&s->backlog, 0);
		if (c->fd >= 0)
			nk_nsm_close_fd(c->fd);
		else if (c->client)
			nk_nsm_pair_orphan(n, c->client); /* SHM-9: its client is reset */
		q_pop(&s->backlog, 1);
	}
}

static void nk_nsm_unstarve(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	struct nk_nsm_tenant *t = n->tenants[s->vm_id];
	if (!s->starved || !t)
		return;
	for (uint32_t i = 0; i < t->starved.len; i++) {
		struct nk_nsm_sock **p = q_at(&t->starved, i);
		if (*p == s) {
			*p = *(struct nk_nsm_sock **)q_at(&t->starved, 0); /* order is irrelevant */
			q_pop(&t->starved, 1);
			break;
		}
	}
	s->starved = false;
}

/* BUF-7: no buffer (or the cap): stop reading until a BUF_RETURN. */
static bool nk_nsm_pause(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	s->paused = true;
	struct nk_nsm_tenant *t = n->tenants[s->vm_id];
	if (!s->starved && t) {
		q_push(&t->starved, &s);
		s->starved = true;
	}
	return false;
}

static uint64_t nk_nsm_min(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static void nk_nsm_pair_unlink(struct nk_nsm *n, struct nk_nsm_sock *s);

/* Close s; with reason != 0 its pending calls are answered with it (NSM-8). */
static void nk_nsm_destroy(struct nk_nsm *n, struct nk_nsm_sock *s, int64_t reason)
{
	if (s->closed)
		return;
	if (reason) {
		if (s->has_connect)
			nk_nsm_reply(n, &s->connect, reason);
		for (uint32_t i = 0; i < s->accepts.len; i++)
			nk_nsm_reply(n, q_at(&s->accepts, i), reason);
		for (uint32_t i = 0; i < s->sendq.len; i++)
			nk_nsm_reply(n, &((struct nk_nsm_send *)q_at(&s->sendq, i))->call, reason);
	}
	if (s->mask) {
		epoll_ctl(n->epfd, EPOLL_CTL_DEL, s->fd, NULL);
		s->mask = 0;
	}
	s->closed = true;
	s->has_connect = false;
	q_free(&s->accepts);
	q_free(&s->sendq);
	nk_nsm_pair_unlink(n, s); /* SHM-8, SHM-9: the peer sees the end; no pointer dangles */
	nk_nsm_drop_backlog(n, s);
	q_free(&s->backlog);
	nk_nsm_remove(n, s);
	nk_nsm_unstarve(n, s);
	for (uint32_t i = 0; i < n->gated.len; i++) {
		struct nk_nsm_sock **p = q_at(&n->gated, i);
		if (*p == s)
			*p = NULL; /* _open_gates drops it */
	}
	nk_nsm_close_fd(s->fd);
	s->fd = -1;
	/* epoll may still hold an event naming s in the batch being handled */
	s->dnext = n->dead;
	n->dead = s;
}

static void nk_nsm_reap(struct nk_nsm *n)
{
	while (n->dead) {
		struct nk_nsm_sock *s = n->dead;
		n->dead = s->dnext;
		free(s);
	}
}

/* ---------------------------------------------------------------------------------------
 * Tenant areas (TenantArea).
 */
static uint64_t nk_nsm_cap(const struct nk_nsm *n, const struct nk_nsm_tenant *t)
{
	if (n->rx_cap)
		return n->rx_cap;
	uint64_t half = t->grant_size / 2;
	return half > t->buf_size ? half : t->buf_size;
}

/* NSM-18: the reserve, one granule for each socket of the tenant that holds none of its
 * slice, at most half the slice. The loop is the counters' only writer. */
static uint64_t nk_nsm_reserve(const struct nk_nsm *n, const struct nk_nsm_tenant *t,
			       uint8_t vm)
{
	const struct nk_nsm_alloc *a = &t->pool;
	uint64_t socks = __atomic_load_n(&n->tc[vm].sockets, __ATOMIC_RELAXED);
	uint64_t empty = socks > n->holders[vm] ? socks - n->holders[vm] : 0;
	return nk_nsm_min(empty, a->total / 2) * a->granule;
}

/* NSM-16, NSM-18 (bufpool.ReceiveAllocator.room): the most bytes socket s may be lent
 * now. Below its share (the cap); a socket holding some of the slice leaves the
 * reserve free, one holding none may take a granule of it. */
static uint64_t nk_nsm_room(const struct nk_nsm *n, const struct nk_nsm_tenant *t,
			    const struct nk_nsm_sock *s)
{
	const struct nk_nsm_alloc *a = &t->pool;
	uint64_t cap = nk_nsm_cap(n, t), held = s->rx_bytes;
	uint64_t free = (uint64_t)a->nfree * a->granule, reserve = nk_nsm_reserve(n, t, s->vm_id);
	uint64_t open = free > reserve ? free - reserve : 0;
	if (!held && open < a->granule)
		open = nk_nsm_min(free, a->granule);
	return held < cap ? nk_nsm_min(cap - held, open) : 0;
}

/* A call's buffer in the send half (NQE-6, NQE-14, NSM-13): 0 and *p (NULL for size 0),
 * or -EFAULT without touching it. */
static int nk_nsm_address(const struct nk_nsm_tenant *t, uint64_t off, uint32_t size, char **p)
{
	if (size == 0) {
		*p = NULL;
		return 0;
	}
	if (!nk_nsm_within(0, t->send_size, off, size))
		return -EFAULT;
	*p = t->data + off;
	return 0;
}

static void nk_nsm_tenant_free(struct nk_nsm_tenant *t)
{
	munmap(t->map, t->map_len);
	alloc_free_all(&t->pool);
	q_free(&t->starved);
	free(t);
}

/* DEV-2, DEV-12..DEV-14: the reference's read_header; 0 or -EINVAL. */
static int nk_nsm_check_header(const void *map, uint64_t len, struct nk_geometry *g)
{
	struct nk_dev_header h;
	if (len < sizeof(h))
		return -EINVAL;
	memcpy(&h, map, sizeof(h));
	if (memcmp(h.magic, NK_DEV_MAGIC, 8) || h.version != NK_DEV_VERSION)
		return -EINVAL;
	uint32_t e = h.ring_entries, b = h.buf_size;
	if (h.n_qsets < 1 || h.n_qsets > NK_MAX_QSETS || e < NK_MIN_RING_ENTRIES ||
	    e > NK_MAX_RING_ENTRIES || (e & (e - 1)) || b < 64 || (b & (b - 1)) ||
	    h.data_size % b || h.send_size % b || !(0 < h.send_size && h.send_size < h.data_size) ||
	    (h.kind != NK_KIND_TENANT && h.kind != NK_KIND_NSM))
		return -EINVAL;
	*g = (struct nk_geometry){ h.n_qsets, e, h.data_size, h.send_size, b, h.kind };
	if (h.header_size != NK_DEV_HEADER_SIZE || h.qset_offset != nk_geo_qset_offset(g) ||
	    h.qset_stride != nk_geo_qset_stride(g) || h.data_offset != nk_geo_data_offset(g) ||
	    h.total_size != nk_geo_total_size(g) || nk_geo_total_size(g) > len)
		return -EINVAL;
	return 0;
}

/* ---------------------------------------------------------------------------------------
 * The stack (KernelNSM): forward declarations of the readiness side.
 */
static void nk_nsm_serve_accepts(struct nk_nsm *n, struct nk_nsm_sock *s);
static void nk_nsm_tenant_unmapped(struct nk_nsm *n, uint8_t vm);
static void nk_nsm_pair_kicks(struct nk_nsm *n);
static void nk_nsm_pair_opened(struct nk_nsm *n, struct nk_nsm_sock *s);
static void nk_nsm_take(struct nk_nsm *n, struct nk_nsm_sock *listener,
			const struct nk_nsm_call *call, char *addr, uint32_t size);
static bool nk_nsm_pair_connect(struct nk_nsm *n, const struct nk_nsm_call *call,
				struct nk_nsm_sock *s, const char *addr, uint32_t len);
static void nk_nsm_pair_listen(struct nk_nsm *n, struct nk_nsm_sock *s);

/* ---------------------------------------------------------------------------------------
 * Control ops (ServiceLib._tenant_map, _tenant_unmap, _buf_return).
 */
static void nk_nsm_tenant_map(struct nk_nsm *n, const struct nk_nsm_call *call)
{
	const struct nk_nqe *q = &call->nqe;
	uint64_t vm = q->op_data;
	if (vm < 256 && n->tenants[vm]) {
		struct nk_nsm_tenant *old = n->tenants[vm];
		bool same = old->grant_off == q->data_ptr && old->grant_size == q->size;
		nk_nsm_reply(n, call, same ? 0 : -EEXIST); /* NSM-11 */
		return;
	}
	if (vm == 0 || vm > 0xFF) {
		nk_nsm_reply(n, call, -EINVAL);
		return;
	}
	char path[PATH_MAX + 32];
	snprintf(path, sizeof(path), "%s/vm-%u.nk", n->runtime, (unsigned)vm); /* RT-1 */
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		nk_nsm_reply(n, call, -errno); /* NSM-11: the errno of the open */
		return;
	}
	struct stat st;
	if (fstat(fd, &st) < 0) {
		int err = errno;
		close(fd);
		nk_nsm_reply(n, call, -err);
		return;
	}
	if ((uint64_t)st.st_size < NK_DEV_HEADER_SIZE) {
		close(fd);
		nk_nsm_reply(n, call, -EINVAL); /* DeviceError */
		return;
	}
	void *map = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	int err = map == MAP_FAILED ? -errno : 0;
	close(fd); /* the mapping keeps the pages */
	if (err) {
		nk_nsm_reply(n, call, err);
		return;
	}
	struct nk_geometry g;
	err = nk_nsm_check_header(map, (uint64_t)st.st_size, &g);
	if (!err && g.kind != NK_KIND_TENANT)
		err = -EINVAL;
	/* BUF-8: the slice lies in the receive half (EFAULT), on granules (EINVAL) */
	if (!err && (q->size == 0 || !nk_nsm_within(g.send_size, g.data_size - g.send_size,
						     q->data_ptr, q->size)))
		err = -EFAULT;
	if (!err && (q->data_ptr % g.buf_size || q->size % g.buf_size))
		err = -EINVAL;
	struct nk_nsm_tenant *t = err ? NULL : calloc(1, sizeof(*t));
	if (!err && !t)
		err = -ENOMEM;
	if (!err && (err = alloc_init(&t->pool, q->data_ptr, q->size, g.buf_size)) != 0) {
		free(t);
		t = NULL;
	}
	if (err) {
		munmap(map, (size_t)st.st_size);
		nk_nsm_reply(n, call, err);
		return;
	}
	t->vm_id = (uint8_t)vm;
	t->map = map;
	t->map_len = (size_t)st.st_size;
	t->data = (char *)map + nk_geo_data_offset(&g);
	t->data_size = g.data_size;
	t->send_size = g.send_size;
	t->buf_size = g.buf_size;
	t->grant_off = q->data_ptr;
	t->grant_size = q->size;
	q_init(&t->starved, sizeof(struct nk_nsm_sock *));
	n->tenants[vm] = t;
	n->c.tenants++;
	for (size_t f = 0; f < sizeof(n->tc[vm]) / sizeof(uint64_t); f++) /* a new tenant */
		if (f != offsetof(struct nk_nsm_tenant_counters, sockets) / sizeof(uint64_t))
			__atomic_store_n(&((uint64_t *)&n->tc[vm])[f], 0, __ATOMIC_RELAXED);
	__atomic_store_n(&n->tc_mapped[vm], true, __ATOMIC_RELAXED);
	nk_nsm_reply(n, call, 0);
}

/* Close every socket of vm, drop its queued outputs, unmap its area (NSM-12). */
static void nk_nsm_forget_tenant(struct nk_nsm *n, uint8_t vm)
{
	nk_nsm_tenant_unmapped(n, vm);
	for (uint32_t i = 0; i < n->n_qsets * 2; i++) {
		struct nk_nsm_q *box = &n->out[i].box;
		uint32_t len = box->len;
		for (uint32_t k = 0; k < len; k++) {
			struct nk_nqe e = *(struct nk_nqe *)q_at(box, 0);
			q_pop(box, 1);
			if (e.vm_id != vm)
				q_push(box, &e);
		}
	}
	uint32_t len = n->held.len;
	for (uint32_t k = 0; k < len; k++) {
		struct nk_nsm_held h = *(struct nk_nsm_held *)q_at(&n->held, 0);
		q_pop(&n->held, 1);
		if (h.call.nqe.vm_id != vm)
			q_push(&n->held, &h);
	}
	if (n->tenants[vm]) {
		nk_nsm_tenant_free(n->tenants[vm]);
		n->tenants[vm] = NULL;
		n->c.tenants--;
		__atomic_store_n(&n->tc_mapped[vm], false, __ATOMIC_RELAXED);
	}
}

static void nk_nsm_tenant_unmap(struct nk_nsm *n, const struct nk_nsm_call *call)
{
	uint64_t vm = call->nqe.op_data;
	if (vm < 256)
		nk_nsm_forget_tenant(n, (uint8_t)vm);
	nk_nsm_reply(n, call, 0);
}

/* BUF_RETURN: the owners hold less; starved sockets of the tenant may read again (BUF-7). */
static void nk_nsm_buf_return(struct nk_nsm *n, const struct nk_nsm_call *call)
{
	const struct nk_nqe *q = &call->nqe;
	struct nk_nsm_tenant *t = n->tenants[q->vm_id];
	if (!t) {
		nk_nsm_reply(n, call, -EFAULT);
		return;
	}
	struct nk_nsm_alloc *a = &t->pool;
	/* BUF-5, BUF-6: EFAULT outside the slice, EINVAL unless exactly a lent buffer */
	if (q->size == 0 || !nk_nsm_within(a->base, a->size, q->data_ptr, q->size)) {
		nk_nsm_reply(n, call, -EFAULT);
		return;
	}
	uint64_t rel = q->data_ptr - a->base;
	struct nk_nsm_lent *l = rel % a->granule ? NULL : &a->lent[rel / a->granule];
	if (!l || l->size == 0 || l->named != q->size) {
		nk_nsm_reply(n, call, -EINVAL);
		return;
	}
	uint32_t size = l->size;
	struct nk_nsm_sock *owner = nk_nsm_find(n, q->vm_id, l->owner);
	if (owner && owner->serial != l->serial)
		owner = NULL;
	alloc_put(a, (uint32_t)(rel / a->granule));
	n->c.buf_return++;
	if (owner) {
		owner->rx_bytes -= size;
		if (!owner->rx_bytes)
			n->holders[q->vm_id]--; /* NSM-18 */
	}
	for (uint32_t i = 0; i < t->starved.len;) {
		struct nk_nsm_sock *s = *(struct nk_nsm_sock **)q_at(&t->starved, i);
		if (nk_nsm_room(n, t, s)) {
			nk_nsm_unstarve(n, s);
			s->paused = false;
			if (s->paired) /* SHM-6: its peer's SENDs go on, after this loop */
				q_push(&n->kicks, &s);
			nk_nsm_update(n, s);
			i = 0; /* unstarve moved an element into a slot we may have passed */
			continue;
		}
		i++;
	}
	nk_nsm_pair_kicks(n);
}

/* ---------------------------------------------------------------------------------------
 * Socket calls (KernelNSM._socket ... _getpeername).
 */
static int nk_nsm_socket_policy(int domain, int type, int proto)
{
	int base = type & 0xF, flags = type & ~0xF;
	if (flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC) & 0xFFFF)
		return EINVAL;
	if (domain != AF_INET && domain != AF_INET6)
		return EAFNOSUPPORT;
	if (base == SOCK_RAW)
		return proto == 0 ? EPROTONOSUPPORT : EPERM; /* as for a non-root caller */
	if (base != SOCK_STREAM && base != SOCK_DGRAM)
		return ESOCKTNOSUPPORT;
	if (proto != 0 && proto != (base == SOCK_STREAM ? IPPROTO_TCP : IPPROTO_UDP))
		return EPROTONOSUPPORT;
	return 0;
}

static int nk_nsm_new_id_error(const struct nk_nsm *n, uint8_t vm, uint32_t sock_id)
{
	if (sock_id == 0)
		return EINVAL; /* NQE-7: a socket is never given ID 0 */
	return nk_nsm_find(n, vm, sock_id) ? EEXIST : 0;
}

/* NSM-5: SOCKET, op_data = domain | type << 16 | protocol << 32. */
static void nk_nsm_socket(struct nk_nsm *n, const struct nk_nsm_call *call)
{
	const struct nk_nqe *q = &call->nqe;
	int domain = (int)(q->op_data & 0xFFFF), type = (int)((q->op_data >> 16) & 0xFFFF);
	int proto = (int)((q->op_data >> 32) & 0xFFFF);
	int err = nk_nsm_new_id_error(n, q->vm_id, q->sock_id);
	if (!err)
		err = nk_nsm_socket_policy(domain, type, proto);
	if (err) {
		nk_nsm_reply(n, call, -err);
		return;
	}
	int base = type & 0xF;
	int fd = socket(domain, base | SOCK_NONBLOCK | SOCK_CLOEXEC, proto);
	if (fd < 0) {
		nk_nsm_reply(n, call, -errno);
		return;
	}
	struct nk_nsm_sock *s = nk_nsm_sock_new(n, call, q->sock_id, fd, domain, base == SOCK_STREAM);
	s->reading = !s->stream;
	nk_nsm_update(n, s);
	nk_nsm_reply(n, call, 0);
}

/* Read s once the CoreEngine has consumed the reply `t` (NSM-17). */
static void nk_nsm_start_reading(struct nk_nsm *n, struct nk_nsm_sock *s, struct nk_nsm_ticket t)
{
	s->reading = true;
	s->gated = true;
	s->gate = t;
	q_push(&n->gated, &s);
}

static void nk_nsm_open_gates(struct nk_nsm *n)
{
	uint32_t len = n->gated.len;
	for (uint32_t k = 0; k < len; k++) {
		struct nk_nsm_sock *s = *(struct nk_nsm_sock **)q_at(&n->gated, 0);
		q_pop(&n->gated, 1);
		if (!s || s->closed || !s->gated)
			continue;
		if (nk_nsm_consumed(n, s->gate)) {
			s->gated = false;
			if (s->paired)
				nk_nsm_pair_opened(n, s); /* SHM-5: its peer's SENDs may go on */
			nk_nsm_update(n, s);
		} else {
			q_push(&n->gated, &s);
		}
	}
}

/* A new connection named by the ACCEPT's op_data; it reads once the reply is read. */
static void nk_nsm_connection(struct nk_nsm *n, struct nk_nsm_sock *listener,
			      const struct nk_nsm_call *call, int fd, int64_t addr_len)
{
	struct nk_nsm_sock *s = nk_nsm_sock_new(n, call, (uint32_t)call->nqe.op_data, fd,
						listener->family, true);
	nk_nsm_start_reading(n, s, nk_nsm_reply(n, call, addr_len));
}

static void nk_nsm_wait_accept(struct nk_nsm *n, const struct nk_nsm_call *call,
			       struct nk_nsm_sock *s, bool nowait)
{
	if (nowait) {
		nk_nsm_reply(n, call, -EAGAIN);
	} else {
		q_push(&s->accepts, call);
		nk_nsm_update(n, s);
	}
}

/* accept4 with the new socket non-blocking: fd or -errno; *alen the full address length. */
static int nk_nsm_accept4(int fd, void *addr, uint32_t len, int64_t *alen)
{
	socklen_t l = len;
	int rc = accept4(fd, addr, addr ? &l : NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	*alen = l;
	return rc < 0 ? -errno : rc;
}

/* NSM-7: ACCEPT takes a connection now, or waits for one (unless op_data bit 32). */
static void nk_nsm_accept(struct nk_nsm *n, const struct nk_nsm_call *call,
			  struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	const struct nk_nqe *q = &call->nqe;
	int err = nk_nsm_new_id_error(n, q->vm_id, (uint32_t)q->op_data);
	char *addr = NULL;
	if (nk_nsm_address(t, q->data_ptr, q->size, &addr) < 0 && !err)
		err = EFAULT;
	if (err) {
		nk_nsm_reply(n, call, -err);
		return;
	}
	bool nowait = q->op_data & NK_NSM_ACCEPT_NOWAIT;
	s->accept_stalled = false;
	if (s->accepts.len) { /* earlier ACCEPTs wait: none is pending, and order is kept */
		nk_nsm_wait_accept(n, call, s, nowait);
		return;
	}
	if (s->backlog.len) {
		nk_nsm_take(n, s, call, addr, q->size);
		nk_nsm_update(n, s);
		return;
	}
	int64_t alen;
	int fd = nk_nsm_accept4(s->fd, addr, q->size, &alen);
	if (fd >= 0)
		nk_nsm_connection(n, s, call, fd, alen);
	else if (fd == -EAGAIN)
		nk_nsm_wait_accept(n, call, s, nowait);
	else
		nk_nsm_reply(n, call, fd);
}

static void nk_nsm_bind(struct nk_nsm *n, const struct nk_nsm_call *call,
			struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	char *addr;
	if (nk_nsm_address(t, call->nqe.data_ptr, call->nqe.size, &addr) < 0) {
		nk_nsm_reply(n, call, -EFAULT);
		return;
	}
	nk_nsm_reply(n, call, nk_nsm_rc(bind(s->fd, (struct sockaddr *)addr, call->nqe.size)));
}

static void nk_nsm_listen(struct nk_nsm *n, const struct nk_nsm_call *call,
			  struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	(void)t;
	int32_t backlog = (int32_t)(uint32_t)(call->nqe.op_data & 0xFFFFFFFFu); /* signed 32-bit */
	int64_t rc = nk_nsm_rc(listen(s->fd, backlog));
	if (rc == 0) {
		s->listening = true;
		s->backlog_cap = backlog < 1 ? 1 : backlog > NK_NSM_MAX_BACKLOG ? NK_NSM_MAX_BACKLOG
										    : backlog;
		s->backlog_max = backlog < 0 ? 0 : backlog > NK_NSM_MAX_BACKLOG ? NK_NSM_MAX_BACKLOG
										   : backlog;
		nk_nsm_pair_listen(n, s);
		nk_nsm_update(n, s);
	}
	nk_nsm_reply(n, call, rc);
}

/* NSM-4, NSM-7: a stream CONNECT is answered once the handshake is over. */
static void nk_nsm_connect(struct nk_nsm *n, const struct nk_nsm_call *call,
			   struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	char *addr;
	if (nk_nsm_address(t, call->nqe.data_ptr, call->nqe.size, &addr) < 0) {
		nk_nsm_reply(n, call, -EFAULT);
		return;
	}
	if (nk_nsm_pair_connect(n, call, s, addr, call->nqe.size))
		return; /* SHM-2: paired, or refused (SHM-1) */
	s->connect_failed = false; /* connect() collects a failed one (sock_error) */
	int64_t rc = nk_nsm_rc(connect(s->fd, (struct sockaddr *)addr, call->nqe.size));
	if (rc == -EINPROGRESS && s->stream) {
		s->connect = *call;
		s->has_connect = true;
		nk_nsm_update(n, s);
	} else if (rc == 0 && s->stream) {
		nk_nsm_start_reading(n, s, nk_nsm_reply(n, call, 0));
	} else {
		nk_nsm_reply(n, call, rc);
	}
}

/* Hand the kernel what it takes of p; true once p is answered (NSM-6). */
static bool nk_nsm_try_send(struct nk_nsm *n, struct nk_nsm_sock *s, struct nk_nsm_send *p)
{
	bool nowait = p->flags & MSG_DONTWAIT;
	for (;;) {
		ssize_t r = sendto(s->fd, p->payload ? p->payload + p->done : NULL, p->length - p->done,
				   p->flags | MSG_NOSIGNAL | MSG_DONTWAIT,
				   (struct sockaddr *)p->dest, p->dest ? p->dest_len : 0);
		int64_t rc = nk_nsm_rc(r);
		if (rc >= 0) {
			p->done += (uint32_t)rc;
			nk_nsm_tc_add(n, s->vm_id, stack_bytes_out, rc);
			if (p->done >= p->length || !s->stream) {
				nk_nsm_reply(n, &p->call, p->done);
				return true;
			}
		} else if (rc == -EAGAIN) {
			if (nowait) {
				nk_nsm_reply(n, &p->call, p->done ? (int64_t)p->done : -EAGAIN);
				return true;
			}
			return false;
		} else if (rc != -EINTR) {
			nk_nsm_reply(n, &p->call, p->done ? (int64_t)p->done : rc);
			return true;
		}
	}
}

/* NSM-6: a SEND (op_data = MSG_* flags | destination sockaddr length << 32) as a
 * struct nk_nsm_send; false once answered (-EFAULT, -EINVAL). */
static bool nk_nsm_send_of(struct nk_nsm *n, const struct nk_nsm_call *call,
			   struct nk_nsm_tenant *t, struct nk_nsm_send *p)
{
	const struct nk_nqe *q = &call->nqe;
	uint32_t dest_len = (uint32_t)((q->op_data >> 32) & 0xFFFF);
	char *buf;
	if (nk_nsm_address(t, q->data_ptr, q->size, &buf) < 0) {
		nk_nsm_reply(n, call, -EFAULT);
		return false;
	}
	if (dest_len > q->size) {
		nk_nsm_reply(n, call, -EINVAL);
		return false;
	}
	*p = (struct nk_nsm_send){
		.call = *call,
		.payload = q->size ? buf + dest_len : NULL,
		.dest = dest_len ? buf : NULL,
		.length = q->size - dest_len,
		.dest_len = dest_len,
		.flags = (int)(q->op_data & NK_NSM_SEND_FLAGS),
	};
	return true;
}

/* NQE-16: a SEND goes behind the SENDs already waiting (with MSG_DONTWAIT it is answered
 * -EAGAIN instead); false when none waits. */
static bool nk_nsm_send_behind(struct nk_nsm *n, struct nk_nsm_sock *s,
			       const struct nk_nsm_send *p)
{
	if (!s->sendq.len)
		return false;
	if (p->flags & MSG_DONTWAIT)
		nk_nsm_reply(n, &p->call, -EAGAIN);
	else
		q_push(&s->sendq, p);
	return true;
}

static void nk_nsm_send(struct nk_nsm *n, const struct nk_nsm_call *call,
			struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	struct nk_nsm_send p;
	if (!nk_nsm_send_of(n, call, t, &p) || nk_nsm_send_behind(n, s, &p))
		return;
	if (!nk_nsm_try_send(n, s, &p)) {
		q_push(&s->sendq, &p);
		nk_nsm_update(n, s);
	}
}

/* SHUTDOWN's `how` is one of Linux's, else the call is answered -EINVAL (NSM-4). */
static bool nk_nsm_shut_how(struct nk_nsm *n, const struct nk_nsm_call *call)
{
	uint64_t how = call->nqe.op_data;
	if (how == SHUT_RD || how == SHUT_WR || how == SHUT_RDWR)
		return true;
	nk_nsm_reply(n, call, -EINVAL);
	return false;
}

static void nk_nsm_shutdown(struct nk_nsm *n, const struct nk_nsm_call *call,
			    struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	(void)t;
	uint64_t how = call->nqe.op_data;
	if (!nk_nsm_shut_how(n, call))
		return;
	if (s->sendq.len && how != SHUT_RD) { /* NSM-6: the FIN goes after the queued bytes */
		s->shut_wr_later = true;
		nk_nsm_reply(n, call, how == SHUT_RDWR ? nk_nsm_rc(shutdown(s->fd, SHUT_RD)) : 0);
		return;
	}
	int64_t rc = nk_nsm_rc(shutdown(s->fd, (int)how));
	nk_nsm_reply(n, call, rc);
	if (rc == 0 && s->listening && how != SHUT_WR) {
		/* Linux stops listening: queued connections are dropped, accept() fails EINVAL */
		s->listening = false;
		nk_nsm_drop_backlog(n, s);
		nk_nsm_serve_accepts(n, s);
		nk_nsm_update(n, s);
	}
}

/* NSM-8: CLOSE is answered after the socket's last event was read (NSM-17). With
 * ABORT, SO_LINGER {on, 0} makes close(2) reset the connection, as Linux's close of
 * a socket with unread data does. */
static void nk_nsm_close(struct nk_nsm *n, const struct nk_nsm_call *call,
			 struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	(void)t;
	if (s->stream && (call->nqe.op_data & NK_CLOSE_ABORT)) {
		struct linger l = { 1, 0 };
		setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
		s->close_abort = true; /* SHM-9: a paired peer is reset */
	}
	uint8_t qset = s->qset;
	nk_nsm_destroy(n, s, -EBADF);
	nk_nsm_reply_after(n, nk_nsm_last_ticket(n, qset, NK_NSM_OUT_SEND), call, 0);
}

/* NSM-9: (level, optname) a tenant may set or get: plain values, effects on its own
 * socket only (reference nsm_kernel.SOCKOPTS). Not SO_REUSEPORT (15): every socket here
 * has the NSM's uid, so it would let a tenant join another tenant's listener. */
static bool nk_nsm_sockopt_allowed(uint32_t level, uint32_t name)
{
	static const uint8_t sol_socket[] = { 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 18, 19,
					      20, 21, 30, 38, 39 };
	static const uint8_t sol_tcp[] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18, 23, 25 };
	static const uint8_t sol_ip[] = { 1, 2, 10, 14, 15, 24, 32, 33, 34, 35, 36 };
	static const uint8_t sol_ipv6[] = { 16, 17, 18, 19, 20, 21, 26, 67 };
	const uint8_t *set;
	size_t len;
	switch (level) {
	case SOL_SOCKET: set = sol_socket; len = sizeof(sol_socket); break;
	case SOL_TCP: set = sol_tcp; len = sizeof(sol_tcp); break;
	case SOL_IP: set = sol_ip; len = sizeof(sol_ip); break;
	case SOL_IPV6: set = sol_ipv6; len = sizeof(sol_ipv6); break;
	default: return false;
	}
	for (size_t i = 0; i < len; i++)
		if (set[i] == name)
			return true;
	return false;
}

static void nk_nsm_sockopt(struct nk_nsm *n, const struct nk_nsm_call *call,
			   struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	const struct nk_nqe *q = &call->nqe;
	uint32_t level = (uint32_t)q->op_data, name = (uint32_t)(q->op_data >> 32);
	char *addr;
	if (nk_nsm_address(t, q->data_ptr, q->size, &addr) < 0) {
		nk_nsm_reply(n, call, -EFAULT);
	} else if (!nk_nsm_sockopt_allowed(level, name)) {
		nk_nsm_reply(n, call, -ENOPROTOOPT);
	} else if (q->op == NK_OP_SETSOCKOPT) {
		nk_nsm_reply(n, call, nk_nsm_rc(setsockopt(s->fd, (int)level, (int)name, addr,
							  q->size)));
	} else {
		socklen_t len = q->size;
		int rc = getsockopt(s->fd, (int)level, (int)name, addr, &len);
		nk_nsm_reply(n, call, rc < 0 ? -errno : (int64_t)len);
	}
}

static void nk_nsm_name(struct nk_nsm *n, const struct nk_nsm_call *call,
			struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	const struct nk_nqe *q = &call->nqe;
	char *addr;
	if (nk_nsm_address(t, q->data_ptr, q->size, &addr) < 0) {
		nk_nsm_reply(n, call, -EFAULT);
		return;
	}
	socklen_t len = q->size;
	int rc = q->op == NK_OP_GETPEERNAME ? getpeername(s->fd, (struct sockaddr *)addr, &len)
					    : getsockname(s->fd, (struct sockaddr *)addr, &len);
	nk_nsm_reply(n, call, rc < 0 ? -errno : (int64_t)len);
}

typedef void (*nk_nsm_handler)(struct nk_nsm *, const struct nk_nsm_call *,
			       struct nk_nsm_tenant *, struct nk_nsm_sock *);

static nk_nsm_handler nk_nsm_handler_of(uint8_t op)
{
	switch (op) {
	case NK_OP_BIND: return nk_nsm_bind;
	case NK_OP_LISTEN: return nk_nsm_listen;
	case NK_OP_CONNECT: return nk_nsm_connect;
	case NK_OP_ACCEPT: return nk_nsm_accept;
	case NK_OP_SEND: return nk_nsm_send;
	case NK_OP_SHUTDOWN: return nk_nsm_shutdown;
	case NK_OP_CLOSE: return nk_nsm_close;
	case NK_OP_SETSOCKOPT:
	case NK_OP_GETSOCKOPT: return nk_nsm_sockopt;
	case NK_OP_GETSOCKNAME:
	case NK_OP_GETPEERNAME: return nk_nsm_name;
	default: return NULL;
	}
}

/* ---------------------------------------------------------------------------------------
 * On-host pairing (spec/shm.md): a TCP connection between two tenants of this NSM is
 * carried in memory. The listener stays a Linux listening socket; its accept queue
 * (s->backlog) holds Linux connections and paired ones in one FIFO. A paired end's
 * SENDs are copied from its tenant's send half into buffers of the peer tenant's
 * receive slice (the one copy, SHM-5), while its fd only holds options and names.
 */
static void nk_nsm_pair_push(struct nk_nsm *n, struct nk_nsm_sock *s);

static bool nk_nsm_is_loopback(const struct sockaddr_storage *a)
{
	if (a->ss_family == AF_INET)
		return (ntohl(((const struct sockaddr_in *)a)->sin_addr.s_addr) >> 24) == 127;
	return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)a)->sin6_addr);
}

static bool nk_nsm_is_any(const struct sockaddr_storage *a)
{
	if (a->ss_family == AF_INET)
		return ((const struct sockaddr_in *)a)->sin_addr.s_addr == htonl(INADDR_ANY);
	return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)a)->sin6_addr);
}

static uint16_t nk_nsm_port(const struct sockaddr_storage *a)
{
	return a->ss_family == AF_INET ? ((const struct sockaddr_in *)a)->sin_port
				       : ((const struct sockaddr_in6 *)a)->sin6_port;
}

static bool nk_nsm_same_ip(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	if (a->ss_family != b->ss_family)
		return false;
	if (a->ss_family == AF_INET)
		return ((const struct sockaddr_in *)a)->sin_addr.s_addr ==
		       ((const struct sockaddr_in *)b)->sin_addr.s_addr;
	return !memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
		       &((const struct sockaddr_in6 *)b)->sin6_addr, sizeof(struct in6_addr));
}

static socklen_t nk_nsm_sa_len(int family)
{
	return family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
}

/* SHM-2: the address is one of the host's own: loopback, or one a socket can bind to. */
static bool nk_nsm_is_local(const struct sockaddr_storage *dest)
{
	if (nk_nsm_is_loopback(dest))
		return true;
	struct sockaddr_storage a = *dest;
	if (a.ss_family == AF_INET)
		((struct sockaddr_in *)&a)->sin_port = 0;
	else
		((struct sockaddr_in6 *)&a)->sin6_port = 0;
	int fd = socket(a.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return false;
	bool local = bind(fd, (struct sockaddr *)&a, nk_nsm_sa_len(a.ss_family)) == 0;
	close(fd);
	return local;
}

/* At LISTEN: remember the listener and its address, for CONNECTs to find (SHM-2). */
static void nk_nsm_pair_listen(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	if (n->placement == NK_PLACE_KERNEL || !s->stream)
		return;
	socklen_t len = sizeof(s->local);
	if (getsockname(s->fd, (struct sockaddr *)&s->local, &len) < 0)
		return;
	s->local_len = len;
	if (!s->in_listeners) {
		s->lnext = n->listeners;
		n->listeners = s;
		s->in_listeners = true;
	}
}

/* A tenant's socket listening at dest (same family and port, its address or the wildcard). */
static struct nk_nsm_sock *nk_nsm_pair_find(struct nk_nsm *n, const struct sockaddr_storage *dest)
{
	for (struct nk_nsm_sock *l = n->listeners; l; l = l->lnext) {
		if (!l->listening || l->closed || l->local.ss_family != dest->ss_family ||
		    nk_nsm_port(&l->local) != nk_nsm_port(dest))
			continue;
		if (nk_nsm_is_any(&l->local) || nk_nsm_same_ip(&l->local, dest))
			return l;
	}
	return NULL;
}

/* The client's Linux connect() would bind it: to a free ephemeral port on the address it
 * connects to when it has no port yet (SHM-3); its name is then the one Linux gives. */
static int nk_nsm_pair_bind(struct nk_nsm_sock *s, const struct sockaddr_storage *dest)
{
	socklen_t len = sizeof(s->local);
	if (getsockname(s->fd, (struct sockaddr *)&s->local, &len) < 0)
		return -errno;
	if (nk_nsm_port(&s->local) == 0) {
		struct sockaddr_storage a = *dest;
		if (a.ss_family == AF_INET)
			((struct sockaddr_in *)&a)->sin_port = 0;
		else
			((struct sockaddr_in6 *)&a)->sin6_port = 0;
		if (bind(s->fd, (struct sockaddr *)&a, nk_nsm_sa_len(a.ss_family)) < 0)
			return errno == EADDRINUSE ? -EADDRNOTAVAIL : -errno;
		len = sizeof(s->local);
		if (getsockname(s->fd, (struct sockaddr *)&s->local, &len) < 0)
			return -errno;
	}
	if (nk_nsm_is_any(&s->local)) { /* bound to the wildcard: the source is dest's address */
		if (s->local.ss_family == AF_INET)
			((struct sockaddr_in *)&s->local)->sin_addr =
				((const struct sockaddr_in *)dest)->sin_addr;
		else
			((struct sockaddr_in6 *)&s->local)->sin6_addr =
				((const struct sockaddr_in6 *)dest)->sin6_addr;
	}
	s->local_len = len;
	return 0;
}

/* SHM-2, SHM-3: pair a TCP CONNECT with a tenant's listener. False: not for pairing, the
 * caller connects over Linux TCP; true: answered (0, or -errno). */
static bool nk_nsm_pair_connect(struct nk_nsm *n, const struct nk_nsm_call *call,
				struct nk_nsm_sock *s, const char *addr, uint32_t len)
{
	if (n->placement == NK_PLACE_KERNEL || !s->stream || s->paired || s->listening ||
	    s->reading || s->has_connect || s->connect_failed || !addr ||
	    len < sizeof(sa_family_t))
		return false; /* Linux's connect() answers (a failed one: it collects the error) */
	struct sockaddr_storage dest;
	memset(&dest, 0, sizeof(dest));
	sa_family_t family;
	memcpy(&family, addr, sizeof(family));
	if ((int)family != s->family || len < nk_nsm_sa_len(family))
		return false; /* Linux decides: EAFNOSUPPORT, EINVAL, ... */
	if (family == AF_INET) {
		struct sockaddr_in *d = (struct sockaddr_in *)&dest;
		memcpy(d, addr, sizeof(*d));
		memset(d->sin_zero, 0, sizeof(d->sin_zero));
	} else {
		struct sockaddr_in6 *d = (struct sockaddr_in6 *)&dest;
		memcpy(d, addr, sizeof(*d));
		d->sin6_flowinfo = 0;
		if (IN6_IS_ADDR_V4MAPPED(&d->sin6_addr))
			return false; /* SHM-2 variation: to a dual-stack listener over TCP */
	}
	if (nk_nsm_port(&dest) == 0 || nk_nsm_is_any(&dest))
		return false;
	struct nk_nsm_sock *l = nk_nsm_pair_find(n, &dest);
	if (!l || !nk_nsm_is_local(&dest))
		return false; /* SHM-1: a peer that is not our tenant's is reached over TCP */
	struct sockaddr_storage peer;
	socklen_t plen = sizeof(peer);
	if (getpeername(s->fd, (struct sockaddr *)&peer, &plen) == 0 || errno != ENOTCONN)
		return false; /* connected over TCP before: Linux answers (EISCONN) */
	nk_nsm_serve_accepts(n, l); /* Linux connections that came first stay first (SHM-3) */
	if (!l->listening || (int)l->backlog.len >= l->backlog_max + 1) {
		if (n->placement == NK_PLACE_AUTO)
			return false; /* SHM-1: auto goes over TCP */
		nk_nsm_reply(n, call, -ECONNREFUSED);
		return true;
	}
	int64_t err = nk_nsm_pair_bind(s, &dest);
	if (err) {
		nk_nsm_reply(n, call, err);
		return true;
	}
	s->remote = dest;
	s->remote_len = nk_nsm_sa_len(family);
	s->paired = true;
	s->is_client = true;
	s->connects = 0;
	if (s->mask) { /* never in epoll from now on */
		epoll_ctl(n->epfd, EPOLL_CTL_DEL, s->fd, NULL);
		s->mask = 0;
	}
	nk_nsm_tc_add(n, s->vm_id, paired, 1); /* SHM-7 */
	nk_nsm_tc_add(n, s->vm_id, paired_now, 1);
	/* SHM-3: answered at once; its events follow the reply (NSM-17) */
	nk_nsm_start_reading(n, s, nk_nsm_reply(n, call, 0));
	struct nk_nsm_pending_conn c = { .fd = -1, .len = s->local_len, .client = s,
					 .dest_len = s->remote_len };
	memcpy(c.addr, &s->local, s->local_len);
	memcpy(c.dest, &s->remote, s->remote_len);
	s->pend_listener = l;
	q_push(&l->backlog, &c);
	if (l->accepts.len)
		nk_nsm_serve_accepts(n, l); /* a waiting ACCEPT takes it (NSM-7) */
	else
		nk_nsm_event(n, l, NK_OP_EV_ACCEPTABLE, l->backlog.len, 0, 0); /* NSM-15 */
	return true;
}

/* SHM-4: the server starts with the listener's options, as an accepted TCP socket does:
 * each option the listener holds with a value other than a fresh socket's is copied. */
static void nk_nsm_pair_inherit(const struct nk_nsm_sock *l, int fd)
{
	static const int opts[][2] = {
		{ SOL_SOCKET, SO_REUSEADDR }, { SOL_SOCKET, SO_KEEPALIVE },
		{ SOL_SOCKET, SO_LINGER }, { SOL_SOCKET, SO_RCVBUF }, { SOL_SOCKET, SO_SNDBUF },
		{ SOL_SOCKET, SO_OOBINLINE }, { SOL_SOCKET, SO_PRIORITY },
		{ SOL_SOCKET, SO_RCVLOWAT }, { SOL_SOCKET, SO_RCVTIMEO },
		{ SOL_SOCKET, SO_SNDTIMEO }, { SOL_SOCKET, SO_BROADCAST },
		{ SOL_SOCKET, SO_DONTROUTE }, { SOL_TCP, TCP_NODELAY }, { SOL_TCP, TCP_KEEPIDLE },
		{ SOL_TCP, TCP_KEEPINTVL }, { SOL_TCP, TCP_KEEPCNT }, { SOL_TCP, TCP_USER_TIMEOUT },
		{ SOL_TCP, TCP_LINGER2 }, { SOL_TCP, TCP_WINDOW_CLAMP }, { SOL_TCP, TCP_MAXSEG },
		{ SOL_IP, IP_TOS }, { SOL_IP, IP_TTL }, { SOL_IPV6, IPV6_V6ONLY },
		{ SOL_IPV6, IPV6_UNICAST_HOPS }, { SOL_IPV6, IPV6_TCLASS },
	};
	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
		int level = opts[i][0], name = opts[i][1];
		if ((level == SOL_IP && l->family != AF_INET) ||
		    (level == SOL_IPV6 && l->family != AF_INET6))
			continue;
		uint8_t want[32], have[32];
		socklen_t wl = sizeof(want), hl = sizeof(have);
		if (getsockopt(l->fd, level, name, want, &wl) < 0 ||
		    getsockopt(fd, level, name, have, &hl) < 0 || (wl == hl && !memcmp(want, have, wl)))
			continue;
		if (level == SOL_SOCKET && (name == SO_RCVBUF || name == SO_SNDBUF)) {
			int v;
			memcpy(&v, want, sizeof(v));
			v /= 2; /* getsockopt reads back twice what setsockopt was given */
			memcpy(want, &v, sizeof(v));
		}
		setsockopt(fd, level, name, want, wl);
	}
}

/* An end ends: EV_FIN and/or EV_ERROR ECONNRESET, once its gate is open (NSM-17) and in
 * the order they happened: a FIN (the peer shut down or closed), then a reset (SHM-9). */
static void nk_nsm_pair_ends(struct nk_nsm *n, struct nk_nsm_sock *r)
{
	if (r->closed || r->gated)
		return;
	if (r->want_fin && !r->fin_given && !r->reset_given) {
		r->fin_given = true;
		nk_nsm_event(n, r, NK_OP_EV_FIN, 0, 0, 0);
	}
	if (r->want_reset && !r->reset_given) {
		r->reset_given = true;
		nk_nsm_event(n, r, NK_OP_EV_ERROR, -ECONNRESET, 0, 0);
	}
}

/* SHM-9: r is reset (its peer aborted, or never came): its waiting SENDs are taken as
 * TCP's would have been before the RST, then EV_ERROR ECONNRESET. */
static void nk_nsm_pair_reset(struct nk_nsm *n, struct nk_nsm_sock *r)
{
	r->want_reset = true;
	r->rx_done = true;
	nk_nsm_pair_push(n, r);
}

/* SHM-9: a listener dropped the client's connection from its accept queue. */
static void nk_nsm_pair_orphan(struct nk_nsm *n, struct nk_nsm_sock *c)
{
	c->pend_listener = NULL;
	nk_nsm_pair_reset(n, c);
}

/* An ACCEPT takes the head of the listener's accept queue: a Linux connection, or a
 * paired one, for which the server end is made here (SHM-3, SHM-4). */
static void nk_nsm_take(struct nk_nsm *n, struct nk_nsm_sock *l, const struct nk_nsm_call *call,
			char *addr, uint32_t size)
{
	struct nk_nsm_pending_conn c = *(struct nk_nsm_pending_conn *)q_at(&l->backlog, 0);
	q_pop(&l->backlog, 1);
	if (addr)
		memcpy(addr, c.addr, c.len < size ? c.len : size);
	int64_t alen = addr ? c.len : 0; /* NSM-7: no buffer, 0 */
	if (c.fd >= 0) {
		nk_nsm_connection(n, l, call, c.fd, alen);
		return;
	}
	int fd = socket(l->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		nk_nsm_reply(n, call, -errno);
		if (c.client)
			nk_nsm_pair_orphan(n, c.client);
		return;
	}
	nk_nsm_pair_inherit(l, fd);
	struct nk_nsm_sock *s = nk_nsm_sock_new(n, call, (uint32_t)call->nqe.op_data, fd,
						l->family, true);
	s->paired = true;
	memcpy(&s->local, c.dest, c.dest_len); /* SHM-4: the address the client connected to */
	s->local_len = c.dest_len;
	memcpy(&s->remote, c.addr, c.len);      /* and the client's */
	s->remote_len = c.len;
	nk_nsm_tc_add(n, s->vm_id, paired, 1); /* SHM-7 */
	nk_nsm_tc_add(n, s->vm_id, paired_now, 1);
	struct nk_nsm_sock *client = c.client;
	if (client) {
		client->pend_listener = NULL;
		client->peer = s;
		s->peer = client;
		s->want_fin = client->wr_done; /* it shut down before the ACCEPT */
		s->rx_done = client->wr_done;
	} else if (c.gone_reset) {
		s->want_reset = s->rx_done = true;
	} else {
		s->want_fin = s->rx_done = true;
	}
	/* NSM-17: nothing arrives before the CoreEngine read the reply (nk_nsm_pair_opened) */
	nk_nsm_start_reading(n, s, nk_nsm_reply(n, call, alen));
}

/* The peer r has room again, or its gate opened: s's SENDs go on. */
static void nk_nsm_pair_opened(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	if (s->peer)
		nk_nsm_pair_push(n, s->peer);
	nk_nsm_pair_ends(n, s);
}

static void nk_nsm_pair_kicks(struct nk_nsm *n)
{
	while (n->kicks.len) {
		struct nk_nsm_sock *r = *(struct nk_nsm_sock **)q_at(&n->kicks, 0);
		q_pop(&n->kicks, 1);
		if (!r->closed && r->peer)
			nk_nsm_pair_push(n, r->peer);
	}
}

/* SHM-5, SHM-6: copy what fits of p into the peer's receive slice; true once p is
 * answered. The bytes are written into the peer tenant's buffer before its EV_DATA is
 * queued; the ring's release store at publication (nk_ring_push) orders them before it. */
static void nk_nsm_data(struct nk_nsm *n, struct nk_nsm_sock *s, struct nk_nsm_tenant *t,
			uint64_t off, uint32_t lent, uint32_t size, uint32_t prefix);

static bool nk_nsm_pair_try(struct nk_nsm *n, struct nk_nsm_sock *s, struct nk_nsm_send *p)
{
	bool nowait = p->flags & MSG_DONTWAIT;
	struct nk_nsm_sock *r = s->peer;
	if (!r && !s->pend_listener) { /* SHM-9: the peer is closed; TCP takes, RST follows */
		if (s->reset_given) {
			nk_nsm_reply(n, &p->call, p->done ? (int64_t)p->done : -EPIPE);
			return true;
		}
		nk_nsm_reply(n, &p->call, p->length);
		s->want_reset = s->rx_done = true; /* given after the SENDs waiting (pair_push) */
		return true;
	}
	if (r && r->rx_done) { /* it reads no more (SHUT_RD): taken and dropped */
		nk_nsm_reply(n, &p->call, p->length);
		return true;
	}
	struct nk_nsm_tenant *t = r ? n->tenants[r->vm_id] : NULL;
	if (r && !r->gated && t) { /* SHM-5: no server yet, or its ACCEPT reply unread: wait */
		while (p->done < p->length) {
			uint64_t room = nk_nsm_room(n, t, r); /* NSM-16, NSM-18 */
			uint64_t want = nk_nsm_min(nk_nsm_min(p->length - p->done, n->rx_chunk),
						   nk_nsm_min(room, alloc_largest_free(&t->pool)));
			uint64_t off = want ? alloc_get(&t->pool, (uint32_t)want, r->sock_id, r->serial)
					    : UINT64_MAX;
			if (off == UINT64_MAX)
				break;
			memcpy(t->data + off, p->payload + p->done, want); /* the one copy */
			nk_nsm_data(n, r, t, off, (uint32_t)want, (uint32_t)want, 0); /* NSM-15 */
			nk_nsm_tc_add(n, s->vm_id, shm_bytes_out, want); /* SHM-7 */
			nk_nsm_tc_add(n, r->vm_id, shm_bytes_in, want);
			p->done += (uint32_t)want;
		}
#ifdef NK_BROKEN_PAIR_DROP
		/* a broken variant (tests/test_fastpath_nsm.py): what does not fit is dropped */
		p->done = p->length;
#endif
		if (p->done >= p->length) {
			nk_nsm_reply(n, &p->call, p->length);
			return true;
		}
		nk_nsm_pause(n, r); /* SHM-6: a BUF_RETURN of r's tenant resumes us */
	}
	if (nowait) {
		nk_nsm_reply(n, &p->call, p->done ? (int64_t)p->done : -EAGAIN);
		return true;
	}
	return false;
}

/* Run s's waiting SENDs in order; then a deferred SHUT_WR gives the peer its FIN (SHM-8),
 * and s gets what it is owed (a reset after sending to a closed end, SHM-9). */
static void nk_nsm_pair_push(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	while (s->sendq.len && nk_nsm_pair_try(n, s, q_at(&s->sendq, 0)))
		q_pop(&s->sendq, 1);
	nk_nsm_pair_ends(n, s);
	if (!s->sendq.len && s->shut_wr_later) {
		s->shut_wr_later = false;
		s->wr_done = true;
		if (s->peer) {
			s->peer->want_fin = s->peer->rx_done = true;
			nk_nsm_pair_ends(n, s->peer);
		}
	}
}

/* At s's destroy: its peer sees the end, EV_FIN or (ABORT) a reset (SHM-8, SHM-9); a
 * client still in an accept queue is marked gone there; nothing keeps a pointer to s. */
static void nk_nsm_pair_unlink(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	if (s->in_listeners) {
		for (struct nk_nsm_sock **p = &n->listeners; *p; p = &(*p)->lnext) {
			if (*p == s) {
				*p = s->lnext;
				break;
			}
		}
		s->in_listeners = false;
	}
	if (!s->paired)
		return;
	nk_nsm_tc_sub(n, s->vm_id, paired_now, 1); /* SHM-7 */
	struct linger lg = { 0, 0 };
	socklen_t lglen = sizeof(lg);
	if (getsockopt(s->fd, SOL_SOCKET, SO_LINGER, &lg, &lglen) == 0 && lg.l_onoff &&
	    lg.l_linger == 0)
		s->close_abort = true; /* SO_LINGER {on, 0}: close(2) resets, as Linux's */
	struct nk_nsm_sock *l = s->pend_listener;
	if (l) {
		for (uint32_t i = 0; i < l->backlog.len; i++) {
			struct nk_nsm_pending_conn *c = q_at(&l->backlog, i);
			if (c->client == s) {
				c->client = NULL;
				c->gone_reset = s->close_abort;
			}
		}
		s->pend_listener = NULL;
	}
	struct nk_nsm_sock *r = s->peer;
	if (r) {
		s->peer = NULL;
		r->peer = NULL;
		if (s->close_abort) {
			nk_nsm_pair_reset(n, r);
		} else {
			r->want_fin = r->rx_done = true;
			nk_nsm_pair_push(n, r); /* its waiting SENDs meet the closed end (SHM-9) */
		}
	}
}

/* Calls on a paired end that its unconnected fd cannot answer as Linux would. */
static void nk_nsm_pair_bind_call(struct nk_nsm *n, const struct nk_nsm_call *call,
				  struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	(void)t;
	(void)s;
	nk_nsm_reply(n, call, -EINVAL); /* a connected socket is bound; listen(): EINVAL too */
}

static void nk_nsm_pair_connect_call(struct nk_nsm *n, const struct nk_nsm_call *call,
				     struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	char *addr;
	if (nk_nsm_address(t, call->nqe.data_ptr, call->nqe.size, &addr) < 0) {
		nk_nsm_reply(n, call, -EFAULT);
		return;
	}
	/* NSM-4: a client's handshake completed: 0 once, then EISCONN (an accepted one: EISCONN) */
	nk_nsm_reply(n, call, s->is_client && s->connects++ == 0 ? 0 : -EISCONN);
}

/* SHM-5, SHM-6: SEND on a paired end (NSM-6's order and MSG_DONTWAIT). */
static void nk_nsm_pair_send(struct nk_nsm *n, const struct nk_nsm_call *call,
			     struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	struct nk_nsm_send p;
	if (!nk_nsm_send_of(n, call, t, &p))
		return;
	if (s->wr_done || s->shut_wr_later) { /* after SHUT_WR, as Linux: EPIPE */
		nk_nsm_reply(n, call, -EPIPE);
		return;
	}
	p.dest = NULL; /* TCP ignores a destination */
	p.dest_len = 0;
	if (nk_nsm_send_behind(n, s, &p))
		return;
	if (!nk_nsm_pair_try(n, s, &p))
		q_push(&s->sendq, &p);
	nk_nsm_pair_ends(n, s);
}

/* SHM-8: SHUT_WR gives the peer EV_FIN after the bytes already sent; SHUT_RD ends what
 * this end receives (as the kernel NSM's read of a shut-down socket: EV_FIN). */
static void nk_nsm_pair_shutdown(struct nk_nsm *n, const struct nk_nsm_call *call,
				 struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	(void)t;
	uint64_t how = call->nqe.op_data;
	if (!nk_nsm_shut_how(n, call))
		return;
	if (s->reset_given) { /* a reset connection is closed: ENOTCONN, as Linux */
		nk_nsm_reply(n, call, -ENOTCONN);
		return;
	}
	nk_nsm_reply(n, call, 0);
	if (how != SHUT_WR && !s->rx_done) {
		s->want_fin = s->rx_done = true;
		nk_nsm_pair_ends(n, s);
	}
	if (how != SHUT_RD && !s->wr_done && !s->shut_wr_later) {
		s->shut_wr_later = true; /* NSM-6: the FIN goes after the queued bytes */
		nk_nsm_pair_push(n, s);
	}
}

/* SHM-4: a paired end's names are the ones stored at pairing. */
static void nk_nsm_pair_name(struct nk_nsm *n, const struct nk_nsm_call *call,
			     struct nk_nsm_tenant *t, struct nk_nsm_sock *s)
{
	const struct nk_nqe *q = &call->nqe;
	char *addr;
	if (nk_nsm_address(t, q->data_ptr, q->size, &addr) < 0) {
		nk_nsm_reply(n, call, -EFAULT);
		return;
	}
	bool peer = q->op == NK_OP_GETPEERNAME;
	if (peer && s->reset_given) {
		nk_nsm_reply(n, call, -ENOTCONN); /* reset: no longer connected */
		return;
	}
	const struct sockaddr_storage *a = peer ? &s->remote : &s->local;
	uint32_t len = peer ? s->remote_len : s->local_len;
	if (addr)
		memcpy(addr, a, len < q->size ? len : q->size);
	nk_nsm_reply(n, call, len);
}

/* Handlers for a paired end; NULL: the ordinary one (options, ACCEPT, CLOSE). */
static nk_nsm_handler nk_nsm_pair_handler_of(uint8_t op)
{
	switch (op) {
	case NK_OP_BIND:
	case NK_OP_LISTEN: return nk_nsm_pair_bind_call;
	case NK_OP_CONNECT: return nk_nsm_pair_connect_call;
	case NK_OP_SEND: return nk_nsm_pair_send;
	case NK_OP_SHUTDOWN: return nk_nsm_pair_shutdown;
	case NK_OP_GETSOCKNAME:
	case NK_OP_GETPEERNAME: return nk_nsm_pair_name;
	default: return NULL;
	}
}

/* KernelNSM.call: execute one socket call of a mapped tenant. */
static void nk_nsm_stack_call(struct nk_nsm *n, const struct nk_nsm_call *call,
			      struct nk_nsm_tenant *t)
{
	if (call->nqe.op == NK_OP_SOCKET) {
		nk_nsm_socket(n, call);
		return;
	}
	struct nk_nsm_sock *s = nk_nsm_find(n, call->nqe.vm_id, call->nqe.sock_id);
	if (!s) {
		nk_nsm_reply(n, call, -EBADF); /* NSM-8, NSM-14 */
		return;
	}
	nk_nsm_handler h = s->paired ? nk_nsm_pair_handler_of(call->nqe.op) : NULL;
	(h ? h : nk_nsm_handler_of(call->nqe.op))(n, call, t, s);
}

static void nk_nsm_tenant_unmapped(struct nk_nsm *n, uint8_t vm)
{
	for (uint32_t b = 0; b < n->nbuckets; b++) {
		struct nk_nsm_sock *s = n->buckets[b];
		while (s) {
			struct nk_nsm_sock *next = s->hnext;
			if (s->vm_id == vm)
				nk_nsm_destroy(n, s, 0);
			s = next;
		}
	}
	if (n->tenants[vm])
		n->tenants[vm]->starved.len = 0;
}

/* ---------------------------------------------------------------------------------------
 * Readiness (KernelNSM._writable, _readable, ...).
 */
static void nk_nsm_writable(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	if (s->has_connect) {
		struct nk_nsm_call call = s->connect;
		s->has_connect = false;
		int64_t err = nk_nsm_pending_error(s->fd); /* NSM-4: as SO_ERROR reads it */
		s->connect_failed = err != 0;
		if (err)
			nk_nsm_reply(n, &call, err);
		else
			nk_nsm_start_reading(n, s, nk_nsm_reply(n, &call, 0));
	}
	while (s->sendq.len && nk_nsm_try_send(n, s, q_at(&s->sendq, 0)))
		q_pop(&s->sendq, 1);
	if (!s->sendq.len && s->shut_wr_later) {
		s->shut_wr_later = false;
		shutdown(s->fd, SHUT_WR);
	}
	nk_nsm_update(n, s);
}

/* A stream's end: EOF is EV_FIN, an error EV_ERROR(-errno); reading stops (NSM-15). */
static bool nk_nsm_end(struct nk_nsm *n, struct nk_nsm_sock *s, int64_t result)
{
	s->reading = false;
	if (result == 0)
		nk_nsm_event(n, s, NK_OP_EV_FIN, 0, 0, 0);
	else
		nk_nsm_event(n, s, NK_OP_EV_ERROR, result, 0, 0);
	return false;
}

static void nk_nsm_data(struct nk_nsm *n, struct nk_nsm_sock *s, struct nk_nsm_tenant *t,
			uint64_t off, uint32_t lent, uint32_t size, uint32_t prefix)
{
	t->pool.lent[(off - t->pool.base) / t->pool.granule].named = size; /* BUF-4 */
	if (!s->rx_bytes)
		n->holders[s->vm_id]++; /* NSM-18 */
	s->rx_bytes += lent;
	nk_nsm_event(n, s, NK_OP_EV_DATA, prefix, off, size);
}

static void nk_nsm_unsend(struct nk_nsm_tenant *t, uint64_t off)
{
	alloc_put(&t->pool, (uint32_t)((off - t->pool.base) / t->pool.granule));
}

/* One recv into a fresh receive buffer; true if more may be waiting. */
static bool nk_nsm_read_stream(struct nk_nsm *n, struct nk_nsm_sock *s, struct nk_nsm_tenant *t)
{
	uint64_t room = nk_nsm_room(n, t, s); /* NSM-16, NSM-18 */
	if (!room)
		return nk_nsm_pause(n, s);
	int avail = 0;
	if (ioctl(s->fd, FIONREAD, &avail) < 0)
		avail = -errno;
	if (avail <= 0) {
		char one;
		int64_t state = nk_nsm_rc(recv(s->fd, &one, 1, MSG_PEEK | MSG_DONTWAIT));
		if (state == -EAGAIN)
			return false;
		if (state <= 0)
			return nk_nsm_end(n, s, state);
		avail = (int)state;
	}
	uint64_t want = nk_nsm_min(nk_nsm_min((uint64_t)avail, n->rx_chunk),
				   nk_nsm_min(room, alloc_largest_free(&t->pool)));
	uint64_t off = want ? alloc_get(&t->pool, (uint32_t)want, s->sock_id, s->serial)
			    : UINT64_MAX;
	if (off == UINT64_MAX)
		return nk_nsm_pause(n, s);
	int64_t got = nk_nsm_rc(recv(s->fd, t->data + off, want, MSG_DONTWAIT));
	if (got <= 0) {
		nk_nsm_unsend(t, off);
		return got == -EAGAIN ? false : nk_nsm_end(n, s, got);
	}
	nk_nsm_data(n, s, t, off, (uint32_t)want, (uint32_t)got, 0);
	nk_nsm_tc_add(n, s->vm_id, stack_bytes_in, got); /* SHM-7 */
	return (uint64_t)got == want;
}

/* One datagram, behind its source sockaddr, into a fresh receive buffer (NQE-15). */
static bool nk_nsm_read_datagram(struct nk_nsm *n, struct nk_nsm_sock *s, struct nk_nsm_tenant *t)
{
	uint64_t room = nk_nsm_room(n, t, s); /* NSM-16, NSM-18 */
	if (!room)
		return nk_nsm_pause(n, s);
	int64_t size = nk_nsm_rc(recv(s->fd, NULL, 0, MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT));
	if (size == -EAGAIN)
		return false;
	if (size < 0) { /* an ICMP error (ECONNREFUSED...): the socket stays usable */
		nk_nsm_event(n, s, NK_OP_EV_ERROR, size, 0, 0);
		return true;
	}
	uint32_t prefix = s->family == AF_INET ? 16 : 28;
	uint64_t want = nk_nsm_min(prefix + (uint64_t)size, t->grant_size); /* larger: truncated */
	if (want > room && s->rx_bytes) /* never split: whole to a socket holding none (NSM-18) */
		return nk_nsm_pause(n, s);
	uint64_t off = alloc_get(&t->pool, (uint32_t)want, s->sock_id, s->serial);
	if (off == UINT64_MAX)
		return nk_nsm_pause(n, s);
	char *addr = t->data + off;
	socklen_t alen = prefix;
	int64_t got = nk_nsm_rc(recvfrom(s->fd, addr + prefix, want - prefix, MSG_DONTWAIT,
					 (struct sockaddr *)addr, &alen));
	if (got < 0) {
		nk_nsm_unsend(t, off);
		if (got != -EAGAIN)
			nk_nsm_event(n, s, NK_OP_EV_ERROR, got, 0, 0);
		return got != -EAGAIN;
	}
	nk_nsm_data(n, s, t, off, (uint32_t)want, prefix + (uint32_t)got, prefix);
	nk_nsm_tc_add(n, s->vm_id, stack_bytes_in, got); /* SHM-7 */
	return true;
}

static bool nk_nsm_transient_accept(int rc)
{
	return rc == -ECONNABORTED || rc == -EPROTO || rc == -EINTR;
}

/* Hand pending connections to waiting ACCEPTs, else keep them and say EV_ACCEPTABLE. */
static void nk_nsm_serve_accepts(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	bool grew = false;
	for (;;) {
		if (s->accepts.len) {
			struct nk_nsm_call call = *(struct nk_nsm_call *)q_at(&s->accepts, 0);
			struct nk_nsm_tenant *t = n->tenants[call.nqe.vm_id];
			char *addr = NULL;
			if (t && nk_nsm_address(t, call.nqe.data_ptr, call.nqe.size, &addr) < 0)
				addr = NULL;
			if (s->backlog.len) { /* SHM-3: a paired connection, in FIFO order */
				q_pop(&s->accepts, 1);
				nk_nsm_take(n, s, &call, addr, addr ? call.nqe.size : 0);
				continue;
			}
			int64_t alen;
			int fd = nk_nsm_accept4(s->fd, addr, addr ? call.nqe.size : 0, &alen);
			if (fd >= 0) {
				q_pop(&s->accepts, 1);
				nk_nsm_connection(n, s, &call, fd, alen);
				continue;
			}
			if (fd == -EAGAIN)
				break;
			if (!nk_nsm_transient_accept(fd)) {
				q_pop(&s->accepts, 1);
				nk_nsm_reply(n, &call, fd);
			}
			continue;
		}
		if (!s->listening || (int)s->backlog.len >= s->backlog_cap)
			break;
		int64_t alen;
		int fd = nk_nsm_accept4(s->fd, n->scratch, sizeof(n->scratch), &alen);
		if (fd >= 0) {
			struct nk_nsm_pending_conn c = { .fd = fd };
			c.len = (uint32_t)nk_nsm_min((uint64_t)alen, sizeof(c.addr));
			memcpy(c.addr, n->scratch, c.len);
			q_push(&s->backlog, &c);
			grew = true;
		} else if (fd == -EAGAIN) {
			break;
		} else if (!nk_nsm_transient_accept(fd)) {
			s->accept_stalled = true; /* the next ACCEPT call retries and gets the errno */
			break;
		}
	}
	if (grew)
		nk_nsm_event(n, s, NK_OP_EV_ACCEPTABLE, s->backlog.len, 0, 0);
	nk_nsm_update(n, s);
}

static void nk_nsm_readable(struct nk_nsm *n, struct nk_nsm_sock *s)
{
	if (s->listening || s->accepts.len) {
		nk_nsm_serve_accepts(n, s);
		return;
	}
	struct nk_nsm_tenant *t = n->tenants[s->vm_id];
	if (!t || !s->reading || s->paused || s->gated)
		return;
	for (int i = 0; i < NK_NSM_READS_PER_EVENT; i++)
		if (!(s->stream ? nk_nsm_read_stream(n, s, t) : nk_nsm_read_datagram(n, s, t)))
			break;
	nk_nsm_update(n, s);
}

/* ---------------------------------------------------------------------------------------
 * Calls in (ServiceLib.poll / _dispatch / _malformed).
 */
static bool nk_nsm_is_event(uint8_t op)
{
	return op >= NK_OP_EV_DATA && op <= NK_OP_EV_ACCEPTABLE;
}

/* NSM-10: a malformed request is answered, a malformed reply or event dropped. */
static void nk_nsm_malformed(struct nk_nsm *n, const struct nk_nsm_call *call, int err)
{
	n->c.malformed++;
	if ((call->nqe.op & NK_REPLY_BIT) || nk_nsm_is_event(call->nqe.op))
		return;
	nk_nsm_reply(n, call, err);
}

static void nk_nsm_dispatch(struct nk_nsm *n, const struct nk_nsm_call *call)
{
	const struct nk_nqe *q = &call->nqe;
	n->c.nqe_in++;
	int err = nk_nqe_check(q, NULL); /* NQE-10, NQE-11 */
	if (err) {
		nk_nsm_malformed(n, call, err);
		return;
	}
	if ((q->op & NK_REPLY_BIT) || nk_nsm_is_event(q->op)) {
		n->c.dropped++; /* NQE-12, SEC-7: replies and events are never answered */
		return;
	}
	switch (q->op) {
	case NK_OP_TENANT_MAP: nk_nsm_tenant_map(n, call); return;
	case NK_OP_TENANT_UNMAP: nk_nsm_tenant_unmap(n, call); return;
	case NK_OP_BUF_RETURN: nk_nsm_buf_return(n, call); return;
	default: break;
	}
	if (q->op >= NK_OP_SOCKET && q->op <= NK_OP_GETPEERNAME) {
		struct nk_nsm_tenant *t = n->tenants[q->vm_id];
		if (!t)
			nk_nsm_reply(n, call, -EFAULT); /* NSM-11: no area, no buffer inside it */
		else
			nk_nsm_stack_call(n, call, t);
		return;
	}
	nk_nsm_reply(n, call, -EINVAL); /* NSM-10: ATTACH, DETACH are not an NSM's to answer */
}

static uint32_t nk_nsm_poll(struct nk_nsm *n)
{
	struct nk_nqe batch[NK_NSM_BATCH];
	uint32_t done = 0;
	for (uint32_t i = 0; i < n->n_qsets * 2; i++) {
		int64_t k = nk_ring_pop(&n->in[i], batch, NK_NSM_BATCH);
		if (k < 0) {
			n->fatal = (int)k; /* RING-10: read no slot of it, stop serving */
			return done;
		}
		for (int64_t j = 0; j < k; j++) {
			struct nk_nsm_call call = { batch[j], (uint8_t)(i / 2),
						    i % 2 ? NK_RING_RECEIVE : NK_RING_COMPLETION };
			nk_nsm_dispatch(n, &call);
		}
		if (k > 0)
			done += (uint32_t)k;
	}
	return done;
}

/* ---------------------------------------------------------------------------------------
 * The bell thread, and the loop.
 */
static void *nk_nsm_watch(void *arg)
{
	struct nk_nsm *n = arg;
	uint32_t *seen = n->bells_seen, now[NK_BELL_WAITV_MAX];
	uint32_t nb = n->n_qsets < NK_BELL_WAITV_MAX ? n->n_qsets : NK_BELL_WAITV_MAX;
	while (!atomic_load_explicit(&n->quit, memory_order_acquire)) {
		bool changed = false;
		for (uint32_t q = 0; q < nb; q++) {
			now[q] = nk_bell_value(n->device_bells[q]);
			changed |= now[q] != seen[q];
		}
		if (changed) {
			memcpy(seen, now, sizeof(uint32_t) * nb);
			atomic_fetch_add_explicit(&n->bell_wakeups, 1, memory_order_relaxed);
			uint64_t one = 1;
			if (write(n->wake_fd, &one, sizeof(one)) < 0) {
				/* EAGAIN: the counter is saturated, the loop is awake anyway */
			}
		}
		/* DEV-9: sleep while every bell still holds the value we compared */
		int rc;
		if (nb == 1) {
			rc = nk_bell_wait(n->device_bells[0], now[0], NK_NSM_BELL_SLEEP_NS);
		} else {
			struct timespec dl;
			clock_gettime(CLOCK_MONOTONIC, &dl);
			dl.tv_nsec += NK_NSM_BELL_SLEEP_NS;
			dl.tv_sec += dl.tv_nsec / 1000000000;
			dl.tv_nsec %= 1000000000;
			rc = nk_bell_wait_any(n->device_bells, now, nb, &dl);
			if (rc == -ENOSYS) /* no futex_waitv: poll the bells */
				nk_bell_wait(n->device_bells[0], now[0], 1000000);
		}
	}
	return NULL;
}

static int64_t nk_nsm_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* RING-6: NEED_WAKEUP on every incoming ring; false if one has work (no sleep then). */
static bool nk_nsm_prepare_sleep(struct nk_nsm *n)
{
	bool ok = true;
	for (uint32_t i = 0; i < n->n_qsets * 2; i++) {
		int rc = nk_ring_prepare_sleep(&n->in[i]);
		if (rc < 0)
			n->fatal = rc;
		if (rc != 1)
			ok = false;
	}
	return ok;
}

static void nk_nsm_finish_sleep(struct nk_nsm *n)
{
	for (uint32_t i = 0; i < n->n_qsets * 2; i++)
		nk_ring_finish_sleep(&n->in[i]); /* RING-11 */
}

static bool nk_nsm_control_lost(struct nk_nsm *n)
{
	char buf[4096];
	for (;;) {
		ssize_t r = recv(n->control_fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (r == 0)
			return true;
		if (r < 0)
			return !(errno == EAGAIN || errno == EINTR);
	}
}

static void nk_nsm_ready(struct nk_nsm *n, const struct epoll_event *ev)
{
	void *what = ev->data.ptr;
	if (what == &nk_nsm_tag_wake) {
		uint64_t v;
		if (read(n->wake_fd, &v, sizeof(v)) < 0) {
			/* EAGAIN: already drained */
		}
	} else if (what == &nk_nsm_tag_control) {
		if (nk_nsm_control_lost(n)) {
			n->lost = true; /* NSM-2: never serve a CoreEngine that is gone */
			atomic_store(&n->stop, true);
		}
	} else if (what == &nk_nsm_tag_stop) {
		atomic_store(&n->stop, true);
	} else {
		struct nk_nsm_sock *s = what;
		uint32_t interest = s->mask;
		/* as Python's selectors reads epoll: ERR/HUP wake both directions */
		bool w = (ev->events & ~(uint32_t)EPOLLIN) && (interest & EPOLLOUT);
		bool r = (ev->events & ~(uint32_t)EPOLLOUT) && (interest & EPOLLIN);
		if (s->closed)
			return;
		if (w)
			nk_nsm_writable(n, s);
		if (r && !s->closed)
			nk_nsm_readable(n, s);
	}
}

static int nk_nsm_add_fd(struct nk_nsm *n, int fd, void *tag)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = tag };
	return epoll_ctl(n->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int nk_nsm_run(struct nk_nsm *n)
{
	if (!n->watching) {
		/* DEV-9: the bells' values before the loop's first re-check of the rings, read
		 * here and not in the new thread, which may run later than a ring */
		for (uint32_t q = 0; q < n->n_qsets && q < NK_BELL_WAITV_MAX; q++)
			n->bells_seen[q] = nk_bell_value(n->device_bells[q]);
		atomic_store(&n->quit, false);
		int rc = pthread_create(&n->watcher, NULL, nk_nsm_watch, n);
		if (rc)
			return -rc;
		n->watching = true;
	}
	struct epoll_event evs[64];
	int64_t idle_since = -1;
	while (!atomic_load_explicit(&n->stop, memory_order_acquire) && !n->fatal) {
		bool sleeping = false;
		int timeout = 0;
		if (idle_since >= 0 && nk_nsm_now_ns() - idle_since >= n->spin_ns) {
			sleeping = nk_nsm_prepare_sleep(n);
			timeout = nk_nsm_pending_outputs(n) ? NK_NSM_BUSY_SLEEP_MS : NK_NSM_MAX_SLEEP_MS;
		}
		bool worked = nk_nsm_poll(n) > 0;
		nk_nsm_open_gates(n);
		if (!sleeping || worked)
			timeout = 0;
		else if (n->gated.len && timeout > NK_NSM_BUSY_SLEEP_MS)
			timeout = NK_NSM_BUSY_SLEEP_MS;
		nk_nsm_flush(n);
		int k = epoll_wait(n->epfd, evs, 64, timeout);
		if (sleeping)
			nk_nsm_finish_sleep(n);
		for (int i = 0; i < k; i++)
			nk_nsm_ready(n, &evs[i]);
		nk_nsm_flush(n);
		nk_nsm_reap(n);
		if (worked || k > 0)
			idle_since = -1;
		else if (idle_since < 0)
			idle_since = nk_nsm_now_ns();
	}
	atomic_store_explicit(&n->quit, true, memory_order_release);
	pthread_join(n->watcher, NULL);
	n->watching = false;
	if (n->fatal)
		return n->fatal;
	return n->lost ? NK_NSM_LOST : NK_NSM_STOPPED;
}

void nk_nsm_stop(struct nk_nsm *n)
{
	atomic_store_explicit(&n->stop, true, memory_order_release);
	uint64_t one = 1;
	if (write(n->wake_fd, &one, sizeof(one)) < 0) {
		/* saturated: the loop wakes anyway */
	}
}

void nk_nsm_set_rx(struct nk_nsm *n, uint32_t rx_chunk, uint64_t rx_cap)
{
	n->rx_chunk = rx_chunk ? rx_chunk : NK_NSM_RX_CHUNK;
	n->rx_cap = rx_cap;
}

void nk_nsm_get_counters(const struct nk_nsm *n, struct nk_nsm_counters *out)
{
	*out = n->c;
	out->bell_wakeups = atomic_load_explicit(&n->bell_wakeups, memory_order_relaxed);
	out->sockets = n->nsocks;
}

int nk_nsm_set_placement(struct nk_nsm *n, int placement)
{
	if (placement < NK_PLACE_KERNEL || placement > NK_PLACE_SHM)
		return -EINVAL;
	n->placement = placement;
	return 0;
}

int nk_nsm_get_tenant_counters(const struct nk_nsm *n, uint8_t vm,
			       struct nk_nsm_tenant_counters *out)
{
	if (!__atomic_load_n(&n->tc_mapped[vm], __ATOMIC_RELAXED))
		return -ENOENT;
	for (size_t f = 0; f < sizeof(*out) / sizeof(uint64_t); f++)
		((uint64_t *)out)[f] = __atomic_load_n(&((const uint64_t *)&n->tc[vm])[f],
						       __ATOMIC_RELAXED);
	return 0;
}

struct nk_nsm *nk_nsm_new(void *base, uint64_t len, const char *runtime, int control_fd,
			  int stop_fd)
{
	struct nk_geometry g;
	if (!base || !runtime || strlen(runtime) >= PATH_MAX ||
	    nk_nsm_check_header(base, len, &g) < 0 || g.kind != NK_KIND_NSM) {
		errno = EINVAL;
		return NULL;
	}
	struct nk_nsm *n = calloc(1, sizeof(*n));
	if (!n)
		return NULL;
	n->base = base;
	n->len = len;
	n->n_qsets = g.n_qsets;
	strcpy(n->runtime, runtime);
	n->control_fd = control_fd;
	n->stop_fd = stop_fd;
	n->rx_chunk = NK_NSM_RX_CHUNK;
	const char *spin = getenv("NK_NSM_SPIN_US"); /* tuning, for bench/ */
	n->spin_ns = spin && *spin ? (int64_t)strtoull(spin, NULL, 10) * 1000 : NK_NSM_SPIN_NS;
	n->nbuckets = 256;
	n->buckets = calloc(n->nbuckets, sizeof(*n->buckets));
	n->in = calloc(g.n_qsets * 2, sizeof(*n->in));
	n->out = calloc(g.n_qsets * 2, sizeof(*n->out));
	n->device_bells = calloc(g.n_qsets, sizeof(uint32_t *));
	n->engine_bells = calloc(g.n_qsets, sizeof(uint32_t *));
	n->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	n->epfd = epoll_create1(EPOLL_CLOEXEC);
	q_init(&n->held, sizeof(struct nk_nsm_held));
	q_init(&n->gated, sizeof(struct nk_nsm_sock *));
	q_init(&n->kicks, sizeof(struct nk_nsm_sock *));
	if (!n->buckets || !n->in || !n->out || !n->device_bells || !n->engine_bells ||
	    n->wake_fd < 0 || n->epfd < 0)
		goto fail;
	for (uint32_t q = 0; q < g.n_qsets; q++) {
		n->device_bells[q] = (uint32_t *)(n->base + nk_geo_bell_offset(&g, q, NK_BELL_DEVICE));
		n->engine_bells[q] = (uint32_t *)(n->base + nk_geo_bell_offset(&g, q, NK_BELL_ENGINE));
		/* DEV-8: we consume COMPLETION and RECEIVE, produce JOB and SEND */
		nk_ring_init(&n->in[q * 2], n->base + nk_geo_ring_offset(&g, q, NK_RING_COMPLETION),
			     g.ring_entries);
		nk_ring_init(&n->in[q * 2 + 1], n->base + nk_geo_ring_offset(&g, q, NK_RING_RECEIVE),
			     g.ring_entries);
		nk_ring_init(&n->out[q * 2].ring, n->base + nk_geo_ring_offset(&g, q, NK_RING_JOB),
			     g.ring_entries);
		nk_ring_init(&n->out[q * 2 + 1].ring, n->base + nk_geo_ring_offset(&g, q, NK_RING_SEND),
			     g.ring_entries);
		q_init(&n->out[q * 2].box, sizeof(struct nk_nqe));
		q_init(&n->out[q * 2 + 1].box, sizeof(struct nk_nqe));
	}
	if (nk_nsm_add_fd(n, n->wake_fd, &nk_nsm_tag_wake) < 0 ||
	    (control_fd >= 0 && nk_nsm_add_fd(n, control_fd, &nk_nsm_tag_control) < 0) ||
	    (stop_fd >= 0 && nk_nsm_add_fd(n, stop_fd, &nk_nsm_tag_stop) < 0))
		goto fail;
	return n;
fail:
	{
		int err = errno ? errno : ENOMEM;
		nk_nsm_free(n);
		errno = err;
		return NULL;
	}
}

void nk_nsm_free(struct nk_nsm *n)
{
	if (!n)
		return;
	if (n->watching) {
		atomic_store_explicit(&n->quit, true, memory_order_release);
		pthread_join(n->watcher, NULL);
	}
	for (uint32_t vm = 0; vm < 256; vm++) {
		if (n->tenants[vm]) {
			nk_nsm_tenant_unmapped(n, (uint8_t)vm);
			nk_nsm_tenant_free(n->tenants[vm]);
			n->tenants[vm] = NULL;
		}
	}
	for (uint32_t b = 0; n->buckets && b < n->nbuckets; b++) /* sockets of no tenant */
		while (n->buckets[b])
			nk_nsm_destroy(n, n->buckets[b], 0);
	nk_nsm_reap(n);
	for (uint32_t i = 0; n->out && i < n->n_qsets * 2; i++)
		q_free(&n->out[i].box);
	q_free(&n->held);
	q_free(&n->gated);
	q_free(&n->kicks);
	if (n->wake_fd >= 0)
		close(n->wake_fd);
	if (n->epfd >= 0)
		close(n->epfd);
	free(n->buckets);
	free(n->in);
	free(n->out);
	free(n->device_bells);
	free(n->engine_bells);
	free(n);
}
