/* nk-agent: the agent ends (PRE-2, PRE-4..PRE-8).
 *
 * A socket is an AF_UNIX pair: the app end went to the program (SCM_RIGHTS), the agent
 * end is here. Bytes the program writes are read from the agent end into send-half
 * buffers and leave as SENDs; EV_DATA is written into the agent end and returned
 * (BUF_RETURN) once the kernel took all of it (BUF-4). Flow control is the kernel's:
 * while a socket has AG_MAX_SENDS in flight or no buffer is free, its agent end is not
 * read, the app end's send buffer fills and the program blocks (or gets EAGAIN), as
 * with a full TCP send buffer (PRE-4).
 *
 * The last close of the app end, in whichever process, shows as EPOLLHUP on the agent
 * end. EPOLLHUP also shows when both directions are shut while the app still holds the
 * fd (shutdown(SHUT_RDWR), or the agent shut its end after a reset), so an EPOLLHUP is
 * checked with sock_diag: an app end still open is watched every tick until it closes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "agent.h"

enum { LISTED_NONE = 0, LISTED_PUMP = 1, LISTED_STARVED = 2 };

static void finish(struct ag *a, struct ag_sock *s);
static void count_send_waiter(struct ag *a, struct ag_sock *s);

/* ---- the table: IDs (ours, NQE-7) and app-end inodes ------------------------------- */

struct ag_sock *ag_sock_by_id(struct ag *a, uint32_t id)
{
	if (id == 0 || id > a->nsocks)
		return NULL;
	return a->socks[id - 1];
}

struct ag_sock *ag_sock_by_ino(struct ag *a, uint64_t ino)
{
	if (!a->hash || ino == 0)
		return NULL;
	for (struct ag_sock *s = a->hash[ino & a->hash_mask]; s; s = s->hnext)
		if (s->ino == ino && !s->freed)
			return s;
	return NULL;
}

static void hash_add(struct ag *a, struct ag_sock *s)
{
	struct ag_sock **b = &a->hash[s->ino & a->hash_mask];
	s->hnext = *b;
	*b = s;
}

static void hash_del(struct ag *a, struct ag_sock *s)
{
	for (struct ag_sock **p = &a->hash[s->ino & a->hash_mask]; *p; p = &(*p)->hnext) {
		if (*p == s) {
			*p = s->hnext;
			return;
		}
	}
}

/* A new socket with the lowest free ID. */
struct ag_sock *ag_sock_new(struct ag *a)
{
	uint32_t id = 0;
	for (uint32_t i = 0; i < a->nsocks; i++) {
		if (!a->socks[i]) {
			id = i + 1;
			break;
		}
	}
	if (!id) {
		uint32_t n = a->nsocks ? a->nsocks * 2 : 64;
		if (n > 1u << 20)
			return NULL;
		struct ag_sock **t = realloc(a->socks, n * sizeof(*t));
		if (!t)
			return NULL;
		memset(t + a->nsocks, 0, (n - a->nsocks) * sizeof(*t));
		id = a->nsocks + 1;
		a->socks = t;
		a->nsocks = n;
	}
	struct ag_sock *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->tag.kind = AG_K_SOCK;
	s->id = id;
	s->fd = -1;
	s->events = ~0u;
	s->rd_ready = true; /* until a read finds the agent end empty */
	a->socks[id - 1] = s;
	a->live++;
	return s;
}

static void list_del(struct ag_sock **head, struct ag_sock *s, size_t link)
{
	for (struct ag_sock **p = head; *p; p = (struct ag_sock **)((char *)*p + link)) {
		if (*p == s) {
			*p = *(struct ag_sock **)((char *)s + link);
			return;
		}
	}
}

/* A call names socket `id` (+1) or no longer does (-1): a socket is freed, and its ID
 * reused, only once no call in flight names it (a late reply must not hit a new one). */
void ag_sock_call_ref(struct ag *a, uint32_t id, int delta)
{
	struct ag_sock *s = ag_sock_by_id(a, id);
	if (!s)
		return;
	s->ncalls += (uint32_t)delta;
	if (delta < 0 && s->release && s->ncalls == 0)
		ag_sock_discard(a, s);
	else if (delta < 0 && s->hup)
		ag_sock_want_pump(a, s); /* the call that held up its CLOSE is answered */
}

