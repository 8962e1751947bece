/* The minimal synchronous C tenant (include/nk/tenant.h). The judge of its
 * behaviour is reference/guestlib.py: same NQEs, same buffer discipline. */
#include "nk/tenant.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nk/bell.h"
#include "nk/bufpool.h"
#include "nk/device.h"
#include "nk/nqe.h"
#include "nk/outbox.h"
#include "nk/tqueue.h"
#include "nk/ring.h"

#define QSET 0             /* every NQE on queue set 0: SENDs stay ordered (NQE-16) */
#define CALL_HEADROOM 16   /* call slots data SENDs leave to control calls */
#define SOCKADDR_ROOM 28   /* sockaddr_in6 holds either family (NQE-15) */
#define POLL_BATCH 64
#define SLEEP_SLICE_NS 50000000LL /* GuestLib's WAIT_SLICE: re-check engine.sock */
#define MAX_TAGS 65536u           /* a tag is 16 bits (NQE-5) */
#define SEND_LOCAL_FLAGS (MSG_DONTWAIT | MSG_NOSIGNAL) /* the tenant's business, never sent */

struct rx {
	uint64_t off;  /* the EV_DATA span, returned as is (BUF-4) */
	uint32_t size;
	uint32_t pos;  /* next unread byte, from off */
};

struct sock {
	bool used, closed, close_sent, fin, unread;
	bool broken;           /* a send failed: every later send is EPIPE (SOCK-6) */
	int err;               /* pending asynchronous error (SO_ERROR), as errno */
	uint32_t sends;        /* SENDs in flight */
	uint64_t acceptable;   /* EV_ACCEPTABLE's count: a hint only */
	struct rx *rx;         /* FIFO of held EV_DATA buffers */
	uint32_t rx_head, rx_len, rx_cap;
};

struct call {
	uint32_t sock_id;
	uint8_t op;
	bool used, done;
	int64_t result;
	uint64_t buf;  /* send-half buffer lent with the request (BUF-3), if size */
	uint32_t size;
};

struct nk_tenant {
	struct nk_tqueue q; /* queue set QSET of the device */
	struct nk_bufpool *pool;
	struct call *calls;
	uint32_t ncalls, *free_tags, nfree;
	struct sock *socks;  /* socks[id - 1] */
	uint32_t nsocks, next_id;
	int64_t spin_ns;
	uint32_t max_sends, send_batch;
	int control_fd;
	int dead;  /* errno once the CoreEngine is gone (GL-9) */
	struct nk_tenant_stats st;
};

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

/* ---- sockets ------------------------------------------------------------------ */

static struct sock *sock_of(struct nk_tenant *t, uint32_t id)
{
	if (id == 0 || id > t->nsocks || !t->socks[id - 1].used)
		return NULL;
	return &t->socks[id - 1];
}

/* A socket ID of ours: non-zero, not in use (NQE-7); the lowest free one. */
static int sock_new(struct nk_tenant *t)
{
	for (uint32_t i = 0; i < t->nsocks; i++) {
		if (!t->socks[i].used) {
			memset(&t->socks[i], 0, sizeof(t->socks[i]));
			t->socks[i].used = true;
			return (int)i + 1;
		}
	}
	uint32_t n = t->nsocks ? t->nsocks * 2 : 16;
	if (n > 1u << 20)
		return -EMFILE;
	struct sock *s = realloc(t->socks, n * sizeof(*s));
	if (!s)
		return -ENOMEM;
	memset(s + t->nsocks, 0, (n - t->nsocks) * sizeof(*s));
	t->socks = s;
	uint32_t id = t->nsocks + 1;
	t->nsocks = n;
	s[id - 1].used = true;
	return (int)id;
}

static void sock_forget(struct nk_tenant *t, uint32_t id)
{
	struct sock *s = sock_of(t, id);
	if (s) {
		free(s->rx);
		memset(s, 0, sizeof(*s));
	}
}

