/* nk-agent: the control connections (include/nk/agent_proto.h).
 *
 * Each connection is an AF_UNIX SOCK_SEQPACKET connection from one process of the program.
 * Every struct nk_ag_req is answered by one struct nk_ag_rep, in order (PRE-1). A request
 * that waits for an NQE reply holds its place in the connection's queue of replies and the
 * replies behind it; the loop goes on serving every other connection and socket.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "agent.h"

/* ---- replies, in order ----------------------------------------------------------------- */

struct ag_pend *ag_pend_new(struct ag_conn *c)
{
	struct ag_pend *p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	p->conn = c;
	p->fd = -1;
	if (c->tail)
		c->tail->next = p;
	else
		c->head = p;
	c->tail = p;
	c->npend++;
	return p;
}

static void conn_events(struct ag *a, struct ag_conn *c, bool blocked)
{
	if (c->closed)
		return;
	uint32_t ev = (c->npend < AG_CONN_MAX_PENDING ? EPOLLIN : 0) | (blocked ? EPOLLOUT : 0);
	if (ev == c->events)
		return;
	struct epoll_event e = { .events = ev, .data.ptr = c };
	epoll_ctl(a->epfd, EPOLL_CTL_MOD, c->fd, &e);
	c->events = ev;
}

static void conn_close(struct ag *a, struct ag_conn *c)
{
	if (c->closed)
		return;
	c->closed = true;
	close(c->fd); /* leaves the epoll set */
	c->fd = -1;
	a->nconns--;
}

/* Send the ready replies at the head of the queue; the app end of a new socket goes with
 * its reply (SCM_RIGHTS) and our copy is closed right after (PRE-6: then the app's last
 * close is the last close anywhere). */