static void rx_drop(struct ag *a, struct ag_sock *s)
{
	for (; s->rx_len; s->rx_len--) {
		struct ag_rx *r = &s->rx[s->rx_head];
		ag_buf_return(a, r->off, r->size); /* BUF-4: back, unread */
		s->unread = true;
		s->rx_head = (s->rx_head + 1) % s->rx_cap;
	}
}

/* Forget the socket: its buffers go back, its agent end is closed, its ID is free. The
 * memory itself waits in the graveyard until the current epoll batch is handled. */
void ag_sock_discard(struct ag *a, struct ag_sock *s)
{
	if (s->freed)
		return;
	if (s->ncalls) { /* a reply is still due: free on the last one */
		s->release = true;
		return;
	}
	s->freed = true;
	count_send_waiter(a, s);
	rx_drop(a, s);
	if (s->fd >= 0) {
		close(s->fd); /* leaves the epoll set with it */
		s->fd = -1;
	}
	if (s->ino)
		hash_del(a, s);
	if (s->listed)
		list_del(&a->pump, s, offsetof(struct ag_sock, pnext));
	if (s->listed == LISTED_STARVED)
		list_del(&a->starved, s, offsetof(struct ag_sock, pnext));
	if (s->watching)
		list_del(&a->watch, s, offsetof(struct ag_sock, wnext));
	if (s->shut_pend)
		ag_pend_done(a, s->shut_pend, -ECONNRESET);
	s->shut_pend = NULL;
	a->socks[s->id - 1] = NULL;
	a->live--;
	s->gnext = a->grave;
	a->grave = s;
}

void ag_reap(struct ag *a)
{
	while (a->grave) {
		struct ag_sock *s = a->grave;
		a->grave = s->gnext;
		free(s->rx);
		free(s);
	}
}

/* ---- the pair ------------------------------------------------------------------------ */

/* PRE-5: a new stream socket's app end is not writable until its connection settles.
 * Writing from the app end into the agent end until EAGAIN fills the app end's send
 * buffer (the kernel then says "not writable"); the count is discarded later. */
static uint32_t fill(struct ag *a, int app)
{
	uint32_t total = 0;
	memset(a->scratch, 0, sizeof(a->scratch));
	for (;;) {
		ssize_t n = send(app, a->scratch, sizeof(a->scratch), MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n <= 0)
			return total;
		total += (uint32_t)n;
	}
}

int ag_sock_make_pair(struct ag *a, struct ag_sock *s, int *app_fd)
{
	int sv[2];
	int type = s->stream ? SOCK_STREAM : SOCK_SEQPACKET; /* PRE-8: one record per datagram */
	if (socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) < 0)
		return -errno;
	struct stat st;
	if (fstat(sv[1], &st) < 0 || fcntl(sv[0], F_SETFL, O_NONBLOCK) < 0) {
		int e = errno;
		close(sv[0]);
		close(sv[1]);
		return -e;
	}
	/* the app end is passed without CLOEXEC: the library applies SOCK_CLOEXEC itself */
	s->fd = sv[0];
	s->ino = (uint64_t)st.st_ino;
	hash_add(a, s);
	if (s->stream && !s->settled)
		s->filler = fill(a, sv[1]);
	*app_fd = sv[1];
	ag_sock_update(a, s);
	return 0;
}

/* ---- epoll interest -------------------------------------------------------------------- */

static bool can_send(struct ag *a, const struct ag_sock *s)
{
	(void)a;
	return s->sends < AG_MAX_SENDS && s->listed != LISTED_STARVED;
}

/* Does the socket wait for a SEND's reply before it can go on (nq.c: completions_wanted)?
 * At AG_MAX_SENDS, or its shutdown or close waits for the SENDs before it. */
static void count_send_waiter(struct ag *a, struct ag_sock *s)
{
	bool w = !s->freed && s->sends &&
		 (s->sends >= AG_MAX_SENDS || s->hup || s->in_eof || s->shut_pend);
	if (w != s->waits_send) {
		s->waits_send = w;
		if (w)
			a->send_waiters++;
		else
			a->send_waiters--;
	}
}

