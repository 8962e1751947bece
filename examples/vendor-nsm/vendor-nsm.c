/*
 * vendor-nsm: a minimal NetKernel NSM, written from the specification alone
 * (spec/nqe.md, spec/device.md, spec/nsm.md, spec/runtime.md). It includes
 * nothing of NetKernel's own code: a vendor can build the same from the text.
 *
 * It runs the tenants' socket calls on Linux sockets (TCP and UDP, IPv4 and
 * IPv6), like the reference kernel-stack NSM.
 *
 *   usage: vendor-nsm DEVICE      (RT-7: started by a launcher that attached
 *                                  DEVICE for us; the control connection is the
 *                                  descriptor in NETKERNEL_CONTROL_FD)
 *
 * Structure: one thread does all the work: it consumes the COMPLETION and
 * RECEIVE rings of its device, runs the calls on non-blocking sockets, and
 * waits in epoll for socket readiness, the control connection and SIGTERM.
 * A second, tiny thread only turns the DEVICE bell (a futex, DEV-9) into an
 * eventfd the epoll loop can wait on: Linux cannot wait for a futex and file
 * descriptors in one call.
 *
 * Build with -DVENDOR_BROKEN for the variant with deliberate defects
 * (README.md lists them; search for VENDOR_BROKEN below).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- NQE v1 (spec/nqe.md) ------------------------------------------------ */

enum {
	OP_SOCKET = 0x01, OP_BIND, OP_LISTEN, OP_CONNECT, OP_ACCEPT, OP_SEND,
	OP_SHUTDOWN, OP_CLOSE, OP_SETSOCKOPT, OP_GETSOCKOPT, OP_GETSOCKNAME,
	OP_GETPEERNAME,
	EV_DATA = 0x40, EV_FIN, EV_ERROR, EV_ACCEPTABLE,
	OP_ATTACH = 0x60, OP_DETACH, OP_BUF_RETURN, OP_TENANT_MAP, OP_TENANT_UNMAP,
	OP_REPLY = 0x80, OP_UNKNOWN_REPLY = 0xFF,
};

struct nqe {
	uint8_t op, qset, vm_id;
	uint32_t sock_id;
	uint64_t op_data; /* a signed result in replies (NQE-13) */
	uint64_t data_ptr;
	uint32_t size;
	uint16_t tag;
	uint8_t reserved[3];
};

/* NQE-2, NQE-3: fixed offsets, little-endian, no padding. */
static void nqe_decode(struct nqe *q, const uint8_t *b)
{
	uint16_t t16;
	uint32_t t32;
	uint64_t t64;

	q->op = b[0];
	q->qset = b[1];
	q->vm_id = b[2];
	memcpy(&t32, b + 3, 4);
	q->sock_id = le32toh(t32);
	memcpy(&t64, b + 7, 8);
	q->op_data = le64toh(t64);
	memcpy(&t64, b + 15, 8);
	q->data_ptr = le64toh(t64);
	memcpy(&t32, b + 23, 4);
	q->size = le32toh(t32);
	memcpy(&t16, b + 27, 2);
	q->tag = le16toh(t16);
	memcpy(q->reserved, b + 29, 3);
}

static void nqe_encode(uint8_t *b, const struct nqe *q)
{
	uint16_t t16 = htole16(q->tag);
	uint32_t t32;
	uint64_t t64;

	b[0] = q->op;
	b[1] = q->qset;
	b[2] = q->vm_id;
	t32 = htole32(q->sock_id);
	memcpy(b + 3, &t32, 4);
	t64 = htole64(q->op_data);
	memcpy(b + 7, &t64, 8);
	t64 = htole64(q->data_ptr);
	memcpy(b + 15, &t64, 8);
	t32 = htole32(q->size);
	memcpy(b + 23, &t32, 4);
	memcpy(b + 27, &t16, 2);
	memset(b + 29, 0, 3); /* NQE-4: reserved bytes are sent as zero */
}

/* NQE-7, NQE-8: the codes a v1 receiver knows. */
static bool op_is_request(uint8_t op)
{
	return (op >= OP_SOCKET && op <= OP_GETPEERNAME) ||
	       (op >= OP_ATTACH && op <= OP_TENANT_UNMAP);
}

static bool op_is_known(uint8_t op)
{
	if (op_is_request(op) || (op >= EV_DATA && op <= EV_ACCEPTABLE) ||
	    op == OP_UNKNOWN_REPLY)
		return true;
	return (op & OP_REPLY) && op_is_request(op & 0x7f);
}

/* ---- The NK device (spec/device.md) -------------------------------------- */

enum { RING_JOB, RING_COMPLETION, RING_SEND, RING_RECEIVE };
enum { BELL_DEVICE, BELL_ENGINE };
#define NEED_WAKEUP 1u /* RING-6: bit 0 of a ring's flags */

struct geometry {
	uint8_t kind;
	uint16_t n_qsets;
	uint32_t ring_entries, buf_size;
	uint64_t qset_stride, data_offset, data_size, send_size, total_size;
};