static int rx_push(struct sock *s, uint64_t off, uint32_t size, uint32_t pos)
{
	if (s->rx_len == s->rx_cap) {
		uint32_t n = s->rx_cap ? s->rx_cap * 2 : 16;
		struct rx *q = malloc(n * sizeof(*q));
		if (!q)
			return -ENOMEM;
		for (uint32_t i = 0; i < s->rx_len; i++)
			q[i] = s->rx[(s->rx_head + i) % s->rx_cap];
		free(s->rx);
		s->rx = q;
		s->rx_head = 0;
		s->rx_cap = n;
	}
	s->rx[(s->rx_head + s->rx_len) % s->rx_cap] = (struct rx){ off, size, pos };
	s->rx_len++;
	return 0;
}

/* ---- submission ----------------------------------------------------------------- */

/* Publish what waits in the outbox (nk/outbox.h). Never blocks. */
static int outbox_flush(struct nk_tenant *t, struct nk_outbox *b)
{
	int64_t n = nk_outbox_flush(b, t->q.engine_bell, &t->st.bells);
	if (n < 0)
		return (int)n; /* RING-10 */
	t->st.requests += (uint64_t)n;
	return 0;
}

static int flush_all(struct nk_tenant *t)
{
	int rc = outbox_flush(t, &t->q.job);
	return rc < 0 ? rc : outbox_flush(t, &t->q.send);
}

static void buf_return(struct nk_tenant *t, uint64_t off, uint32_t size)
{
	struct nk_nqe n = { .op = NK_OP_BUF_RETURN, .qset = QSET, .data_ptr = off, .size = size };
	t->st.buf_returns++;
	if (nk_outbox_add(&t->q.send, &n) < 0)
		t->dead = ENOMEM; /* cannot give the buffer back: the device is unusable */
}

/* ---- calls in flight (NQE-9: the tag is the slot) -------------------------------- */

static int call_new(struct nk_tenant *t, uint8_t op, uint32_t sock_id, bool data)
{
	if (t->nfree <= (data ? CALL_HEADROOM : 0))
		return -EAGAIN;
	uint32_t tag = t->free_tags[--t->nfree];
	t->calls[tag] = (struct call){ .sock_id = sock_id, .op = op, .used = true };
	return (int)tag;
}

static void call_free(struct nk_tenant *t, uint32_t tag)
{
	struct call *c = &t->calls[tag];
	if (c->size)
		nk_bufpool_free(t->pool, c->buf, NULL);
	c->used = false;
	c->size = 0;
	t->free_tags[t->nfree++] = tag;
}

/* Queue call `tag`'s request in the outbox of its ring (DEV-8); published at the
 * next flush. */
static int queue_call(struct nk_tenant *t, uint32_t tag, uint64_t op_data, struct nk_outbox **box)
{
	struct call *c = &t->calls[tag];
	struct nk_nqe n = { .op = c->op, .qset = QSET, .sock_id = c->sock_id, .op_data = op_data,
			    .data_ptr = c->size ? c->buf : 0, .size = c->size, .tag = (uint16_t)tag };
	*box = c->op == NK_OP_SEND ? &t->q.send : &t->q.job;
	return nk_outbox_add(*box, &n);
}

static int publish(struct nk_tenant *t, uint32_t tag, uint64_t op_data)
{
	struct nk_outbox *b;
	int rc = queue_call(t, tag, op_data, &b);
	return rc < 0 ? rc : outbox_flush(t, b);
}

static void send_close(struct nk_tenant *t, uint32_t id, struct sock *s)
{
	s->close_sent = true;
	int tag = call_new(t, NK_OP_CLOSE, id, false);
	if (tag < 0 || publish(t, (uint32_t)tag, s->unread ? NK_CLOSE_ABORT : 0) < 0)
		sock_forget(t, id); /* no way to tell the NSM: the detach will (NSM-12) */
}