void ag_sock_update(struct ag *a, struct ag_sock *s)
{
	count_send_waiter(a, s);
	if (s->fd < 0 || s->freed)
		return;
	if (s->hup) { /* EPOLLHUP cannot be masked: the socket leaves the set, pumps drive it */
		if (s->events != ~0u)
			epoll_ctl(a->epfd, EPOLL_CTL_DEL, s->fd, NULL);
		s->events = ~0u;
		return;
	}
	uint32_t ev = 0;
	if (s->settled && !s->listening && !s->in_eof && can_send(a, s))
		ev |= EPOLLIN;
	if (s->rx_len && s->out_blocked)
		ev |= EPOLLOUT;
	/* a listener whose records fill the backlog: the app's recvmsg frees one and the
	 * kernel calls our write_space, an edge on EPOLLOUT (PRE-7) */
	if (s->listening && s->throttled)
		ev |= EPOLLOUT | EPOLLET;
	if (ev == s->events)
		return;
	struct epoll_event e = { .events = ev, .data.ptr = s };
	epoll_ctl(a->epfd, s->events == ~0u ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, s->fd, &e);
	s->events = ev;
}

void ag_sock_want_pump(struct ag *a, struct ag_sock *s)
{
	if (s->freed || s->listed == LISTED_PUMP)
		return;
	if (s->listed == LISTED_STARVED)
		list_del(&a->starved, s, offsetof(struct ag_sock, pnext));
	s->listed = LISTED_PUMP;
	s->pnext = a->pump;
	a->pump = s;
}

static void starve(struct ag *a, struct ag_sock *s)
{
	if (s->listed)
		return;
	s->listed = LISTED_STARVED;
	s->pnext = a->starved;
	a->starved = s;
}

/* Buffers or call slots were freed: every starved socket tries again. */
void ag_sock_unstarve(struct ag *a)
{
	while (a->starved) {
		struct ag_sock *s = a->starved;
		a->starved = s->pnext;
		s->listed = LISTED_NONE;
		ag_sock_want_pump(a, s);
	}
}

void ag_run_pumps(struct ag *a)
{
	for (int round = 0; round < 4 && a->pump; round++) {
		struct ag_sock *list = a->pump;
		a->pump = NULL;
		while (list) {
			struct ag_sock *s = list;
			list = s->pnext;
			s->listed = LISTED_NONE;
			ag_sock_pump(a, s);
		}
	}
}

/* ---- app -> NSM: the agent end's bytes become SENDs (PRE-4) ------------------------- */

/* Read what the agent end holds and throw it away: after a reset nothing more is sent. */
static void read_void(struct ag *a, struct ag_sock *s)
{
	for (;;) {
		ssize_t n = recv(s->fd, a->scratch, sizeof(a->scratch), MSG_DONTWAIT);
		if (n > 0)
			continue;
		if (n == 0 || (errno != EAGAIN && errno != EINTR))
			s->in_eof = true;
		return;
	}
}

/* One SEND of what the agent end holds; false when nothing more is read now. */
static bool read_stream(struct ag *a, struct ag_sock *s)
{
	int avail = 0;
	if (ioctl(s->fd, FIONREAD, &avail) < 0 || avail <= 0)
		avail = 1; /* nothing, or EOF: recv says which */
	uint32_t want = (uint32_t)avail < AG_CHUNK_MAX ? (uint32_t)avail : AG_CHUNK_MAX;
	bool more = (uint32_t)avail > want; /* FIONREAD saw bytes beyond this SEND */
	uint64_t off;
	if (ag_data_alloc(a, want, &off) < 0) {
		starve(a, s); /* BUF-7: stop reading, never drop */
		return false;
	}
	int tag = ag_call_new(a, NK_OP_SEND, s->id, true);
	if (tag < 0) {
		nk_bufpool_free(a->pool, off, NULL);
		if (tag == -ENETDOWN)
			read_void(a, s);
		else
			starve(a, s);
		return false;
	}
	ssize_t n = recv(s->fd, a->q.data + off, want, MSG_DONTWAIT);
	if (n <= 0) {
		int e = errno;
		ag_call_free(a, (uint32_t)tag);
		nk_bufpool_free(a->pool, off, NULL);
		if (n < 0 && e == ECONNRESET) {
			s->unread = true; /* see took_reset: the bytes before it are read */
			return true;
		}
		if (n == 0 || (e != EAGAIN && e != EINTR))
			s->in_eof = true; /* the app shut its side (or closed it) */
		if (n < 0 && e == EAGAIN)
			s->rd_ready = false; /* empty: epoll says when bytes come */
		return false;
	}
	struct ag_call *c = &a->calls[tag];
	c->buf = off;
	c->size = (uint32_t)n;
	s->sends++;
	s->read_total += (uint64_t)n;
	ag_publish(a, (uint32_t)tag, 0);
	if ((uint32_t)n == want && more)
		return true;
	/* All FIONREAD saw is read. No recv to meet EAGAIN: the agent end is in the epoll set
	 * with EPOLLIN, level-triggered (ag_sock_update: we read it and can send), so bytes
	 * written since, or the EOF, show at the loop's next epoll_wait (PRE-4). */
	s->rd_ready = false;
	return false;
}