static uint64_t rd_le(const uint8_t *p, int n)
{
	uint64_t v = 0;

	for (int i = n - 1; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static bool pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

/*
 * DEV-2, DEV-3, DEV-12, DEV-13, DEV-14: check the header and recompute every
 * offset from the sizes before following any of them.
 */
static int geometry_read(const uint8_t *h, size_t len, struct geometry *g)
{
	if (len < 256 || memcmp(h, "NKDEVICE", 8) || rd_le(h + 8, 2) != 1 ||
	    rd_le(h + 10, 2) != 256)
		return -1;
	g->total_size = rd_le(h + 16, 8);
	g->kind = h[24];
	g->n_qsets = rd_le(h + 26, 2);
	g->ring_entries = rd_le(h + 28, 4);
	g->qset_stride = rd_le(h + 40, 8);
	g->data_offset = rd_le(h + 48, 8);
	g->data_size = rd_le(h + 56, 8);
	g->send_size = rd_le(h + 64, 8);
	g->buf_size = rd_le(h + 72, 4);
	if ((g->kind != 1 && g->kind != 2) || g->n_qsets < 1 || g->n_qsets > 255 ||
	    !pow2(g->ring_entries) || g->ring_entries < 2 || g->ring_entries > 65536 ||
	    !pow2(g->buf_size) || g->buf_size < 64 ||
	    g->data_size % g->buf_size || g->send_size % g->buf_size ||
	    g->send_size == 0 || g->send_size >= g->data_size)
		return -1;
	uint64_t stride = 2 * 64 + 4 * (192 + 32 * (uint64_t)g->ring_entries);
	uint64_t data_off = (256 + g->n_qsets * stride + 4095) / 4096 * 4096;

	if (rd_le(h + 32, 8) != 256 || g->qset_stride != stride ||
	    g->data_offset != data_off || g->total_size != data_off + g->data_size ||
	    g->total_size < data_off || len < g->total_size)
		return -1;
	return 0;
}

/* Map a device file whole (DEV-1: offsets only, so any address works). */
static uint8_t *device_map(const char *path, size_t *len, int *err)
{
	struct stat st;
	int fd = open(path, O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		*err = errno;
		return NULL;
	}
	if (fstat(fd, &st) < 0 || st.st_size < 256) {
		*err = fstat(fd, &st) < 0 ? errno : EINVAL;
		close(fd);
		return NULL;
	}
	void *p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

	*err = errno;
	close(fd);
	if (p == MAP_FAILED)
		return NULL;
	*len = st.st_size;
	return p;
}

/*
 * One ring of our device, as consumer (COMPLETION, RECEIVE) or producer (JOB,
 * SEND). A producer's NQEs first go to an outbox, a FIFO that keeps what does
 * not fit a full ring (RING-4: no waiting, the producer keeps the NQE); every
 * NQE gets its ring index when it enters the outbox, so we know it before it
 * is published (NSM-17).
 */
struct ring {
	uint32_t *tail, *head, *flags;
	uint8_t *slots;
	uint32_t entries;
	uint32_t *engine_bell; /* producer rings: the CoreEngine's bell (DEV-9) */
	bool broken;           /* RING-10 */
	uint8_t *out;          /* outbox: encoded NQEs */
	size_t out_n, out_cap, out_first;
	uint32_t next_index; /* index of the next NQE enqueued */
};

static struct {
	uint8_t *map;
	struct geometry g;
	struct ring rings[255][4];
	uint32_t *device_bell[255];
	char dir[4096]; /* runtime directory (RT-1, RT-7) */
} dev;

static void ring_init(struct ring *r, uint8_t *at, uint32_t entries, uint32_t *bell)
{
	/* RING-1: tail +0, head +64, flags +128, slots from +192 */
	r->tail = (uint32_t *)at;
	r->head = (uint32_t *)(at + 64);
	r->flags = (uint32_t *)(at + 128);
	r->slots = at + 192;
	r->entries = entries;
	r->engine_bell = bell;
}

/* RING-10: an impossible distance means the other side broke the ring. */
static bool ring_check(struct ring *r, uint32_t tail, uint32_t head)
{
	if ((uint32_t)(tail - head) > r->entries && !r->broken) {
		fprintf(stderr, "vendor-nsm: ring indices impossible, ring abandoned\n");
		r->broken = true;
	}
	return !r->broken;
}

static void futex_wake_shared(uint32_t *word)
{
	/* DEV-9: not FUTEX_PRIVATE: the word is shared between processes. */
	syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Publish as much of the outbox as fits, with one tail store (RING-8). */
static bool ring_flush(struct ring *r)
{
	if (!r->out_n || r->broken)
		return false;
	/* RING-5: acquire on head, so the CoreEngine's reads of the slots we are
	 * about to reuse are complete. We own tail: a relaxed load is enough. */
	uint32_t head = __atomic_load_n(r->head, __ATOMIC_ACQUIRE);
	uint32_t tail = __atomic_load_n(r->tail, __ATOMIC_RELAXED);
	size_t n = 0;

	if (!ring_check(r, tail, head))
		return false;
	while (n < r->out_n && (uint32_t)(tail - head) < r->entries) {
		memcpy(r->slots + 32 * (tail & (r->entries - 1)),
		       r->out + 32 * (r->out_first + n), 32);
		tail++;
		n++;
	}
	if (!n)
		return false;
	r->out_first += n;
	r->out_n -= n;
	if (!r->out_n)
		r->out_first = 0;
	/* RING-5: release: the slots are visible before the new tail. */
	__atomic_store_n(r->tail, tail, __ATOMIC_RELEASE);
	/* RING-6: full fence between our tail store and the load of flags, the
	 * mirror of the consumer's fence between its flags store and tail load. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (__atomic_load_n(r->flags, __ATOMIC_RELAXED) & NEED_WAKEUP) {
		/* DEV-9: bump the bell, then wake the sleepers on it. */
		__atomic_fetch_add(r->engine_bell, 1, __ATOMIC_RELAXED);
		futex_wake_shared(r->engine_bell);
	}
	return true;
}

/* Queue one NQE for the ring; returns its ring index. */
static uint32_t ring_put(struct ring *r, const struct nqe *q)
{
	if (r->out_first + r->out_n == r->out_cap) {
		if (r->out_first) {
			memmove(r->out, r->out + 32 * r->out_first, 32 * r->out_n);
			r->out_first = 0;
		} else {
			r->out_cap = r->out_cap ? 2 * r->out_cap : 64;
			r->out = realloc(r->out, 32 * r->out_cap);
			if (!r->out) {
				perror("vendor-nsm: realloc");
				exit(1);
			}
		}
	}
	nqe_encode(r->out + 32 * (r->out_first + r->out_n), q);
	r->out_n++;
	return r->next_index++;
}

/* Has the CoreEngine consumed the NQE with this index (RING-2: head passed it)? */
static bool ring_consumed(const struct ring *r, uint32_t index)
{
	return (int32_t)(__atomic_load_n(r->head, __ATOMIC_ACQUIRE) - (index + 1)) >= 0;
}

/* ---- Tenants: their data areas and our receive slices (NSM-11, NSM-16) --- */

struct tenant {
	uint8_t *map;
	size_t map_len;
	uint8_t *data; /* the tenant's data area (DEV-10) */
	struct geometry g;
	uint64_t slice_off, slice_len; /* our slice of its receive half (BUF-8) */
	uint32_t granules, free;
	uint32_t *lent; /* per granule: size of the buffer lent from it, 0 = none */
	uint8_t *used;  /* per granule: in a lent buffer */
	uint32_t *owner_id;     /* per granule: the socket a buffer was lent for */
	uint64_t *owner_serial; /* ... and which socket of that ID */
	int paused;             /* sockets waiting for room (NSM-16) */
};

static struct tenant *tenants[256];

/* NQE-14, NSM-13: [ptr, ptr + size) inside [lo, hi), free of overflow. */
static bool span_inside(uint64_t ptr, uint64_t size, uint64_t lo, uint64_t hi)
{
	return ptr >= lo && ptr <= hi && size <= hi - ptr;
}

/*
 * BUF-2: first fit of whole granules; if `want` does not fit, the longest
 * free run of at least `min` bytes. Returns the byte offset in the data area
 * and the room in *room, or UINT64_MAX when nothing fits (BUF-7).
 */
static uint64_t slice_alloc(struct tenant *t, uint64_t want, uint64_t min, uint64_t *room)
{
	uint32_t need = (want + t->g.buf_size - 1) / t->g.buf_size;
	uint32_t best = 0, best_len = 0, run = 0;

	if (need > t->granules)
		need = t->granules;
	for (uint32_t g = 0; g < t->granules; g++) {
		run = t->used[g] ? 0 : run + 1;
		if (run > best_len) {
			best_len = run;
			best = g + 1 - run;
		}
		if (run == need)
			break;
	}
	if (!best_len || (uint64_t)best_len * t->g.buf_size < min)
		return UINT64_MAX;
	if (best_len > need)
		best_len = need;
	memset(t->used + best, 1, best_len);
	t->free -= best_len;
	*room = (uint64_t)best_len * t->g.buf_size;
	return t->slice_off + (uint64_t)best * t->g.buf_size;
}


static void tenant_free(int vm)
{
	struct tenant *t = tenants[vm];

	if (!t)
		return;
	munmap(t->map, t->map_len);
	free(t->lent);
	free(t->used);
	free(t->owner_id);
	free(t->owner_serial);
	free(t);
	tenants[vm] = NULL;
}

/* ---- Sockets ------------------------------------------------------------- */

/* A call that waits in the NSM for the stack (CONNECT, ACCEPT, SEND). */
struct call {
	struct nqe q;
	struct ring *reply_ring;
	uint64_t done; /* SEND: bytes the stack took so far */
	struct call *next;
};

struct sock {
	uint8_t vm;
	uint32_t id;
	int fd, type, family;
	bool rd_ready, wr_ready; /* edge-triggered epoll readiness */
	bool reading;            /* push arriving data as events (NSM-15) */
	bool paused;             /* slice full (NSM-16) */
	bool fin_sent;           /* EV_FIN published: only errors are left to tell */
	bool shut_wr_later;      /* SHUTDOWN(WR) behind queued SENDs (NSM-6) */
	bool may_listen;
	bool dead;
	/* NSM-17: no event before the CoreEngine consumed this reply */
	struct ring *gate_ring;
	uint32_t gate_index;
	/* NSM-17: the index of our last event, for the CLOSE reply */
	bool any_event;
	uint32_t last_event;
	uint32_t announced; /* connections announced by EV_ACCEPTABLE */
	uint64_t serial;    /* tells sockets of one ID apart over time */
	uint32_t held;      /* granules of the slice lent for this socket */
	struct call *connect;
	struct call *sends, **sends_tail;
	struct call *accepts, **accepts_tail;
	struct sock *hnext, *gnext;
};

#define NBUCKETS 1024
static struct sock *buckets[NBUCKETS];
static struct sock *gated;     /* sockets waiting for a reply to be consumed */
static struct sock *graveyard; /* closed, freed after the epoll batch */
static int epfd;

/* NSM-14: sockets are keyed by VM ID and socket ID. */
static struct sock **sock_slot(uint8_t vm, uint32_t id)
{
	struct sock **p = &buckets[(id * 31u + vm) % NBUCKETS];

	while (*p && ((*p)->vm != vm || (*p)->id != id))
		p = &(*p)->hnext;
	return p;
}

static struct sock *sock_find(uint8_t vm, uint32_t id)
{
	return *sock_slot(vm, id);
}

static struct sock *sock_new(uint8_t vm, uint32_t id, int fd, int type, int family)
{
	struct sock *s = calloc(1, sizeof(*s));

	if (!s) {
		perror("vendor-nsm: calloc");
		exit(1);
	}
	s->vm = vm;
	s->id = id;
	s->fd = fd;
	s->type = type;
	s->family = family;
	static uint64_t serials;

	s->serial = ++serials;
	s->sends_tail = &s->sends;
	s->accepts_tail = &s->accepts;
	/* UDP delivers datagrams from the start; TCP once connected (below). */
	s->reading = type == SOCK_DGRAM;
	struct epoll_event ev = {
		.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
		.data.ptr = s,
	};
	epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
	*sock_slot(vm, id) = s;
	return s;
}

/* Our events of every socket go on queue set 0's SEND ring (DEV-8). */
#define EVENT_RING (&dev.rings[0][RING_SEND])

static void event(struct sock *s, uint8_t op, uint64_t op_data, uint64_t ptr, uint32_t size)
{
	struct nqe q = {
		.op = op, .qset = 0, .vm_id = s->vm, .sock_id = s->id,
		.op_data = op_data, .data_ptr = ptr, .size = size,
	};

	s->last_event = ring_put(EVENT_RING, &q);
	s->any_event = true;
}

/* NSM-3: a reply carries the call's op | 0x80, qset, sock_id and tag. */
static uint32_t reply(struct ring *r, const struct nqe *call, int64_t result)
{
	struct nqe q = *call;

	q.op = call->op | OP_REPLY;
	q.op_data = (uint64_t)result; /* NQE-13: two's complement */
	return ring_put(r, &q);
}

static void gate(struct sock *s, struct ring *r, uint32_t index)
{
	if (!s->gate_ring) {
		s->gnext = gated;
		gated = s;
	}
	s->gate_ring = r;
	s->gate_index = index;
}

/* Remove the socket from the table and the gate list; free it later. */
static void sock_drop(struct sock *s)
{
	struct sock **p = sock_slot(s->vm, s->id);

	*p = s->hnext;
	for (p = &gated; *p; p = &(*p)->gnext)
		if (*p == s) {
			*p = s->gnext;
			break;
		}
	close(s->fd); /* also leaves the epoll set */
	s->dead = true;
	s->hnext = graveyard;
	graveyard = s;
	if (s->paused)
		tenants[s->vm]->paused--;
}

/* NSM-8: calls still waiting on a closed socket are answered -EBADF. */
static void answer_waiting(struct call **list, bool answer)
{
	for (struct call *c = *list, *n; c; c = n) {
		n = c->next;
		if (answer)
			reply(c->reply_ring, &c->q, -EBADF);
		free(c);
	}
	*list = NULL;
}

static void sock_forget(struct sock *s, bool answer)
{
	if (s->connect)
		answer_waiting(&s->connect, answer);
	answer_waiting(&s->sends, answer);
	answer_waiting(&s->accepts, answer);
	s->sends_tail = &s->sends;
	s->accepts_tail = &s->accepts;
}

/* A call's buffer, checked by socket_call (NSM-13); NULL for "no buffer". */
static uint8_t *call_buf(const struct nqe *q)
{
	return q->size ? tenants[q->vm_id]->data + q->data_ptr : NULL;
}

static uint8_t *tenant_buf(uint8_t vm, uint64_t ptr)
{
	return tenants[vm]->data + ptr;
}

/* ---- Pushing what arrives (NSM-15, NSM-16) -------------------------------- */

/*
 * NSM-16's variation, a per-socket share, and NSM-18's reserve keep a program
 * alive: a socket may hold at most 1/8 of the slice, and a socket that holds
 * buffers already may not take the last 1/8. Without them the buffers of sockets the
 * application does not read at the moment (iperf3's data streams at the end of
 * a test) fill the slice, and the byte it waits for on another socket (its
 * control connection) never gets a buffer.
 */
static uint64_t buf_get(struct sock *s, uint64_t want, uint64_t min, uint64_t *room)
{
	struct tenant *t = tenants[s->vm];
	uint64_t gsize = t->g.buf_size;
	uint32_t share = t->granules / 8 ? t->granules / 8 : 1;
	uint32_t reserve = t->granules / 8;
#ifdef VENDOR_BROKEN
	share = t->granules; /* DEFECT 3 (below) needs a slice that fills up */
	reserve = 0;
#endif
	uint32_t need = (min + gsize - 1) / gsize;
	uint64_t cap = (uint64_t)(s->held < share ? share - s->held : 0) * gsize;

	if (s->held) {
		if (s->held + need > share || t->free < reserve + need)
			return UINT64_MAX;
		if (cap > (uint64_t)(t->free - reserve) * gsize)
			cap = (uint64_t)(t->free - reserve) * gsize;
	}
	if (want > cap)
		want = cap;
	if (want < min)
		want = min;
	return slice_alloc(t, want, min, room);
}

/* Keep `keep` bytes of a buffer from buf_get, lent for s (BUF-4); free the rest. */
static void buf_keep(struct sock *s, uint64_t off, uint64_t room, uint64_t keep)
{
	struct tenant *t = tenants[s->vm];
	uint32_t first = (off - t->slice_off) / t->g.buf_size;
	uint32_t had = room / t->g.buf_size;
	uint32_t kept = (keep + t->g.buf_size - 1) / t->g.buf_size;

	memset(t->used + first + kept, 0, had - kept);
	t->free += had - kept;
	if (!kept)
		return;
	t->lent[first] = keep; /* lent until its BUF_RETURN */
	t->owner_id[first] = s->id;
	t->owner_serial[first] = s->serial;
	s->held += kept;
}

static bool tcp_fin_seen(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);

	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
		return true;
	/* A recv() of 0 is end of stream only if the peer's FIN came; after our
	 * own SHUT_RD Linux returns 0 too, but the connection stays open. */
	switch (ti.tcpi_state) {
	case TCP_CLOSE_WAIT: case TCP_LAST_ACK: case TCP_CLOSING:
	case TCP_TIME_WAIT: case TCP_CLOSE:
		return true;
	default:
		return false;
	}
}

static void pause_reading(struct sock *s)
{
	if (!s->paused) {
		s->paused = true;
		tenants[s->vm]->paused++;
	}
}

#define MAX_CHUNK (256 * 1024)

static void read_stream(struct sock *s)
{
	while (s->rd_ready && s->reading && !s->paused) {
		int avail = 0;
		char peek;

		if (ioctl(s->fd, SIOCINQ, &avail) < 0 || avail <= 0) {
			ssize_t n = recv(s->fd, &peek, 1, MSG_PEEK | MSG_DONTWAIT);

			if (n > 0) {
				avail = 1;
			} else if (n == 0) {
				s->rd_ready = false;
				if (tcp_fin_seen(s->fd)) {
					event(s, EV_FIN, 0, 0, 0); /* after the last EV_DATA */
					s->reading = false;
					s->fin_sent = true;
				}
				return;
			} else if (errno == EAGAIN || errno == EINTR) {
				s->rd_ready = false;
				return;
			} else {
				/* The reset came after the data: NSM-15, SOCK-6. */
				if (errno != ENOTCONN)
					event(s, EV_ERROR, (uint64_t)-(int64_t)errno, 0, 0);
				s->reading = false;
				return;
			}
		}
		uint64_t room;
		uint64_t off = buf_get(s, avail < MAX_CHUNK ? avail : MAX_CHUNK, 1, &room);

		if (off == UINT64_MAX) {
#ifdef VENDOR_BROKEN
			/* DEFECT 3: a full slice drops what arrives instead of
			 * leaving it in the stack (BUF-7, NSM-16). */
			char junk[4096];

			if (!tenants[s->vm]->free &&
			    recv(s->fd, junk, sizeof(junk), MSG_DONTWAIT) > 0)
				continue;
#endif
			pause_reading(s); /* BUF-7: the data stays in the stack */
			return;
		}
		ssize_t n = recv(s->fd, tenant_buf(s->vm, off), room, MSG_DONTWAIT);

		buf_keep(s, off, room, n > 0 ? n : 0);
		if (n > 0)
			event(s, EV_DATA, 0, off, n);
		/* n <= 0: the next round finds out why */
	}
}

static void read_dgram(struct sock *s)
{
	struct tenant *t = tenants[s->vm];
	uint32_t alen = s->family == AF_INET6 ? sizeof(struct sockaddr_in6)
					      : sizeof(struct sockaddr_in);

	while (s->rd_ready && s->reading && !s->paused) {
		ssize_t len = recv(s->fd, NULL, 0, MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);

		if (len < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				s->rd_ready = false;
			} else {
				/* ICMP error on a connected socket (SOCK-6) */
				event(s, EV_ERROR, (uint64_t)-(int64_t)errno, 0, 0);
				continue;
			}
			return;
		}
		uint64_t need = alen + (uint64_t)len, room;

		if (need > t->slice_len) /* could never fit: truncate, as recv() does */
			need = t->slice_len;
		uint64_t off = buf_get(s, need, need, &room);

		if (off == UINT64_MAX) {
			pause_reading(s);
			return;
		}
		uint8_t *buf = tenant_buf(s->vm, off);
		struct sockaddr_storage from;
		socklen_t flen = sizeof(from);

		memset(&from, 0, sizeof(from));
		len = recvfrom(s->fd, buf + alen, need - alen, MSG_DONTWAIT,
			       (struct sockaddr *)&from, &flen);
		if (len < 0) {
			buf_keep(s, off, room, 0);
			continue;
		}
		/* One datagram per EV_DATA, behind its source's sockaddr (NQE-15). */
		memcpy(buf, &from, alen);
		buf_keep(s, off, room, alen + len);
		event(s, EV_DATA, alen, off, alen + len);
	}
}