void ag_conn_flush(struct ag *a, struct ag_conn *c)
{
	bool blocked = false;
	while (c->head && c->head->ready) {
		struct ag_pend *p = c->head;
		if (!c->closed) {
			struct iovec iov = { &p->rep, sizeof(p->rep) };
			union {
				struct cmsghdr h;
				char buf[CMSG_SPACE(sizeof(int))];
			} u;
			memset(&u, 0, sizeof(u));
			struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
			if (p->fd >= 0) {
				m.msg_control = u.buf;
				m.msg_controllen = sizeof(u.buf);
				struct cmsghdr *h = CMSG_FIRSTHDR(&m);
				h->cmsg_level = SOL_SOCKET;
				h->cmsg_type = SCM_RIGHTS;
				h->cmsg_len = CMSG_LEN(sizeof(int));
				memcpy(CMSG_DATA(h), &p->fd, sizeof(int));
			}
			if (sendmsg(c->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
				if (errno == EAGAIN || errno == EINTR) {
					blocked = true;
					break;
				}
				conn_close(a, c); /* the process is gone: the rest is dropped */
			}
		}
		if (p->fd >= 0)
			close(p->fd);
		c->head = p->next;
		if (!c->head)
			c->tail = NULL;
		c->npend--;
		free(p);
	}
	conn_events(a, c, blocked);
}

void ag_pend_done(struct ag *a, struct ag_pend *p, int64_t result)
{
	if (a->debug)
		fprintf(stderr, "nk-agent: request %u ino %llu -> %lld\n", p->op,
			(unsigned long long)p->ino, (long long)result);
	p->rep.result = result;
	p->ready = true;
	ag_conn_flush(a, p->conn);
}

/* The NQE a request waited for is answered: its reply, with the value it carries. */
void ag_reply_call(struct ag *a, struct ag_call *c, int64_t result)
{
	struct ag_pend *p = c->pend;
	c->pend = NULL;
	if (!p)
		return;
	struct ag_sock *s = ag_sock_by_id(a, c->sock_id);
	switch (c->op) {
	case NK_OP_SOCKET:
		if (result < 0) {
			if (p->fd >= 0)
				close(p->fd);
			p->fd = -1;
			p->rep.arg0 = 0;
			if (s)
				ag_sock_discard(a, s);
		}
		break;
	case NK_OP_SHUTDOWN:
		if (s && s->listening && result == 0)
			s->listening = false; /* accept() now fails with EINVAL (the app end is shut) */
		break;
	case NK_OP_CONNECT:
		if (s && s->stream && result == 0)
			s->connected = true; /* a second attempt, answered synchronously */
		break;
	case NK_OP_LISTEN:
		if (s && result == 0) {
			s->listening = true;
			s->backlog = (int)c->aux; /* a second listen() changes the backlog */
			/* the filler stays: a Linux listener is never writable */
			ag_sock_want_pump(a, s);
		}
		break;
	case NK_OP_GETSOCKOPT:
	case NK_OP_GETSOCKNAME:
	case NK_OP_GETPEERNAME:
		if (result > 0 && c->size) {
			uint32_t k = result < (int64_t)c->room ? (uint32_t)result : c->room;
			if (k > NK_AG_DATA_MAX)
				k = NK_AG_DATA_MAX;
			memcpy(p->rep.data, a->q.data + c->buf, k);
			p->rep.len = k;
		}
		break;
	default:
		break;
	}
	ag_pend_done(a, p, result);
}

/* ---- requests -------------------------------------------------------------------------- */

/* One NQE for request p: lend a buffer (in, or room for the answer), publish. */
static void nqe_call(struct ag *a, struct ag_pend *p, struct ag_sock *s, uint8_t op,
		     uint64_t op_data, const void *in, uint32_t in_len, uint32_t room, int aux)
{
	int tag = ag_call_new(a, op, s->id, false);
	if (tag < 0) {
		ag_pend_done(a, p, tag == -ENETDOWN ? -ECONNRESET : -ENOBUFS);
		return;
	}
	int rc = ag_call_buffer(a, (uint32_t)tag, in, in_len, room);
	if (rc < 0) {
		ag_call_free(a, (uint32_t)tag);
		ag_pend_done(a, p, rc);
		return;
	}
	a->calls[tag].pend = p;
	a->calls[tag].aux = aux;
	ag_publish(a, (uint32_t)tag, op_data);
}

static int64_t kind_of(const struct ag_sock *s)
{
	return (s->stream ? NK_AG_KIND_STREAM : NK_AG_KIND_DGRAM) |
	       (s->listening ? NK_AG_KIND_LISTEN : 0) | (s->domain == AF_INET6 ? NK_AG_KIND_INET6 : 0);
}

static void do_socket(struct ag *a, struct ag_pend *p, const struct nk_ag_req *r)
{
	int domain = (int)r->arg[0], type = (int)r->arg[1], protocol = (int)r->arg[2];
	if (a->ce_dead || a->nsm_dead)
		return ag_pend_done(a, p, -ENETDOWN); /* PRE-9 */
	if (domain != AF_INET && domain != AF_INET6)
		return ag_pend_done(a, p, -EAFNOSUPPORT);
	if (type != SOCK_STREAM && type != SOCK_DGRAM)
		return ag_pend_done(a, p, -ESOCKTNOSUPPORT);
	if (protocol != 0 && protocol != (type == SOCK_STREAM ? IPPROTO_TCP : IPPROTO_UDP))
		return ag_pend_done(a, p, -EPROTONOSUPPORT);
	struct ag_sock *s = ag_sock_new(a);
	if (!s)
		return ag_pend_done(a, p, -EMFILE);
	s->domain = domain;
	s->type = type;
	s->protocol = protocol ? protocol : (type == SOCK_STREAM ? IPPROTO_TCP : IPPROTO_UDP);
	s->stream = type == SOCK_STREAM;
	s->settled = !s->stream; /* a datagram socket is writable at once */
	int tag = ag_call_new(a, NK_OP_SOCKET, s->id, false);
	int app = -1, rc = tag < 0 ? -ENOBUFS : ag_sock_make_pair(a, s, &app);
	if (rc < 0) {
		if (tag >= 0)
			ag_call_free(a, (uint32_t)tag);
		ag_sock_discard(a, s);
		return ag_pend_done(a, p, rc == -EMFILE || rc == -ENFILE ? rc : -ENOBUFS);
	}
	p->fd = app;
	p->rep.arg0 = (int64_t)s->ino;
	a->calls[tag].pend = p;
	uint64_t arg = (uint64_t)(uint16_t)domain | (uint64_t)(uint16_t)type << 16 |
		       (uint64_t)(uint16_t)protocol << 32;
	ag_publish(a, (uint32_t)tag, arg);
}

static void do_connect(struct ag *a, struct ag_pend *p, struct ag_sock *s,
		       const struct nk_ag_req *r)
{
	if (s->stream && s->settled && !s->connected && !s->listening && s->so_error) {
		int e = s->so_error; /* a connect after a failed one reports it, as Linux does */
		s->so_error = 0;
		return ag_pend_done(a, p, -e);
	}
	if (!s->stream || (s->settled && !s->connected && !s->listening)) {
		/* a datagram, or a stream whose first attempt failed: the reply is the result */
		nqe_call(a, p, s, NK_OP_CONNECT, 0, r->data, r->len, 0, 0);
		return;
	}
	if (s->listening)
		return ag_pend_done(a, p, -EINVAL);
	if (s->connecting)
		return ag_pend_done(a, p, -EALREADY);
	if (s->connected)
		return ag_pend_done(a, p, -EISCONN);
	int tag = ag_call_new(a, NK_OP_CONNECT, s->id, false);
	if (tag < 0)
		return ag_pend_done(a, p, tag == -ENETDOWN ? -ECONNRESET : -ENOBUFS);
	int rc = ag_call_buffer(a, (uint32_t)tag, r->data, r->len, 0);
	if (rc < 0) {
		ag_call_free(a, (uint32_t)tag);
		return ag_pend_done(a, p, rc);
	}
	ag_publish(a, (uint32_t)tag, 0);
	s->connecting = true;
	/* PRE-5: at once; the app end turns writable when the reply settles it */
	ag_pend_done(a, p, -EINPROGRESS);
}

/* SO_ERROR (taken and cleared), SO_TYPE, SO_DOMAIN, SO_PROTOCOL, SO_ACCEPTCONN: ours. */
static bool local_sockopt(struct ag *a, struct ag_pend *p, struct ag_sock *s,
			  const struct nk_ag_req *r)
{
	if (r->arg[0] != SOL_SOCKET)
		return false;
	int v;
	switch (r->arg[1]) {
	case SO_ERROR:
		v = s->so_error;
		s->so_error = 0;
		break;
	case SO_TYPE:
		v = s->type;
		break;
	case SO_DOMAIN:
		v = s->domain;
		break;
	case SO_PROTOCOL:
		v = s->protocol;
		break;
	case SO_ACCEPTCONN:
		v = s->listening;
		break;
	default:
		return false;
	}
	memcpy(p->rep.data, &v, sizeof(v));
	p->rep.len = sizeof(v);
	ag_pend_done(a, p, sizeof(v));
	return true;
}

static void do_shutdown(struct ag *a, struct ag_pend *p, struct ag_sock *s, int how)
{
	if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR)
		return ag_pend_done(a, p, -EINVAL);
	if (s->listening) { /* Linux: SHUT_WR is a no-op, a read shutdown stops listening */
		if (how == SHUT_WR)
			return ag_pend_done(a, p, 0);
		s->acceptable = false;
		return nqe_call(a, p, s, NK_OP_SHUTDOWN, (uint64_t)how, NULL, 0, 0, how);
	}
	if (s->stream && !s->connected)
		return ag_pend_done(a, p, -ENOTCONN);
	if (!s->stream || how == SHUT_RD)
		return nqe_call(a, p, s, NK_OP_SHUTDOWN, (uint64_t)how, NULL, 0, 0, how);
	if (s->shut_pend || (s->wr_shut && how == SHUT_WR))
		return ag_pend_done(a, p, 0); /* already on its way */
	/* the app end is shut already: the SHUTDOWN leaves after the bytes before the EOF */
	int queued = 0; /* the app end is shut: what the agent end holds is all there is */
	if (ioctl(s->fd, FIONREAD, &queued) < 0 || queued < 0)
		queued = 0;
	s->shut_pend = p;
	s->shut_how = how;
	s->shut_mark = s->read_total + (uint64_t)queued;
	ag_sock_want_pump(a, s);
}