/* ---- the dispatcher ----------------------------------------------------------------- */

static void complete(struct nk_tenant *t, uint32_t tag, int64_t result)
{
	struct call *c = &t->calls[tag];
	struct sock *s = sock_of(t, c->sock_id);
	switch (c->op) {
	case NK_OP_SEND: /* BUF-3: the buffer is ours again */
		if (s) {
			s->sends--;
			if (!s->closed && !s->err && result < 0)
				s->err = (int)-result;
			else if (!s->closed && !s->err && result < c->size)
				s->err = EPIPE; /* the stack took part of it: the connection broke */
			if (s->closed && !s->close_sent && s->sends == 0) {
				call_free(t, tag);
				send_close(t, c->sock_id, s);
				return;
			}
		}
		call_free(t, tag);
		return;
	case NK_OP_CLOSE: /* the socket ID may be reused once the reply is read */
		sock_forget(t, c->sock_id);
		call_free(t, tag);
		return;
	default: /* a synchronous caller waits for it */
		c->done = true;
		c->result = result;
	}
}

static void dispatch(struct nk_tenant *t, const struct nk_nqe *n)
{
	if (n->op & NK_REPLY_BIT) {
		struct call *c = n->tag < t->ncalls ? &t->calls[n->tag] : NULL;
		if (c && c->used && !c->done && c->sock_id == n->sock_id) {
			t->st.replies++;
			complete(t, n->tag, nk_nqe_result(n));
		} else {
			t->st.unmatched++; /* BUF_RETURN|0x80 (BUF-5) or a stray reply */
		}
		return;
	}
	t->st.events++;
	struct sock *s = sock_of(t, n->sock_id);
	switch (n->op) {
	case NK_OP_EV_DATA: {
		uint64_t prefix = n->op_data; /* a datagram's source address: skipped */
		if (s && !s->closed && prefix <= n->size &&
		    rx_push(s, n->data_ptr, n->size, (uint32_t)prefix) == 0)
			return;
		if (s && s->closed)
			s->unread = true; /* Linux resets on data after close */
		buf_return(t, n->data_ptr, n->size); /* nobody will read it */
		return;
	}
	case NK_OP_EV_FIN:
		if (s)
			s->fin = true;
		return;
	case NK_OP_EV_ERROR: {
		int64_t r = nk_nqe_result(n);
		int err = r < 0 && r >= -4095 ? (int)-r : EIO;
		if (n->sock_id == NK_SOCK_NONE) { /* the NSM is gone: every socket (CE-19) */
			for (uint32_t i = 0; i < t->nsocks; i++)
				if (t->socks[i].used && !t->socks[i].closed)
					t->socks[i].err = err;
		} else if (s && !s->closed) {
			s->err = err;
		}
		return;
	}
	case NK_OP_EV_ACCEPTABLE:
		if (s)
			s->acceptable = n->op_data;
		return;
	default:
		return; /* not for a tenant: dropped */
	}
}

int nk_tenant_poll(struct nk_tenant *t)
{
	struct nk_nqe batch[POLL_BATCH];
	int total = 0;
	struct nk_ring *rings[2] = { &t->q.completion, &t->q.receive };
	for (int r = 0; r < 2; r++) {
		int64_t n = nk_ring_pop(rings[r], batch, POLL_BATCH);
		if (n < 0) {
			t->dead = ECONNRESET; /* RING-10: the ring is broken, nothing more comes */
			return -ECONNRESET;
		}
		for (int64_t i = 0; i < n; i++)
			dispatch(t, &batch[i]);
		total += (int)n;
	}
	if (flush_all(t) < 0)
		t->dead = ECONNRESET;
	return total;
}