/* ---- Calls that wait for the stack (NSM-6, NSM-7) ------------------------- */

static bool gate_open(struct sock *s)
{
	return !s->gate_ring;
}

static void connect_done(struct sock *s)
{
	struct pollfd p = { .fd = s->fd, .events = POLLOUT };

	if (poll(&p, 1, 0) <= 0)
		return;
	/* NSM-4: the result is what SO_ERROR reads once the handshake is over. */
	int err = 0;
	socklen_t len = sizeof(err);

	getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
	struct call *c = s->connect;
	uint32_t index = reply(c->reply_ring, &c->q, -err);

	s->connect = NULL;
	if (!err) {
		s->reading = true;
		s->fin_sent = false;
		s->rd_ready = true;
		gate(s, c->reply_ring, index); /* NSM-17 */
	}
	free(c);
}

static void run_sends(struct sock *s)
{
	struct call *c;

	while ((c = s->sends)) {
		struct nqe *q = &c->q;
		uint8_t *buf = call_buf(q);
		uint32_t alen = q->op_data >> 32 & 0xffff;
		struct sockaddr_storage to;
		uint64_t len = q->size - alen;
		ssize_t n = 0;

		if (alen)
			memcpy(&to, buf, alen);
		for (;;) {
			n = sendto(s->fd, buf ? buf + alen + c->done : NULL, len - c->done,
				   MSG_NOSIGNAL | MSG_DONTWAIT,
				   alen ? (struct sockaddr *)&to : NULL, alen);
			if (n >= 0) {
				c->done += n;
				if (s->type == SOCK_STREAM && c->done < len)
					continue;
			} else if (errno == EINTR) {
				continue;
			}
			break;
		}
		if (n < 0 && errno == EAGAIN) {
			if (q->op_data & MSG_DONTWAIT) /* NSM-6: what was taken, or -EAGAIN */
				n = c->done ? (ssize_t)c->done : -EAGAIN;
			else
				return; /* wait for EPOLLOUT */
		} else if (n < 0) {
			n = c->done ? (ssize_t)c->done : -errno; /* count taken so far */
		} else {
			n = c->done;
		}
		s->sends = c->next;
		if (!s->sends)
			s->sends_tail = &s->sends;
#ifndef VENDOR_BROKEN
		reply(c->reply_ring, q, n); /* BUF-3: the buffer is the tenant's again */
#endif
		free(c);
	}
	if (s->shut_wr_later) { /* NSM-6: the end of stream follows the bytes */
		s->shut_wr_later = false;
		shutdown(s->fd, SHUT_WR);
	}
}