/* One datagram record (struct nk_ag_dgram + payload) becomes one SEND, the address as
 * the prefix of op_data bits 32-47 (PRE-8, NQE-15). */
static bool read_dgram(struct ag *a, struct ag_sock *s)
{
	struct nk_ag_dgram h;
	ssize_t total = recv(s->fd, &h, sizeof(h), MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);
	if (total < 0 && errno == ECONNRESET)
		return true; /* the app closed with records unread: reported once */
	if (total <= 0) {
		if (total == 0 || (errno != EAGAIN && errno != EINTR))
			s->in_eof = true;
		if (total < 0 && errno == EAGAIN)
			s->rd_ready = false; /* empty: epoll says when a record comes */
		return false;
	}
	if ((size_t)total < sizeof(h) || h.addrlen > sizeof(h.addr)) {
		if (recv(s->fd, a->scratch, 1, MSG_DONTWAIT) < 0) { /* malformed: dropped */
		}
		return true;
	}
	uint32_t payload = (uint32_t)total - sizeof(h);
	uint32_t size = h.addrlen + payload;
	uint64_t off = 0;
	if (size && ag_data_alloc(a, size, &off) < 0) {
		starve(a, s);
		return false;
	}
	int tag = ag_call_new(a, NK_OP_SEND, s->id, true);
	if (tag < 0) {
		if (size)
			nk_bufpool_free(a->pool, off, NULL);
		if (tag == -ENETDOWN)
			read_void(a, s);
		else
			starve(a, s);
		return false;
	}
	struct iovec iov[2] = { { &h, sizeof(h) }, { a->q.data + off + h.addrlen, payload } };
	struct msghdr m = { .msg_iov = iov, .msg_iovlen = 2 };
	ssize_t n = recvmsg(s->fd, &m, MSG_DONTWAIT);
	if (n < (ssize_t)sizeof(h)) {
		ag_call_free(a, (uint32_t)tag);
		if (size)
			nk_bufpool_free(a->pool, off, NULL);
		return false;
	}
	memcpy(a->q.data + off, h.addr, h.addrlen);
	struct ag_call *c = &a->calls[tag];
	c->buf = off;
	c->size = size;
	s->sends++;
	ag_publish(a, (uint32_t)tag, (uint64_t)h.addrlen << 32);
	return true;
}

static void pump_in(struct ag *a, struct ag_sock *s)
{
	if (s->fd < 0 || !s->settled || s->listening || s->in_eof)
		return;
	if (s->broken || a->ce_dead) {
		read_void(a, s);
		return;
	}
	/* Nothing to read since the last read emptied the agent end: a pump for another
	 * reason (a SEND answered) makes no system call. After a hang-up the socket is out of
	 * the epoll set (ag_sock_update) and every pump reads. */
	if (!s->rd_ready && !s->hup)
		return;
	for (int i = 0; i < 64 && can_send(a, s) && !s->in_eof; i++)
		if (!(s->stream ? read_stream(a, s) : read_dgram(a, s)))
			break;
}

/* ---- NSM -> app: EV_DATA into the agent end (PRE-4, BUF-4) --------------------------- */

static void rx_pop(struct ag *a, struct ag_sock *s)
{
	struct ag_rx *r = &s->rx[s->rx_head];
	ag_buf_return(a, r->off, r->size); /* BUF-4: the kernel has all of it */
	s->rx_head = (s->rx_head + 1) % s->rx_cap;
	s->rx_len--;
}