/* GL-9: engine.sock's EOF or a DETACHED header is the CoreEngine's end. */
static void check_alive(struct nk_tenant *t)
{
	const struct nk_dev_header *h = (const struct nk_dev_header *)t->q.base;
	if (__atomic_load_n(&h->state, __ATOMIC_ACQUIRE) == NK_STATE_DETACHED)
		t->dead = ECONNRESET;
	if (t->control_fd >= 0) {
		struct pollfd p = { .fd = t->control_fd, .events = POLLIN };
		char c;
		if (poll(&p, 1, 0) == 1 &&
		    (p.revents & (POLLHUP | POLLERR) ||
		     recv(t->control_fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0))
			t->dead = ECONNRESET;
	}
}

/* Which rings a waiter wants to be woken for: a recv waits for RECEIVE only, so
 * the reply to its own SEND (on COMPLETION) does not cost a wake-up; it is read at
 * the next poll. COMPLETION cannot overflow meanwhile: at most ncalls requests are
 * in flight, one ring's worth (SEC-5). */
enum { WAKE_COMPLETION = 1, WAKE_RECEIVE = 2, WAKE_ANY = 3 };

static void sleep_on_bell(struct nk_tenant *t, unsigned wake, int64_t timeout_ns)
{
	/* RING-6: read the bell before the re-check; a push after it changes the word */
	uint32_t v = nk_bell_value(t->q.device_bell);
	if ((!(wake & WAKE_COMPLETION) || nk_ring_prepare_sleep(&t->q.completion) == 1) &&
	    (!(wake & WAKE_RECEIVE) || nk_ring_prepare_sleep(&t->q.receive) == 1)) {
		if (t->q.job.len || t->q.send.len) /* waiting for ring room: sleep briefly */
			timeout_ns = timeout_ns < 1000000 ? timeout_ns : 1000000;
		t->st.sleeps++;
		nk_bell_wait(t->q.device_bell, v, timeout_ns); /* RING-7: always bounded */
	}
	if (wake & WAKE_COMPLETION)
		nk_ring_finish_sleep(&t->q.completion);
	if (wake & WAKE_RECEIVE)
		nk_ring_finish_sleep(&t->q.receive);
}

static int wait_for(struct nk_tenant *t, unsigned wake, int64_t timeout_ns)
{
	if (t->dead)
		return -t->dead;
	int n = nk_tenant_poll(t);
	if (n)
		return n;
	t->st.waits++;
	int64_t start = now_ns();
	/* bounded spin: 2 cores, 4 processes; a spinner must not starve the others */
	while (now_ns() - start < t->spin_ns) {
		for (int i = 0; i < 32; i++)
			cpu_relax();
		if ((n = nk_tenant_poll(t)) != 0)
			return n;
		t->st.spins++;
	}
	if (timeout_ns < 0 || timeout_ns > SLEEP_SLICE_NS)
		timeout_ns = SLEEP_SLICE_NS;
	sleep_on_bell(t, wake, timeout_ns);
	n = nk_tenant_poll(t);
	if (n == 0)
		check_alive(t);
	return t->dead ? -t->dead : n;
}

int nk_tenant_wait(struct nk_tenant *t, int64_t timeout_ns)
{
	return wait_for(t, WAKE_ANY, timeout_ns);
}

/* Block until call `tag` is answered; its result (its buffer is the caller's to read). */
static int64_t call_wait(struct nk_tenant *t, uint32_t tag)
{
	while (!t->calls[tag].done) {
		int rc = wait_for(t, WAKE_COMPLETION, -1);
		if (rc < 0)
			return rc;
	}
	return t->calls[tag].result;
}

/* A send-half buffer of size bytes, waiting for replies to free one (BUF-7). */
static int alloc_wait(struct nk_tenant *t, uint64_t size, uint64_t *off)
{
	for (;;) {
		int rc = nk_bufpool_alloc(t->pool, size, off);
		if (rc != -ENOSPC)
			return rc;
		if ((rc = wait_for(t, WAKE_COMPLETION, -1)) < 0)
			return rc;
	}
}

static int call_new_wait(struct nk_tenant *t, uint8_t op, uint32_t sock_id, bool data)
{
	for (;;) {
		int tag = call_new(t, op, sock_id, data);
		if (tag >= 0)
			return tag;
		int rc = wait_for(t, WAKE_COMPLETION, -1);
		if (rc < 0)
			return rc;
	}
}

/* A control call: lend `in` (or `room` bytes for the answer), publish, wait, copy
 * the bytes the stack wrote into out (*out_len). Returns the reply's result. */
static int64_t sync_call(struct nk_tenant *t, uint8_t op, uint32_t sock_id, uint64_t op_data,
			 const void *in, uint32_t in_len, uint32_t room, void *out,
			 uint32_t *out_len)
{
	if (t->dead)
		return -t->dead;
	int tag = call_new_wait(t, op, sock_id, false);
	if (tag < 0)
		return tag;
	struct call *c = &t->calls[tag];
	uint32_t size = in_len > room ? in_len : room;
	if (size) {
		int rc = alloc_wait(t, size, &c->buf);
		if (rc < 0) {
			call_free(t, (uint32_t)tag);
			return rc;
		}
		c->size = size;
		if (in_len)
			memcpy(t->q.data + c->buf, in, in_len);
	}
	int rc = publish(t, (uint32_t)tag, op_data);
	int64_t result = rc < 0 ? rc : call_wait(t, (uint32_t)tag);
	if (t->dead)
		return result < 0 ? result : -t->dead; /* the slot stays: the device is gone */
	if (out && result > 0 && out_len) {
		uint32_t k = result < room ? (uint32_t)result : room;
		memcpy(out, t->q.data + c->buf, k);
		*out_len = k;
	}
	call_free(t, (uint32_t)tag);
	return result;
}

/* ---- set-up ------------------------------------------------------------------------- */

int nk_tenant_init(struct nk_tenant **out, void *base, uint64_t len,
		   const struct nk_tenant_opts *opts)
{
	struct nk_tqueue q;
	int rc = nk_tqueue_open(&q, base, len, QSET); /* DEV-2, DEV-12..14, SEC-1 */
	if (rc < 0)
		return rc;
	struct nk_tenant *t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->q = q;
	const struct nk_geometry g = q.geo;
	t->spin_ns = opts && opts->spin_ns >= 0 ? opts->spin_ns : NK_TENANT_SPIN_NS_DEFAULT;
	t->max_sends = opts && opts->max_sends ? opts->max_sends : NK_TENANT_MAX_SENDS_DEFAULT;
	t->send_batch = opts && opts->send_batch ? opts->send_batch : 1;
	t->control_fd = opts ? opts->control_fd : -1;
	/* SEC-5: the CoreEngine answers ENOBUFS beyond one ring's worth in flight; staying
	 * under it also means every reply finds room in COMPLETION */
	uint64_t n = (uint64_t)g.n_qsets * g.ring_entries;
	t->ncalls = n < MAX_TAGS ? (uint32_t)n : MAX_TAGS;
	t->calls = calloc(t->ncalls, sizeof(*t->calls));
	t->free_tags = calloc(t->ncalls, sizeof(*t->free_tags));
	if ((rc = nk_bufpool_new_send(&t->pool, &g)) < 0 || !t->calls || !t->free_tags) {
		free(t->calls);
		free(t->free_tags);
		free(t);
		return rc < 0 ? rc : -ENOMEM;
	}
	for (uint32_t i = 0; i < t->ncalls; i++) /* tag 0 handed out last */
		t->free_tags[i] = t->ncalls - 1 - i;
	t->nfree = t->ncalls;
	*out = t;
	return 0;
}

int nk_tenant_exit(struct nk_tenant *t, int64_t timeout_ns)
{
	int64_t deadline = now_ns() + (timeout_ns < 0 ? NK_TENANT_EXIT_NS : timeout_ns);
	int rc = 0;
	while (!t->dead && (t->nfree < t->ncalls || t->q.job.len || t->q.send.len)) {
		if (now_ns() >= deadline) {
			rc = -ETIMEDOUT;
			break;
		}
		nk_tenant_wait(t, deadline - now_ns());
	}
	for (uint32_t i = 0; i < t->nsocks; i++)
		free(t->socks[i].rx);
	free(t->socks);
	nk_outbox_free(&t->q.job);
	nk_outbox_free(&t->q.send);
	free(t->calls);
	free(t->free_tags);
	nk_bufpool_delete(t->pool);
	free(t);
	return rc;
}

void nk_tenant_get_stats(const struct nk_tenant *t, struct nk_tenant_stats *out)
{
	*out = t->st;
}

void nk_tenant_set_spin(struct nk_tenant *t, int64_t spin_ns)
{
	t->spin_ns = spin_ns < 0 ? NK_TENANT_SPIN_NS_DEFAULT : spin_ns;
}

/* ---- the socket calls --------------------------------------------------------------- */

static struct sock *live(struct nk_tenant *t, int id)
{
	struct sock *s = id > 0 ? sock_of(t, (uint32_t)id) : NULL;
	return s && !s->closed ? s : NULL;
}

static int take_error(struct sock *s)
{
	int e = s->err;
	s->err = 0;
	return e;
}

int nk_tenant_socket(struct nk_tenant *t, int domain, int type, int protocol)
{
	if (t->dead)
		return -ENETDOWN; /* GL-9 */
	if (domain != AF_INET && domain != AF_INET6)
		return -EAFNOSUPPORT; /* GL-1 */
	type &= ~SOCK_CLOEXEC; /* the tenant's own, never sent (E-1) */
	if (type & SOCK_NONBLOCK)
		return -EINVAL; /* this tenant is synchronous */
	if (type != SOCK_STREAM && type != SOCK_DGRAM)
		return -ESOCKTNOSUPPORT;
	int id = sock_new(t);
	if (id < 0)
		return id;
	uint64_t arg = (uint64_t)(uint16_t)domain | (uint64_t)(uint16_t)type << 16 |
		       (uint64_t)(uint16_t)protocol << 32;
	int64_t r = sync_call(t, NK_OP_SOCKET, (uint32_t)id, arg, NULL, 0, 0, NULL, NULL);
	if (r < 0) {
		sock_forget(t, (uint32_t)id);
		return (int)r;
	}
	return id;
}

int nk_tenant_bind(struct nk_tenant *t, int s, const struct sockaddr *addr, socklen_t len)
{
	if (!live(t, s))
		return -EBADF;
	if (len == 0 || len > SOCKADDR_ROOM)
		return -EINVAL;
	/* NQE-15: Linux's sockaddr_in/in6 on a little-endian host is the wire image */
	return (int)sync_call(t, NK_OP_BIND, (uint32_t)s, 0, addr, len, 0, NULL, NULL);
}

int nk_tenant_listen(struct nk_tenant *t, int s, int backlog)
{
	if (!live(t, s))
		return -EBADF;
	if (backlog < 0)
		backlog = 0;
	return (int)sync_call(t, NK_OP_LISTEN, (uint32_t)s, (uint32_t)backlog, NULL, 0, 0, NULL,
			      NULL);
}

int nk_tenant_accept(struct nk_tenant *t, int s, struct sockaddr *addr, socklen_t *len)
{
	struct sock *l = live(t, s);
	if (!l)
		return -EBADF;
	if (l->err)
		return -take_error(l);
	int id = sock_new(t);
	if (id < 0)
		return id;
	char raw[SOCKADDR_ROOM];
	uint32_t got = 0;
	/* op_data bits 0-31: the new connection's ID; bit 32 clear: wait for one */
	int64_t r = sync_call(t, NK_OP_ACCEPT, (uint32_t)s, (uint32_t)id, NULL, 0, SOCKADDR_ROOM,
			      raw, &got);
	if (r < 0) {
		sock_forget(t, (uint32_t)id);
		return (int)r;
	}
	if (addr && len) {
		socklen_t k = got < *len ? got : *len;
		memcpy(addr, raw, k);
		*len = got;
	}
	return id;
}

int nk_tenant_connect(struct nk_tenant *t, int s, const struct sockaddr *addr, socklen_t len)
{
	struct sock *k = live(t, s);
	if (!k)
		return -EBADF;
	if (len == 0 || len > SOCKADDR_ROOM)
		return -EINVAL;
	int64_t r = sync_call(t, NK_OP_CONNECT, (uint32_t)s, 0, addr, len, 0, NULL, NULL);
	if ((k = live(t, s)) && r < 0 && k->err == (int)-r)
		k->err = 0; /* the failure is this call's result, not also the next one's */
	return (int)r;
}

int nk_tenant_setsockopt(struct nk_tenant *t, int s, int level, int name, const void *val,
			 socklen_t len)
{
	if (!live(t, s))
		return -EBADF;
	uint64_t arg = (uint64_t)(uint32_t)level | (uint64_t)(uint32_t)name << 32;
	return (int)sync_call(t, NK_OP_SETSOCKOPT, (uint32_t)s, arg, val, len, 0, NULL, NULL);
}

int nk_tenant_getsockname(struct nk_tenant *t, int s, struct sockaddr *addr, socklen_t *len)
{
	if (!live(t, s))
		return -EBADF;
	char raw[SOCKADDR_ROOM];
	uint32_t got = 0;
	int64_t r = sync_call(t, NK_OP_GETSOCKNAME, (uint32_t)s, 0, NULL, 0, SOCKADDR_ROOM, raw,
			      &got);
	if (r < 0)
		return (int)r;
	socklen_t k = got < *len ? got : *len;
	memcpy(addr, raw, k);
	*len = got;
	return 0;
}

ssize_t nk_tenant_send(struct nk_tenant *t, int s, const void *buf, size_t len, int flags)
{
	struct sock *k = live(t, s);
	if (!k)
		return -EBADF;
	uint64_t wire_flags = (uint32_t)(flags & ~SEND_LOCAL_FLAGS);
	uint64_t granule = t->q.geo.buf_size;
	size_t done = 0;
	while (done < len || len == 0) {
		if ((k = live(t, s)) == NULL)
			return done ? (ssize_t)done : -EBADF;
		if (k->err || k->broken) { /* SOCK-6: the error once, then EPIPE */
			if (done)
				return (ssize_t)done; /* the error is the next call's */
			k->broken = true;
			return k->err ? -take_error(k) : -EPIPE;
		}
		if (len == 0)
			return 0;
		if (k->sends >= t->max_sends) { /* the socket buffer is full: wait for replies */
			int rc = wait_for(t, WAKE_COMPLETION, -1);
			if (rc < 0)
				return done ? (ssize_t)done : rc;
			continue;
		}
		uint64_t chunk = len - done < granule ? len - done : granule;
		uint64_t off;
		int rc = nk_bufpool_alloc(t->pool, chunk, &off);
		int tag = rc == 0 ? call_new(t, NK_OP_SEND, (uint32_t)s, true) : -EAGAIN;
		if (rc == 0 && tag < 0)
			nk_bufpool_free(t->pool, off, NULL);
		if (rc == -ENOSPC || tag == -EAGAIN) { /* BUF-7: wait for a reply to free one */
			if ((rc = wait_for(t, WAKE_COMPLETION, -1)) < 0)
				return done ? (ssize_t)done : rc;
			continue;
		}
		if (rc < 0)
			return done ? (ssize_t)done : rc;
		memcpy(t->q.data + off, (const char *)buf + done, chunk);
		struct call *c = &t->calls[tag];
		c->buf = off;
		c->size = (uint32_t)chunk;
		k->sends++;
		struct nk_outbox *b;
		if ((rc = queue_call(t, (uint32_t)tag, wire_flags, &b)) < 0)
			return done ? (ssize_t)done : rc;
		done += chunk;
	}
	/* one tail store and one bell check for the whole call; with send_batch > 1 the
	 * SENDs wait for more (or for the next wait, which flushes) like MSG_MORE */
	if (t->q.send.len >= t->send_batch)
		outbox_flush(t, &t->q.send);
	return (ssize_t)done;
}

ssize_t nk_tenant_recv(struct nk_tenant *t, int s, void *buf, size_t len, int flags)
{
	if (flags)
		return -EINVAL;
	for (;;) {
		struct sock *k = live(t, s);
		if (!k)
			return -EBADF;
		size_t have = 0;
		while (k->rx_len && have < len) {
			struct rx *r = &k->rx[k->rx_head];
			size_t n = r->size - r->pos < len - have ? r->size - r->pos : len - have;
			memcpy((char *)buf + have, t->q.data + r->off + r->pos, n);
			have += n;
			r->pos += (uint32_t)n;
			if (r->pos == r->size) { /* BUF-4: consumed, back to its NSM */
				buf_return(t, r->off, r->size);
				k->rx_head = (k->rx_head + 1) % k->rx_cap;
				k->rx_len--;
			}
		}
		if (have || len == 0) {
			outbox_flush(t, &t->q.send);
			return (ssize_t)have;
		}
		if (k->fin)
			return 0;
		if (k->err) {
			k->broken = true; /* a reset: later sends are EPIPE (SOCK-6) */
			return -take_error(k);
		}
		int rc = wait_for(t, WAKE_RECEIVE, -1);
		if (rc < 0)
			return rc;
	}
}

/* Wait until the socket's SENDs are answered (they travel on SEND, calls on JOB). */
static int drain_sends(struct nk_tenant *t, int s)
{
	struct sock *k;
	while ((k = live(t, s)) && k->sends) {
		int rc = wait_for(t, WAKE_COMPLETION, -1);
		if (rc < 0)
			return rc;
	}
	return k ? 0 : -EBADF;
}

int nk_tenant_shutdown(struct nk_tenant *t, int s, int how)
{
	if (!live(t, s))
		return -EBADF;
	if (how != SHUT_RD) {
		int rc = drain_sends(t, s);
		if (rc < 0)
			return rc;
	}
	return (int)sync_call(t, NK_OP_SHUTDOWN, (uint32_t)s, (uint64_t)how, NULL, 0, 0, NULL,
			      NULL);
}

int nk_tenant_close(struct nk_tenant *t, int s)
{
	struct sock *k = live(t, s);
	if (!k)
		return -EBADF;
	/* A synchronous tenant makes progress only inside its calls: wait (bounded, GL-10)
	 * for the socket's SEND replies so that CLOSE leaves now, not at the next call.
	 * The socket stays open meanwhile, so no reply sends a CLOSE behind our back. */
	int64_t deadline = now_ns() + NK_TENANT_EXIT_NS;
	while (k->sends && !t->dead && now_ns() < deadline) {
		wait_for(t, WAKE_COMPLETION, deadline - now_ns());
		k = sock_of(t, (uint32_t)s); /* socks may have moved; ours is not forgotten */
	}
	k->closed = true;
	for (; k->rx_len; k->rx_len--) { /* received buffers go back at once (BUF-4) */
		struct rx *r = &k->rx[k->rx_head];
		k->unread = k->unread || r->pos < r->size;
		buf_return(t, r->off, r->size);
		k->rx_head = (k->rx_head + 1) % k->rx_cap;
	}
	if (t->dead) {
		sock_forget(t, (uint32_t)s);
		return 0;
	}
	if (k->sends == 0)
		send_close(t, (uint32_t)s, k); /* else the last SEND reply sends it */
	else
		outbox_flush(t, &t->q.send);
	return 0;
}