static int64_t accept_one(struct sock *s, struct call *c)
{
	struct sockaddr_storage peer;
	socklen_t plen = sizeof(peer);

	if (sock_find(s->vm, c->q.op_data & 0xffffffff))
		return -EEXIST; /* the ID was taken while the ACCEPT waited */
	int fd = accept4(s->fd, (struct sockaddr *)&peer, &plen,
			 SOCK_NONBLOCK | SOCK_CLOEXEC);

	if (fd < 0)
		return -errno;
	if (s->announced) /* one announced connection fewer is waiting */
		s->announced--;
	/* NSM-7: the peer's address truncated to the buffer, its full length */
	if (c->q.size)
		memcpy(call_buf(&c->q), &peer,
		       plen < c->q.size ? plen : c->q.size);
	struct sock *n = sock_new(s->vm, c->q.op_data & 0xffffffff, fd, SOCK_STREAM,
				  s->family);
	int64_t res = c->q.size ? (int64_t)plen : 0;
	uint32_t index = reply(c->reply_ring, &c->q, res);

	n->reading = true;
	n->rd_ready = true;
	gate(n, c->reply_ring, index); /* NSM-17 */
	return INT64_MIN;             /* answered */
}

static int listen_queue(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);

	/* For a listener Linux reports its accept queue length in tcpi_unacked. */
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 ||
	    ti.tcpi_state != TCP_LISTEN)
		return 0;
	return ti.tcpi_unacked;
}