static int64_t nread(const struct ag_sock *s)
{
	if (!s->stream)
		return s->rx_len ? s->rx[s->rx_head].size - s->rx[s->rx_head].prefix : 0;
	int64_t n = 0;
	for (uint32_t i = 0; i < s->rx_len; i++) {
		const struct ag_rx *x = &s->rx[(s->rx_head + i) % s->rx_cap];
		n += x->size - x->pos;
	}
	return n;
}

static void request(struct ag *a, struct ag_conn *c, const struct nk_ag_req *r)
{
	struct ag_pend *p = ag_pend_new(c);
	if (!p)
		return; /* no memory: the connection falls out of step, the library times out */
	p->op = r->op;
	p->ino = r->ino;
	if (r->op == NK_AG_HELLO) {
		p->rep.arg0 = a->vm_id;
		return ag_pend_done(a, p, getpid());
	}
	if (r->op == NK_AG_SOCKET)
		return do_socket(a, p, r);
	struct ag_sock *s = ag_sock_by_ino(a, r->ino);
	if (!s || s->close_sent)
		return ag_pend_done(a, p, -ENOENT); /* not ours: the library asks libc */
	if (r->len > NK_AG_DATA_MAX)
		return ag_pend_done(a, p, -EINVAL);
	bool addr_ok = r->len > 0 && r->len <= AG_SOCKADDR_ROOM;
	switch (r->op) {
	case NK_AG_LOOKUP:
		return ag_pend_done(a, p, kind_of(s));
	case NK_AG_BIND:
		if (!addr_ok)
			return ag_pend_done(a, p, -EINVAL);
		return nqe_call(a, p, s, NK_OP_BIND, 0, r->data, r->len, 0, 0);
	case NK_AG_LISTEN: {
		if (!s->stream)
			return ag_pend_done(a, p, -EOPNOTSUPP);
		if (s->connected || s->connecting)
			return ag_pend_done(a, p, -EINVAL);
		int64_t backlog = r->arg[0] < 1 ? 1 : r->arg[0] > 4096 ? 4096 : r->arg[0];
		return nqe_call(a, p, s, NK_OP_LISTEN, (uint32_t)backlog, NULL, 0, 0, (int)backlog);
	}
	case NK_AG_CONNECT:
		if (r->len < 2 || r->len > AG_SOCKADDR_ROOM) /* AF_UNSPEC: 2 bytes will do */
			return ag_pend_done(a, p, -EINVAL);
		return do_connect(a, p, s, r);
	case NK_AG_SETSOCKOPT: {
		uint64_t arg = (uint64_t)(uint32_t)r->arg[0] | (uint64_t)(uint32_t)r->arg[1] << 32;
		return nqe_call(a, p, s, NK_OP_SETSOCKOPT, arg, r->data, r->len, 0, 0);
	}
	case NK_AG_GETSOCKOPT: {
		if (local_sockopt(a, p, s, r))
			return;
		uint32_t room = r->arg[2] <= 0 ? 4 : r->arg[2] > NK_AG_DATA_MAX ? NK_AG_DATA_MAX
										 : (uint32_t)r->arg[2];
		uint64_t arg = (uint64_t)(uint32_t)r->arg[0] | (uint64_t)(uint32_t)r->arg[1] << 32;
		return nqe_call(a, p, s, NK_OP_GETSOCKOPT, arg, NULL, 0, room, 0);
	}
	case NK_AG_GETSOCKNAME:
		return nqe_call(a, p, s, NK_OP_GETSOCKNAME, 0, NULL, 0, AG_SOCKADDR_ROOM, 0);
	case NK_AG_GETPEERNAME:
		return nqe_call(a, p, s, NK_OP_GETPEERNAME, 0, NULL, 0, AG_SOCKADDR_ROOM, 0);
	case NK_AG_SHUTDOWN:
		return do_shutdown(a, p, s, (int)r->arg[0]);
	case NK_AG_NREAD:
		return ag_pend_done(a, p, nread(s));
	default:
		return ag_pend_done(a, p, -EINVAL);
	}
}