static void write_rx(struct ag *a, struct ag_sock *s)
{
	while (s->fd >= 0 && s->rx_len && !s->out_blocked) {
		struct ag_rx *r = &s->rx[s->rx_head];
		ssize_t n;
		if (s->stream) {
			n = send(s->fd, a->q.data + r->off + r->pos, r->size - r->pos,
				 MSG_DONTWAIT | MSG_NOSIGNAL);
		} else {
			struct nk_ag_dgram h = { .addrlen = r->prefix };
			memcpy(h.addr, a->q.data + r->off, r->prefix);
			struct iovec iov[2] = { { &h, sizeof(h) },
						{ a->q.data + r->off + r->prefix, r->size - r->prefix } };
			struct msghdr m = { .msg_iov = iov, .msg_iovlen = 2 };
			n = sendmsg(s->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
		}
		if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			s->out_blocked = true; /* EPOLLOUT says when the app made room */
			break;
		}
		if (n < 0) {
			if (!s->stream && errno == EMSGSIZE) {
				rx_pop(a, s); /* one datagram too large for the pair: dropped */
				continue;
			}
			rx_drop(a, s); /* EPIPE: the app shut its reading side or is gone */
			break;
		}
		if (s->stream && (r->pos += (uint32_t)n) < r->size)
			continue; /* partial: kept, the rest goes next */
		rx_pop(a, s);
	}
	if (!s->rx_len && s->fin && !s->fin_done && s->fd >= 0) {
		shutdown(s->fd, SHUT_WR); /* PRE-6: EV_FIN after the data: the app reads EOF */
		s->fin_done = true;
	}
}

static int rx_push(struct ag_sock *s, const struct ag_rx *r)
{
	if (s->rx_len == s->rx_cap) {
		uint32_t n = s->rx_cap ? s->rx_cap * 2 : 16;
		struct ag_rx *q = malloc(n * sizeof(*q));
		if (!q)
			return -ENOMEM;
		for (uint32_t i = 0; i < s->rx_len; i++)
			q[i] = s->rx[(s->rx_head + i) % s->rx_cap];
		free(s->rx);
		s->rx = q;
		s->rx_head = 0;
		s->rx_cap = n;
	}
	s->rx[(s->rx_head + s->rx_len) % s->rx_cap] = *r;
	s->rx_len++;
	return 0;
}

void ag_sock_data(struct ag *a, struct ag_sock *s, const struct nk_nqe *n)
{
	uint64_t prefix = n->op_data;
	struct ag_rx r = { .off = n->data_ptr, .size = n->size };
	if (s->stream ? prefix != 0 : (prefix > AG_SOCKADDR_ROOM || prefix > n->size)) {
		ag_buf_return(a, n->data_ptr, n->size); /* not what the op table allows */
		return;
	}
	r.prefix = (uint32_t)prefix;
	if (rx_push(s, &r) < 0) {
		ag_buf_return(a, n->data_ptr, n->size);
		s->unread = true;
		return;
	}
	write_rx(a, s); /* at once: the latency of a request/response is this hop */
	ag_sock_update(a, s);
}

void ag_sock_fin(struct ag *a, struct ag_sock *s)
{
	s->fin = true;
	write_rx(a, s);
	ag_sock_update(a, s);
}

/* ---- errors (PRE-6, PRE-9) ----------------------------------------------------------- */

/* A reset stream: SO_ERROR, the data held is dropped, the agent end shut both ways so the
 * app reads EOF and its writes fail with EPIPE. A datagram socket stays usable. */
static void reset(struct ag *a, struct ag_sock *s, int err)
{
	if (a->debug)
		fprintf(stderr, "nk-agent: socket %u reset: %s\n", s->id, strerror(err));
	if (!s->so_error)
		s->so_error = err;
	if (s->broken)
		return;
	s->broken = true;
	rx_drop(a, s);
	s->unread = false; /* the NSM's side is gone: no ABORT needed for it */
	if (s->fd >= 0)
		shutdown(s->fd, SHUT_RDWR);
	ag_sock_want_pump(a, s);
}

void ag_sock_error(struct ag *a, struct ag_sock *s, int err)
{
	if (!s->stream) {
		s->so_error = err; /* e.g. ECONNREFUSED from ICMP: the next call's (PRE-8) */
		return;
	}
	reset(a, s, err);
}

/* The CoreEngine (GL-9) or the NSM (CE-19) is gone: every socket is reset (PRE-9). */
void ag_all_broken(struct ag *a, int err)
{
	for (uint32_t i = 0; i < a->nsocks; i++) {
		struct ag_sock *s = a->socks[i];
		if (!s || s->freed)
			continue;
		if (s->connecting && a->ce_dead) /* no CONNECT reply will come */
			ag_sock_settle(a, s, -err);
		reset(a, s, err);
	}
}