static void run_accepts(struct sock *s)
{
	struct call *c;

	/* NSM-7: ACCEPTs of one listener are served in the order they came. */
	while ((c = s->accepts)) {
		int64_t r = accept_one(s, c);

		if (r == -EAGAIN)
			break;
		if (r != INT64_MIN)
			reply(c->reply_ring, &c->q, r);
		s->accepts = c->next;
		if (!s->accepts)
			s->accepts_tail = &s->accepts;
		free(c);
	}
	if (s->accepts || !s->may_listen)
		return;
	/* NSM-15: a listener with connections waiting sends EV_ACCEPTABLE. */
	uint32_t waiting = listen_queue(s->fd);

	/* once per new arrival: a connection taken by an ACCEPT (of either
	 * kind) lowers the count, so the next arrival is announced again */
	if (waiting > s->announced)
		event(s, EV_ACCEPTABLE, waiting, 0, 0);
	s->announced = waiting;
}

static void sock_service(struct sock *s)
{
	if (s->dead)
		return;
	if (s->connect)
		connect_done(s);
	if (s->sends)
		run_sends(s);
	if (s->type == SOCK_STREAM && (s->accepts || s->may_listen))
		run_accepts(s);
	if (!gate_open(s))
		return;
	if (s->reading) {
		if (s->type == SOCK_STREAM)
			read_stream(s);
		else
			read_dgram(s);
	} else if (s->fin_sent && s->rd_ready) {
		/* After EV_FIN a reset is still news: EPIPE (SOCK-6). */
		int err = 0;
		socklen_t len = sizeof(err);

		s->rd_ready = false;
		if (!getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) && err) {
			event(s, EV_ERROR, (uint64_t)-(int64_t)err, 0, 0);
			s->fin_sent = false;
		}
	}
}

/* ---- Calls (NSM-3 .. NSM-14) ---------------------------------------------- */

static struct call *call_new(const struct nqe *q, struct ring *r)
{
	struct call *c = calloc(1, sizeof(*c));

	if (!c) {
		perror("vendor-nsm: calloc");
		exit(1);
	}
	c->q = *q;
	c->reply_ring = r;
	return c;
}

/* NSM-5: the v1 sockets only, refused in the order the spec gives. */
static int64_t do_socket(const struct nqe *q)
{
	int domain = q->op_data & 0xffff;
	int type = q->op_data >> 16 & 0xffff;
	int proto = q->op_data >> 32 & 0xffff;
	int base = type & 0xf;

	if (type & ~0xf & ~SOCK_NONBLOCK)
		return -EINVAL;
	if (domain != AF_INET && domain != AF_INET6)
		return -EAFNOSUPPORT;
	if (base == SOCK_RAW)
		return proto ? -EPERM : -EPROTONOSUPPORT;
	if (base != SOCK_STREAM && base != SOCK_DGRAM)
		return -ESOCKTNOSUPPORT;
	if (proto && proto != (base == SOCK_STREAM ? IPPROTO_TCP : IPPROTO_UDP))
		return -EPROTONOSUPPORT;
	if (!q->sock_id)
		return -EINVAL;
	if (sock_find(q->vm_id, q->sock_id))
		return -EEXIST;
	int fd = socket(domain, base | SOCK_NONBLOCK | SOCK_CLOEXEC, proto);

	if (fd < 0)
		return -errno;
	sock_new(q->vm_id, q->sock_id, fd, base, domain);
	return 0;
}

/* Copy a sockaddr out of the tenant's buffer; Linux judges it (NQE-15). */
static int addr_in(const struct nqe *q, struct sockaddr_storage *a)
{
	memset(a, 0, sizeof(*a));
	if (q->size > sizeof(*a))
		return -EINVAL;
	if (q->size)
		memcpy(a, call_buf(q), q->size);
	return 0;
}

/* Write what Linux wrote, truncated to the buffer; the result is its length. */
static int64_t addr_out(const struct nqe *q, int (*fn)(int, struct sockaddr *, socklen_t *),
			int fd)
{
	struct sockaddr_storage a;
	socklen_t len = sizeof(a);

	if (fn(fd, (struct sockaddr *)&a, &len) < 0)
		return -errno;
	if (q->size)
		memcpy(call_buf(q), &a, len < q->size ? len : q->size);
	return len;
}

/*
 * NSM-9: options whose value is plain data and whose effect stays on the
 * tenant's socket: SOCK-16's, NSM-9's list, and a few that real programs set
 * (IPV6_V6ONLY: iperf3 and nginx listen on [::] with it cleared; TCP_INFO:
 * iperf3 reads it). Refused on
 * purpose: SO_REUSEPORT, because every socket of the NSM has the NSM's user ID,
 * so it would let one tenant join another tenant's port group.
 */
static bool option_allowed(uint32_t level, uint32_t name)
{
	switch (level) {
	case SOL_SOCKET:
		switch (name) {
		case SO_REUSEADDR: case SO_TYPE: case SO_ERROR: case SO_BROADCAST:
		case SO_SNDBUF: case SO_RCVBUF: case SO_KEEPALIVE: case SO_LINGER:
		case SO_ACCEPTCONN: case SO_PROTOCOL: case SO_DOMAIN:
		case 20: case 21: case 66: case 67: /* SO_{RCV,SND}TIMEO old and new */
			return true;
		}
		return false;
	case IPPROTO_TCP:
		return name == TCP_NODELAY || name == TCP_MAXSEG || name == TCP_CORK ||
		       name == TCP_KEEPIDLE || name == TCP_KEEPINTVL || name == TCP_KEEPCNT ||
		       name == TCP_QUICKACK || name == TCP_INFO;
	case IPPROTO_IP:
		return name == IP_TOS || name == IP_TTL;
	case IPPROTO_IPV6:
		return name == IPV6_V6ONLY || name == IPV6_UNICAST_HOPS || name == IPV6_TCLASS;
	}
	return false;
}

struct closing { /* NSM-17: a CLOSE reply waiting for our events to be read */
	struct nqe q;
	struct ring *reply_ring;
	uint32_t last_event;
	struct closing *next;
};
static struct closing *closings;