/* ---- connections ------------------------------------------------------------------------ */

void ag_conn_accept(struct ag *a)
{
	for (;;) {
		int fd = accept4(a->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
		struct ag_conn *c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			return;
		}
		c->tag.kind = AG_K_CONN;
		c->fd = fd;
		c->events = EPOLLIN;
		struct epoll_event e = { .events = EPOLLIN, .data.ptr = c };
		if (epoll_ctl(a->epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
			close(fd);
			free(c);
			return;
		}
		c->next = a->conns;
		a->conns = c;
		a->nconns++;
	}
}

void ag_conn_ready(struct ag *a, struct ag_conn *c, uint32_t events)
{
	if (c->closed)
		return;
	if (events & EPOLLOUT)
		ag_conn_flush(a, c);
	while (!c->closed && c->npend < AG_CONN_MAX_PENDING) {
		struct nk_ag_req r;
		ssize_t n = recv(c->fd, &r, sizeof(r), MSG_DONTWAIT);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			break;
		if (n <= 0) {
			conn_close(a, c); /* the process closed it or is gone */
			break;
		}
		if ((size_t)n < offsetof(struct nk_ag_req, data))
			continue; /* not a request: no answer, as a bad record has no place */
		if ((size_t)n < sizeof(r))
			memset((char *)&r + n, 0, sizeof(r) - (size_t)n);
		if (r.len > (uint32_t)n - offsetof(struct nk_ag_req, data))
			r.len = (uint32_t)n - offsetof(struct nk_ag_req, data);
		request(a, c, &r);
	}
	if (!c->closed)
		conn_events(a, c, c->events & EPOLLOUT);
}

/* Free the connections that are closed and owe nothing any more. */
void ag_conn_reap(struct ag *a)
{
	for (struct ag_conn **pc = &a->conns; *pc;) {
		struct ag_conn *c = *pc;
		if (c->closed)
			ag_conn_flush(a, c); /* drops the ready replies */
		if (c->closed && !c->head) {
			*pc = c->next;
			free(c);
		} else {
			pc = &c->next;
		}
	}
}