/* ---- replies ---------------------------------------------------------------------------- */

void ag_sock_send_done(struct ag *a, struct ag_sock *s, int64_t result, uint32_t size)
{
	s->sends--;
	if (result < 0 && !s->broken) {
		if (s->stream)
			reset(a, s, (int)-result);
		else
			s->so_error = (int)-result;
	} else if (s->stream && result < size && !s->broken) {
		reset(a, s, EPIPE); /* the stack took part of it: the connection broke */
	}
	ag_sock_unstarve(a);
	ag_sock_want_pump(a, s);
}

/* PRE-5: the CONNECT is answered: SO_ERROR says how, the filler goes, the app end becomes
 * writable (also after a failure, as a failed Linux connect is writable). */
void ag_sock_settle(struct ag *a, struct ag_sock *s, int64_t result)
{
	if (!s->connecting)
		return;
	s->connecting = false;
	s->settled = true;
	s->rd_ready = true; /* the app may write from now on: look */
	if (result == 0)
		s->connected = true;
	else if (!s->so_error)
		s->so_error = (int)-result;
	while (s->filler && s->fd >= 0) {
		uint32_t k = s->filler < sizeof(a->scratch) ? s->filler : sizeof(a->scratch);
		ssize_t n = recv(s->fd, a->scratch, k, MSG_DONTWAIT);
		if (n <= 0)
			break; /* cannot happen: the filler is in the queue already */
		s->filler -= (uint32_t)n;
	}
	ag_sock_want_pump(a, s);
}

void ag_sock_closed(struct ag *a, struct ag_sock *s)
{
	s->release = true;
	if (s->ncalls == 0)
		ag_sock_discard(a, s);
}

/* ---- listen/accept (PRE-7) ------------------------------------------------------------- */

/* Records on the listening agent end that the app has not taken yet: the kernel charges
 * each to our send buffer until the app's recvmsg frees it (SIOCOUTQ). */
static uint32_t records_waiting(struct ag_sock *l)
{
	int outq = 0;
	if (ioctl(l->fd, SIOCOUTQ, &outq) < 0 || outq <= 0)
		return 0;
	uint32_t one = l->rec_size ? l->rec_size : 512;
	return ((uint32_t)outq + one - 1) / one;
}

void ag_sock_accept_more(struct ag *a, struct ag_sock *l)
{
	if (!l->listening || !l->acceptable || l->accepting || l->broken || l->hup ||
	    l->close_sent || l->fd < 0 || a->ce_dead)
		return;
	if (records_waiting(l) >= (uint32_t)l->backlog) {
		l->throttled = true;
		a->throttled_listener = true; /* and the tick looks again */
		ag_sock_update(a, l);
		return;
	}
	if (l->throttled) {
		l->throttled = false;
		ag_sock_update(a, l);
	}
	struct ag_sock *n = ag_sock_new(a);
	if (!n)
		return;
	int tag = ag_call_new(a, NK_OP_ACCEPT, l->id, false);
	if (tag < 0 || ag_call_buffer(a, (uint32_t)tag, NULL, 0, AG_SOCKADDR_ROOM) < 0) {
		if (tag >= 0)
			ag_call_free(a, (uint32_t)tag);
		ag_sock_discard(a, n);
		a->throttled_listener = true;
		return;
	}
	n->domain = l->domain;
	n->type = l->type;
	n->protocol = l->protocol;
	n->stream = true;
	n->accept_pending = true; /* events for it may come before the reply: held */
	a->calls[tag].aux = (int)n->id;
	l->accepting = true;
	/* bit 32: do not wait, the NSM answers EAGAIN when none is pending */
	ag_publish(a, (uint32_t)tag, (uint64_t)n->id | 1ull << 32);
}