static void do_close(struct sock *s, const struct nqe *q, struct ring *r)
{
	sock_forget(s, true);
	if ((q->op_data & 1) && s->type == SOCK_STREAM) {
		/* ABORT: the application left data unread, reset as Linux does. */
		struct linger l = { .l_onoff = 1, .l_linger = 0 };

		setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
	}
	bool wait = s->any_event && !ring_consumed(EVENT_RING, s->last_event);

	sock_drop(s);
#ifdef VENDOR_BROKEN
	wait = false; /* DEFECT 2: the CLOSE reply may overtake the socket's events */
#endif
	if (!wait) {
		reply(r, q, 0);
		return;
	}
	struct closing *c = calloc(1, sizeof(*c));

	if (!c) {
		perror("vendor-nsm: calloc");
		exit(1);
	}
	c->q = *q;
	c->reply_ring = r;
	c->last_event = s->last_event;
	c->next = closings;
	closings = c;
}

/* TENANT_MAP (NSM-11): open vm-V.nk, map its data area, take the slice. */
static int64_t do_tenant_map(const struct nqe *q)
{
	uint64_t vm = q->op_data;
	struct tenant *t;

	if (vm > 255)
		return -EINVAL;
	t = tenants[vm];
	if (!t) {
		char path[4200];
		int err = 0;

		t = calloc(1, sizeof(*t));
		if (!t)
			return -ENOMEM;
		snprintf(path, sizeof(path), "%s/vm-%u.nk", dev.dir, (unsigned)vm);
		t->map = device_map(path, &t->map_len, &err);
		if (!t->map) {
			free(t);
			return -err;
		}
		if (geometry_read(t->map, t->map_len, &t->g) || t->g.kind != 1) {
			munmap(t->map, t->map_len);
			free(t);
			return -EINVAL;
		}
		t->data = t->map + t->g.data_offset;
	}
	int64_t res = 0;

	if (!span_inside(q->data_ptr, q->size, t->g.send_size, t->g.data_size))
		res = -EFAULT; /* BUF-8: outside the receive half */
	else if (!q->size || q->data_ptr % t->g.buf_size || q->size % t->g.buf_size)
		res = -EINVAL; /* BUF-8: not on granules */
	else if (t->granules && (q->data_ptr != t->slice_off || q->size != t->slice_len))
		res = -EEXIST; /* one slice per tenant */
	if (res || t->granules) { /* refused, or mapped with this slice already */
		if (!tenants[vm]) {
			munmap(t->map, t->map_len);
			free(t);
		}
		return res;
	}
	t->slice_off = q->data_ptr;
	t->slice_len = q->size;
	t->granules = t->free = q->size / t->g.buf_size;
	t->lent = calloc(t->granules, sizeof(*t->lent));
	t->used = calloc(t->granules, 1);
	t->owner_id = calloc(t->granules, sizeof(*t->owner_id));
	t->owner_serial = calloc(t->granules, sizeof(*t->owner_serial));
	if (!t->lent || !t->used || !t->owner_id || !t->owner_serial) {
		free(t->lent);
		free(t->used);
		free(t->owner_id);
		free(t->owner_serial);
		munmap(t->map, t->map_len);
		free(t);
		return -ENOMEM;
	}
	tenants[vm] = t;
	return 0;
}

/* TENANT_UNMAP (NSM-12): close every socket of the tenant, forget it. */
static void drop_tenant_sockets(int vm)
{
	for (int b = 0; b < NBUCKETS; b++)
		for (struct sock *s = buckets[b], *n; s; s = n) {
			n = s->hnext;
			if (vm < 0 || s->vm == vm) {
				sock_forget(s, false); /* the CoreEngine answered them */
				sock_drop(s);
			}
		}
	for (struct closing **p = &closings; *p;) {
		if (vm < 0 || (*p)->q.vm_id == vm) {
			struct closing *c = *p;

			*p = c->next;
			free(c);
		} else {
			p = &(*p)->next;
		}
	}
}

/* BUF_RETURN (BUF-4, BUF-5, NSM-13): answered only when refused. */
static int64_t do_buf_return(const struct nqe *q)
{
	struct tenant *t = q->vm_id ? tenants[q->vm_id] : NULL;

	if (!t || !span_inside(q->data_ptr, q->size, t->slice_off, t->slice_off + t->slice_len))
		return -EFAULT;
	uint64_t rel = q->data_ptr - t->slice_off;
	uint32_t g = rel / t->g.buf_size;

	if (!q->size || rel % t->g.buf_size || t->lent[g] != q->size)
		return -EINVAL;
	uint32_t n = (q->size + t->g.buf_size - 1) / t->g.buf_size;
	struct sock *owner = sock_find(q->vm_id, t->owner_id[g]);

	memset(t->used + g, 0, n);
	t->free += n;
	t->lent[g] = 0;
	if (owner && owner->serial == t->owner_serial[g])
		owner->held -= n;
	if (t->paused) /* BUF-7: resume the sockets that waited for room */
		for (int b = 0; b < NBUCKETS; b++)
			for (struct sock *s = buckets[b]; s; s = s->hnext)
				if (s->vm == q->vm_id && s->paused) {
					s->paused = false;
					t->paused--;
					s->rd_ready = true;
					sock_service(s);
				}
	return 0;
}

/* Ops whose buffer lies in the tenant's send half (nqe.md §2). */
static bool op_has_buffer(uint8_t op)
{
	return op == OP_BIND || op == OP_CONNECT || op == OP_ACCEPT || op == OP_SEND ||
	       op == OP_SETSOCKOPT || op == OP_GETSOCKOPT || op == OP_GETSOCKNAME ||
	       op == OP_GETPEERNAME;
}

/* One socket call; returns its result, or INT64_MIN if it waits or was answered. */
static int64_t socket_call(const struct nqe *q, struct ring *r)
{
	struct tenant *t = tenants[q->vm_id];
	struct sockaddr_storage a;
	int64_t res;

	/* NSM-11: no buffer can lie in an area we have not mapped. */
	if (!t)
		return -EFAULT;
	/* NSM-13: check the buffer before touching it, free of overflow. */
	if (op_has_buffer(q->op) && q->size && !span_inside(q->data_ptr, q->size, 0, t->g.send_size))
		return -EFAULT;
	if (q->op == OP_SOCKET)
		return do_socket(q);
	struct sock *s = sock_find(q->vm_id, q->sock_id);

	if (!s) /* NSM-8, NSM-14: closed, or not this tenant's */
		return -EBADF;
	switch (q->op) {
	case OP_BIND:
		if ((res = addr_in(q, &a)))
			return res;
		return bind(s->fd, (struct sockaddr *)&a, q->size) ? -errno : 0;
	case OP_LISTEN:
		if (listen(s->fd, (int32_t)(q->op_data & 0xffffffff)))
			return -errno;
		s->may_listen = true;
		s->rd_ready = true;
		run_accepts(s);
		return 0;
	case OP_CONNECT: {
		if ((res = addr_in(q, &a)))
			return res;
		if (!connect(s->fd, (struct sockaddr *)&a, q->size)) {
			uint32_t index = reply(r, q, 0);

			/* connected, or disconnected (AF_UNSPEC): from now on
			 * what arrives, or the reset left pending, is news */
			s->reading = true;
			s->fin_sent = false;
			s->rd_ready = true;
			gate(s, r, index); /* NSM-17 */
			return INT64_MIN;
		}
		if (errno != EINPROGRESS || s->connect)
			return -errno;
		s->connect = call_new(q, r); /* NSM-7: answered when done */
		connect_done(s);
		return INT64_MIN;
	}
	case OP_ACCEPT: {
		bool nowait = q->op_data >> 32 & 1;
		uint32_t id = q->op_data & 0xffffffff;

		if (!id)
			return -EINVAL;
		if (sock_find(q->vm_id, id))
			return -EEXIST;
		struct call *c = call_new(q, r);

		if (nowait) { /* answered at once; earlier ACCEPTs come first */
			res = s->accepts ? -EAGAIN : accept_one(s, c);
			free(c);
			return res;
		}
		*s->accepts_tail = c;
		s->accepts_tail = &c->next;
		run_accepts(s);
		return INT64_MIN;
	}
	case OP_SEND: {
		uint32_t alen = q->op_data >> 32 & 0xffff;

		if (alen > q->size || alen > sizeof(a))
			return -EINVAL;
		if ((q->op_data & MSG_DONTWAIT) && s->sends)
			return -EAGAIN;
		struct call *c = call_new(q, r);

#ifdef VENDOR_BROKEN
		/* DEFECT 1: the SEND is answered before the stack took it. */
		reply(r, q, q->size - alen);
#endif
		*s->sends_tail = c;
		s->sends_tail = &c->next;
		run_sends(s);
		return INT64_MIN;
	}
	case OP_SHUTDOWN:
		if ((q->op_data == SHUT_WR || q->op_data == SHUT_RDWR) && s->sends) {
			/* NSM-6: answered at once; the FIN follows the queued bytes */
			if (q->op_data == SHUT_RDWR)
				shutdown(s->fd, SHUT_RD);
			s->shut_wr_later = true;
			return 0;
		}
		if (q->op_data > INT_MAX)
			return -EINVAL;
		res = shutdown(s->fd, (int)q->op_data) ? -errno : 0;
		s->rd_ready = true; /* e.g. a listener's queue was reset */
		sock_service(s);
		return res;
	case OP_CLOSE:
		do_close(s, q, r);
		return INT64_MIN;
	case OP_SETSOCKOPT:
	case OP_GETSOCKOPT: {
		uint32_t level = q->op_data & 0xffffffff, name = q->op_data >> 32;
		uint8_t val[256];
		socklen_t len = q->size < sizeof(val) ? q->size : sizeof(val);

		if (!option_allowed(level, name))
			return -ENOPROTOOPT;
		if (q->op == OP_SETSOCKOPT) {
			if (len)
				memcpy(val, call_buf(q), len);
			return setsockopt(s->fd, level, name, val, len) ? -errno : 0;
		}
		memset(val, 0, sizeof(val));
		if (getsockopt(s->fd, level, name, val, &len))
			return -errno;
		if (q->size)
			memcpy(call_buf(q), val, len < q->size ? len : q->size);
		return len;
	}
	case OP_GETSOCKNAME:
		return addr_out(q, getsockname, s->fd);
	case OP_GETPEERNAME:
		return addr_out(q, getpeername, s->fd);
	}
	return -ENOSYS;
}

/*
 * NSM-10, NQE-12: a receiver's checks, in their priority; then the call.
 * `r` is the ring the reply goes on: JOB for what came on COMPLETION, SEND
 * for what came on RECEIVE (NSM-3, DEV-8).
 */
static void handle(const uint8_t *raw, struct ring *r)
{
	struct nqe q;
	int64_t res;

	nqe_decode(&q, raw);
	if (!op_is_known(q.op)) {
		if (!(q.op & OP_REPLY)) { /* NQE-11: 0xFF, -ENOSYS, buffer echoed */
			struct nqe a = q;

			a.op = OP_UNKNOWN_REPLY;
			a.op_data = (uint64_t)-ENOSYS;
			ring_put(r, &a);
		}
		return;
	}
	if (!op_is_request(q.op)) /* replies and events are never answered (SEC-7) */
		return;
	if (q.reserved[0] || q.reserved[1] || q.reserved[2]) { /* NQE-10 */
		reply(r, &q, -EINVAL);
		return;
	}
	switch (q.op) {
	case OP_ATTACH:
	case OP_DETACH: /* not calls to an NSM */
		res = -EINVAL;
		break;
	case OP_TENANT_MAP:
		res = do_tenant_map(&q);
		break;
	case OP_TENANT_UNMAP:
		if (q.op_data <= 255) {
			drop_tenant_sockets(q.op_data);
			tenant_free(q.op_data);
		}
		res = 0;
		break;
	case OP_BUF_RETURN:
		res = do_buf_return(&q);
		if (!res)
			return; /* accepted returns are not answered */
		break;
	default:
		res = socket_call(&q, r);
		break;
	}
	if (res != INT64_MIN)
		reply(r, &q, res);
}

/* Consume every NQE waiting on our COMPLETION and RECEIVE rings. */
static bool consume(void)
{
	bool work = false;

	for (int qs = 0; qs < dev.g.n_qsets; qs++)
		for (int in = RING_COMPLETION; in <= RING_RECEIVE; in += 2) {
			struct ring *r = &dev.rings[qs][in];
			struct ring *out = &dev.rings[qs][in == RING_COMPLETION ? RING_JOB : RING_SEND];

			if (r->broken)
				continue;
			/* RING-5: acquire on tail: the slots are written before it. */
			uint32_t tail = __atomic_load_n(r->tail, __ATOMIC_ACQUIRE);
			uint32_t head = __atomic_load_n(r->head, __ATOMIC_RELAXED);

			if (!ring_check(r, tail, head))
				continue;
			while (head != tail) {
				uint8_t raw[32];

				memcpy(raw, r->slots + 32 * (head & (r->entries - 1)), 32);
				/* RING-5: release: our read of the slot is complete
				 * before the CoreEngine may reuse it. */
				__atomic_store_n(r->head, ++head, __ATOMIC_RELEASE);
				handle(raw, out);
				work = true;
			}
		}
	return work;
}

/* NSM-17: open gates whose reply the CoreEngine consumed; send due CLOSE replies. */
static bool check_gates(void)
{
	bool work = false;

	for (struct sock **p = &gated; *p;) {
		struct sock *s = *p;

		if (ring_consumed(s->gate_ring, s->gate_index)) {
			*p = s->gnext;
			s->gate_ring = NULL;
			s->rd_ready = true;
			sock_service(s);
			work = true;
		} else {
			p = &s->gnext;
		}
	}
	for (struct closing **p = &closings; *p;) {
		struct closing *c = *p;

		if (ring_consumed(EVENT_RING, c->last_event)) {
			*p = c->next;
			reply(c->reply_ring, &c->q, 0);
			free(c);
			work = true;
		} else {
			p = &c->next;
		}
	}
	return work;
}

static bool flush_all(void)
{
	bool more = false;

	for (int qs = 0; qs < dev.g.n_qsets; qs++)
		for (int out = RING_JOB; out <= RING_SEND; out += 2) {
			ring_flush(&dev.rings[qs][out]);
			more |= dev.rings[qs][out].out_n > 0;
		}
	return more;
}

/* ---- Sleeping on the DEVICE bells (DEV-9, RING-6, RING-7) ------------------ */

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif

static uint32_t bell_armed; /* 1: the main thread sleeps and wants a wake-up */
static uint32_t bell_seen[255];
static int wake_fd;