static void send_record(struct ag *a, struct ag_sock *l, int app, const void *addr, int64_t len)
{
	struct nk_ag_accept rec = { .addrlen = (uint32_t)len };
	memcpy(rec.addr, addr, len < (int64_t)sizeof(rec.addr) ? (size_t)len : sizeof(rec.addr));
	struct iovec iov = { &rec, sizeof(rec) };
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(sizeof(int))];
	} u;
	memset(&u, 0, sizeof(u));
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
			    .msg_controllen = sizeof(u.buf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &app, sizeof(int));
	bool empty = records_waiting(l) == 0;
	if (l->fd < 0 || sendmsg(l->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
		return; /* the listener is gone: the app end's close below is the last one */
	int outq = 0;
	if (empty && !l->rec_size && ioctl(l->fd, SIOCOUTQ, &outq) == 0 && outq > 0)
		l->rec_size = (uint32_t)outq; /* what one record costs, measured once */
	(void)a;
}

void ag_sock_accepted(struct ag *a, struct ag_sock *l, uint32_t new_id, int64_t result,
		      const void *addr)
{
	struct ag_sock *n = ag_sock_by_id(a, new_id);
	l->accepting = false;
	if (result < 0) {
		if (n)
			ag_sock_discard(a, n);
		if (result == -EAGAIN || result == -EINVAL)
			l->acceptable = false; /* the next EV_ACCEPTABLE says when */
		else
			a->throttled_listener = true; /* a transient failure: retried at the tick */
		return;
	}
	if (!n)
		return;
	n->accept_pending = false;
	n->settled = n->connected = true; /* an accepted connection has no filler */
	int app;
	if (ag_sock_make_pair(a, n, &app) < 0) {
		n->hup = n->in_eof = true; /* no pair: closed at once */
		ag_sock_want_pump(a, n);
	} else {
		send_record(a, l, app, addr, result);
		close(app); /* ours; if the record failed this close is the last: EPOLLHUP */
		ag_sock_want_pump(a, n);
	}
	ag_sock_accept_more(a, l);
}

/* ---- shutdown and close (PRE-6) ----------------------------------------------------------- */

/* SHUTDOWN(SHUT_WR) of a connected stream whose app end was shut for writing. */
static void shut_wr(struct ag *a, struct ag_sock *s)
{
	if (s->shut_pend || s->wr_shut || s->broken || !s->stream || !s->connected || a->ce_dead)
		return;
	int tag = ag_call_new(a, NK_OP_SHUTDOWN, s->id, false);
	if (tag < 0) {
		starve(a, s);
		return;
	}
	a->calls[tag].aux = SHUT_WR;
	ag_publish(a, (uint32_t)tag, SHUT_WR);
	s->wr_shut = true;
}

/* After the bytes before it are SENT: the SHUTDOWN the app asked for (NK_AG_SHUTDOWN), or
 * SHUT_WR for an app that shut its side or closed (the agent end read EOF). */
void ag_sock_try_shutdown(struct ag *a, struct ag_sock *s)
{
	if (s->sends || !s->settled)
		return;
	/* NK_AG_SHUTDOWN: the bytes the agent end held at the request are read and SENT
	 * (the library shut the app end first, so that is everything before the EOF) */
	if (s->shut_pend && (s->in_eof || s->read_total >= s->shut_mark || s->broken)) {
		struct ag_pend *p = s->shut_pend;
		if (s->broken || a->ce_dead) {
			s->shut_pend = NULL;
			ag_pend_done(a, p, -ENOTCONN);
			return;
		}
		int tag = ag_call_new(a, NK_OP_SHUTDOWN, s->id, false);
		if (tag < 0) {
			starve(a, s);
			return;
		}
		s->shut_pend = NULL;
		a->calls[tag].pend = p;
		a->calls[tag].aux = s->shut_how;
		ag_publish(a, (uint32_t)tag, (uint64_t)s->shut_how);
		if (s->shut_how != SHUT_RD)
			s->wr_shut = true;
		return;
	}
	/* not after a hang-up: a closed app end gets CLOSE, whose FIN (or reset) says it all */
	if (s->in_eof && !s->hup)
		shut_wr(a, s);
}

/* Every app reference is gone: CLOSE, with ABORT if EV_DATA was dropped unread. */
static void send_close(struct ag *a, struct ag_sock *s)
{
	rx_drop(a, s);
	if (a->ce_dead) {
		ag_sock_discard(a, s);
		return;
	}
	int tag = ag_call_new(a, NK_OP_CLOSE, s->id, false);
	if (tag < 0) {
		if (tag == -ENETDOWN)
			ag_sock_discard(a, s);
		else
			starve(a, s);
		return;
	}
	if (a->debug)
		fprintf(stderr, "nk-agent: CLOSE %u%s\n", s->id, s->unread ? " ABORT" : "");
	ag_publish(a, (uint32_t)tag, s->unread ? NK_CLOSE_ABORT : 0);
	s->close_sent = true;
	if (s->fd >= 0) {
		close(s->fd);
		s->fd = -1;
	}
	if (s->ino) {
		hash_del(a, s); /* the inode may be reused by a new pair now */
		s->ino = 0;
	}
}

/* The agent is leaving a device that no detach will clean up (a handed device, spec/vm.md
 * VM-6): CLOSE every socket it still has, so that the next device side on the device
 * starts with no socket of ours in the CoreEngine's table. The exit waits for the replies
 * (GL-10). A socket an ACCEPT is still creating is closed with its listener (NSM-8). */
void ag_close_all(struct ag *a)
{
	for (uint32_t i = 0; i < a->nsocks; i++) {
		struct ag_sock *s = a->socks[i];
		if (s && !s->freed && !s->close_sent && !s->accept_pending)
			send_close(a, s);
	}
}

/* After EPOLLHUP and the last bytes SENT: is the app end really closed? */
static void finish(struct ag *a, struct ag_sock *s)
{
	/* an ACCEPT or a CONNECT in flight is answered -EBADF by the CLOSE (NSM-8): no need to
	 * wait for it (a connect to a silent host takes minutes); other calls are waited for */
	uint32_t cut = (s->accepting ? 1u : 0u) + (s->connecting ? 1u : 0u);
	if (s->close_sent || s->accept_pending || s->ncalls > s->sends + cut)
		return;
	int alive = s->ino ? ag_diag_alive(a, s->ino) : 0;
	if (alive == 1) { /* both directions shut, the app still holds it: watched */
		shut_wr(a, s);
		if (!s->watching) {
			s->watching = true;
			s->watch_gap = (int64_t)AG_TICK_MS * 1000000;
			s->watch_at = ag_now_ns() + s->watch_gap;
			s->wnext = a->watch;
			a->watch = s;
		}
		return;
	}
	send_close(a, s);
}

/* Make whatever progress the socket can make now. */
void ag_sock_pump(struct ag *a, struct ag_sock *s)
{
	if (s->freed || s->close_sent)
		return;
	write_rx(a, s);
	if (s->hup && (!s->settled || s->listening))
		s->in_eof = true; /* nothing to read: the filler is not data */
	pump_in(a, s);
	ag_sock_try_shutdown(a, s);
	if (s->hup && s->in_eof && s->sends == 0)
		finish(a, s);
	ag_sock_update(a, s);
}

/* PRE-6, GL-2: a unix socket released with bytes in its receive queue sets ECONNRESET on
 * its peer (unix_release_sock): the app closed with data it never read, and the CLOSE
 * carries ABORT so the NSM resets the connection, as Linux would. */
static void took_reset(struct ag_sock *s)
{
	int err = 0;
	socklen_t len = sizeof(err);
	if (s->fd >= 0 && getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 &&
	    err == ECONNRESET && s->stream)
		s->unread = true;
}

void ag_sock_ready(struct ag *a, struct ag_sock *s, uint32_t events)
{
	if (s->freed || s->close_sent)
		return;
	if (events & (EPOLLHUP | EPOLLERR)) {
		s->hup = true;
		took_reset(s);
	}
	if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		s->rd_ready = true;
	if (events & EPOLLOUT)
		s->out_blocked = false;
	if ((events & EPOLLOUT) && s->listening)
		ag_sock_accept_more(a, s);
	ag_sock_pump(a, s);
}

/* Every AG_TICK_MS: watched app ends, throttled listeners. */
void ag_tick(struct ag *a)
{
	struct ag_sock **p = &a->watch;
	int64_t now = ag_now_ns();
	while (*p) {
		struct ag_sock *s = *p;
		if (now < s->watch_at) {
			p = &s->wnext;
			continue;
		}
		if (s->watch_gap < 640000000)
			s->watch_gap *= 2; /* an app end held open long is looked at less often */
		s->watch_at = now + s->watch_gap;
		if (ag_diag_alive(a, s->ino) != 1) {
			*p = s->wnext;
			s->watching = false;
			send_close(a, s);
		} else {
			p = &s->wnext;
		}
	}
	if (a->throttled_listener) {
		a->throttled_listener = false;
		for (uint32_t i = 0; i < a->nsocks; i++) {
			struct ag_sock *s = a->socks[i];
			if (s && !s->freed && s->listening)
				ag_sock_accept_more(a, s);
		}
	}
	if (a->starved && ag_calls_in_flight(a) == 0)
		ag_sock_unstarve(a); /* nothing will free anything: try again */
}