/* Waits until a DEVICE bell differs from the value the main thread read. */
static void *bell_thread(void *arg)
{
	static struct futex_waitv w[255];

	(void)arg;
	for (;;) {
		while (!__atomic_load_n(&bell_armed, __ATOMIC_ACQUIRE))
			syscall(SYS_futex, &bell_armed, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
		for (int qs = 0; qs < dev.g.n_qsets; qs++) {
			w[qs].uaddr = (uintptr_t)dev.device_bell[qs];
			w[qs].val = bell_seen[qs];
			w[qs].flags = FUTEX_32; /* shared: no FUTEX_PRIVATE_FLAG */
		}
		syscall(SYS_futex_waitv, w, dev.g.n_qsets, 0, NULL, CLOCK_MONOTONIC);
		__atomic_store_n(&bell_armed, 0, __ATOMIC_RELEASE);
		uint64_t one = 1;

		if (write(wake_fd, &one, sizeof(one)) < 0)
			perror("vendor-nsm: eventfd");
	}
	return NULL;
}

static void set_need_wakeup(uint32_t v)
{
	for (int qs = 0; qs < dev.g.n_qsets; qs++) {
		__atomic_store_n(dev.rings[qs][RING_COMPLETION].flags, v, __ATOMIC_RELAXED);
		__atomic_store_n(dev.rings[qs][RING_RECEIVE].flags, v, __ATOMIC_RELAXED);
	}
}

/* RING-6: set NEED_WAKEUP, full fence, look again; true if we may sleep. */
static bool prepare_sleep(void)
{
	/* DEV-9: read the bells before the last check of the rings. */
	for (int qs = 0; qs < dev.g.n_qsets; qs++)
		bell_seen[qs] = __atomic_load_n(dev.device_bell[qs], __ATOMIC_ACQUIRE);
	set_need_wakeup(NEED_WAKEUP);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	for (int qs = 0; qs < dev.g.n_qsets; qs++)
		for (int in = RING_COMPLETION; in <= RING_RECEIVE; in += 2) {
			struct ring *r = &dev.rings[qs][in];

			if (!r->broken && __atomic_load_n(r->tail, __ATOMIC_ACQUIRE) !=
					      __atomic_load_n(r->head, __ATOMIC_RELAXED)) {
				set_need_wakeup(0); /* RING-11 */
				return false;
			}
		}
	__atomic_store_n(&bell_armed, 1, __ATOMIC_RELEASE);
	syscall(SYS_futex, &bell_armed, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
	return true;
}

/* ---- Life (NSM-1, NSM-2, RT-4, RT-7) -------------------------------------- */

static int control_fd = -1;

static void quit(int status)
{
	drop_tenant_sockets(-1); /* NSM-2: close every socket we hold for tenants */
	if (control_fd >= 0)
		close(control_fd); /* RT-4: hang up: the hot-unplug */
	exit(status);
}

int main(int argc, char **argv)
{
	const char *env = getenv("NETKERNEL_CONTROL_FD");
	size_t len;
	int err;

	if (argc != 2 || !env) {
		fprintf(stderr, "usage: NETKERNEL_CONTROL_FD=N vendor-nsm DEVICE (spec/runtime.md RT-7)\n");
		return 2;
	}
	control_fd = atoi(env);
	signal(SIGPIPE, SIG_IGN);

	/* RT-7: the runtime directory is the device file's directory. */
	snprintf(dev.dir, sizeof(dev.dir), "%s", argv[1]);
	char *slash = strrchr(dev.dir, '/');

	if (slash)
		*slash = 0;
	else
		snprintf(dev.dir, sizeof(dev.dir), ".");

	dev.map = device_map(argv[1], &len, &err);
	if (!dev.map || geometry_read(dev.map, len, &dev.g) || dev.g.kind != 2) {
		fprintf(stderr, "vendor-nsm: %s is not an NSM device: %s\n", argv[1],
			dev.map ? "bad header" : strerror(err));
		return 1;
	}
	/* DEV-7: bells at +0 and +64, then JOB, COMPLETION, SEND, RECEIVE. */
	for (int qs = 0; qs < dev.g.n_qsets; qs++) {
		uint8_t *set = dev.map + 256 + qs * dev.g.qset_stride;
		uint32_t ring_bytes = 192 + 32 * dev.g.ring_entries;

		dev.device_bell[qs] = (uint32_t *)set;
		for (int k = 0; k < 4; k++)
			ring_init(&dev.rings[qs][k], set + 128 + k * ring_bytes,
				  dev.g.ring_entries, (uint32_t *)(set + 64));
	}

	epfd = epoll_create1(EPOLL_CLOEXEC);
	wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	sigset_t mask;

	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	pthread_sigmask(SIG_BLOCK, &mask, NULL); /* before the thread: it inherits */
	int sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	struct epoll_event ev = { .events = EPOLLIN };

	ev.data.ptr = &wake_fd;
	epoll_ctl(epfd, EPOLL_CTL_ADD, wake_fd, &ev);
	ev.data.ptr = &sig_fd;
	epoll_ctl(epfd, EPOLL_CTL_ADD, sig_fd, &ev);
	ev.events = EPOLLIN | EPOLLRDHUP;
	ev.data.ptr = &control_fd;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, control_fd, &ev) < 0) {
		perror("vendor-nsm: NETKERNEL_CONTROL_FD");
		return 1;
	}
	pthread_t th;

	if (pthread_create(&th, NULL, bell_thread, NULL)) {
		fprintf(stderr, "vendor-nsm: cannot start the bell thread\n");
		return 1;
	}

	int idle = 0;

	for (;;) {
		bool work = consume();

		work |= check_gates();
		bool backlog = flush_all();
		struct timespec timeout = { 0, 0 };
		bool slept = false;

		/* RING-7: poll a little before sleeping; sleep with a timeout. */
		if (work)
			idle = 0;
		else if (idle < 64)
			idle++;
		else if (backlog || gated || closings)
			/* waiting for the CoreEngine to read one of our rings:
			 * there is no bell for that, so poll every 50 us */
			timeout.tv_nsec = 50 * 1000;
		else if ((slept = prepare_sleep()))
			timeout.tv_nsec = 200 * 1000 * 1000;

		struct epoll_event evs[64];
		int n = epoll_pwait2(epfd, evs, 64, &timeout, NULL);

		if (slept)
			set_need_wakeup(0); /* RING-11: awake, keep NEED_WAKEUP clear */
		for (int i = 0; i < n; i++) {
			void *p = evs[i].data.ptr;

			if (p == &wake_fd) {
				uint64_t v;

				if (read(wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
					perror("vendor-nsm: eventfd");
			} else if (p == &sig_fd) {
				quit(0); /* NSM-2: SIGTERM: close, hang up, exit 0 */
			} else if (p == &control_fd) {
				char buf[256];
				ssize_t r = read(control_fd, buf, sizeof(buf));

				/* NSM-2, RT-7: EOF or hang-up: the CoreEngine is gone */
				if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR) ||
				    (evs[i].events & (EPOLLHUP | EPOLLRDHUP | EPOLLERR)))
					quit(0);
			} else {
				struct sock *s = p;

				if (s->dead)
					continue;
				if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP))
					s->rd_ready = true;
				if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
					s->wr_ready = true;
				sock_service(s);
			}
		}
		while (graveyard) {
			struct sock *s = graveyard;

			graveyard = s->hnext;
			free(s);
		}
		if (n > 0)
			idle = 0;
	}
}
