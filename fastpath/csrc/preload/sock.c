/* The socket calls: which sockets go to NetKernel (PRE-3), and the control
 * requests for what the app end's byte stream cannot say (agent_proto.h).
 *
 * Every function here starts by asking whether fd is a NetKernel socket; if not,
 * the call is libc's, untouched. fds are the kernel's (dup, close, fcntl are the
 * real calls); the table only follows them so it knows which fds are ours. */
#include "preload.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#define SA(a) ((a).__sockaddr__)  /* glibc's transparent sockaddr unions (_GNU_SOURCE) */

/* An AF_INET/AF_INET6 TCP or UDP socket: NetKernel's. Raw, packet, netlink, unix,
 * SCTP, ICMP ping sockets, UDP-Lite: libc's (PRE-3). */
static bool netkernel_socket(int domain, int type, int protocol)
{
	if (domain != AF_INET && domain != AF_INET6)
		return false;
	if (type == SOCK_STREAM)
		return protocol == 0 || protocol == IPPROTO_TCP;
	if (type == SOCK_DGRAM)
		return protocol == 0 || protocol == IPPROTO_UDP;
	return false;
}

/* fd's kind and name (st_ino) if it is a NetKernel socket. */
static bool ours(int fd, uint32_t *kind, uint64_t *ino)
{
	*kind = nk_fd_kind(fd);
	if (*kind == 0)
		return false;
	struct nk_fd *e = nk_fd_get(fd);
	*ino = __atomic_load_n(&e->ino, __ATOMIC_RELAXED);
	return true;
}

static void set_flags(int fd, bool cloexec, bool nonblock)
{
	if (!cloexec)
		REAL(fcntl)(fd, F_SETFD, 0);
	if (nonblock)
		REAL(fcntl)(fd, F_SETFL, REAL(fcntl)(fd, F_GETFL) | O_NONBLOCK);
}

NK_EXPORT int socket(int domain, int type, int protocol)
{
	int base = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (!netkernel_socket(domain, base, protocol)) {
		int fd = REAL(socket)(domain, type, protocol);
		struct stat st;
		/* A unix socket is never asked about later (an app end looks like one). */
		if (fd >= 0 && domain == AF_UNIX && fstat(fd, &st) == 0)
			nk_fd_set(fd, NK_FD_NOT_OURS, 0, st.st_ino);
		return fd;
	}
	struct nk_ag_req req = { .op = NK_AG_SOCKET, .arg = { domain, base, protocol } };
	struct nk_ag_rep rep;
	int fd;
	int64_t r = nk_ctl(&req, &rep, &fd, true);
	if (r < 0) {
		if (fd >= 0)
			REAL(close)(fd);
		return nk_fail((int)-r);
	}
	if (fd < 0)
		return nk_fail(EMFILE); /* the fd did not fit (RLIMIT_NOFILE): MSG_CTRUNC */
	/* Received with MSG_CMSG_CLOEXEC: no window where exec in another thread leaks it.
	 * Linux sockets are inherited across exec unless SOCK_CLOEXEC: so is ours. */
	set_flags(fd, type & SOCK_CLOEXEC, type & SOCK_NONBLOCK);
	uint32_t kind = base == SOCK_STREAM ? NK_AG_KIND_STREAM | NK_FD_FRESH
					    : NK_AG_KIND_DGRAM | NK_FD_UNCONNECTED;
	if (domain == AF_INET6)
		kind |= NK_AG_KIND_INET6;
	struct stat st;
	uint64_t ino = rep.arg0 ? (uint64_t)rep.arg0 : (fstat(fd, &st) == 0 ? st.st_ino : 0);
	nk_fd_set(fd, NK_FD_OURS, kind, ino);
	return fd;
}

/* One request about socket ino with an address or option value as data. */
static int64_t request(uint32_t op, uint64_t ino, const void *data, size_t len,
		       int64_t a0, int64_t a1, int64_t a2, struct nk_ag_rep *rep)
{
	struct nk_ag_req req = { .op = op, .ino = ino, .arg = { a0, a1, a2 } };
	if (len > NK_AG_DATA_MAX)
		return -EINVAL;
	if (len > 0) {
		if (data == NULL)
			return -EFAULT;
		memcpy(req.data, data, len);
	}
	req.len = (uint32_t)len;
	return nk_ctl(&req, rep, NULL, false);
}

/* Copy a reply's address/value into a caller's (buf, *len) as the kernel does:
 * truncated to the room given, the full length reported. */
static int give(const struct nk_ag_rep *rep, int64_t full, void *buf, socklen_t *len)
{
	if (len == NULL)
		return nk_fail(EFAULT);
	size_t n = (size_t)full < rep->len ? (size_t)full : rep->len;
	if (n > *len)
		n = *len;
	if (n > 0) {
		if (buf == NULL)
			return nk_fail(EFAULT);
		memcpy(buf, rep->data, n);
	}
	*len = (socklen_t)full;
	return 0;
}

NK_EXPORT int bind(int fd, __CONST_SOCKADDR_ARG addr, socklen_t len)
{
	uint32_t kind;
	uint64_t ino;
	if (!ours(fd, &kind, &ino))
		return REAL(bind)(fd, SA(addr), len);
	struct nk_ag_rep rep;
	int64_t r = request(NK_AG_BIND, ino, SA(addr), len, 0, 0, 0, &rep);
	return r < 0 ? nk_fail((int)-r) : 0;
}

NK_EXPORT int listen(int fd, int backlog)
{
	uint32_t kind;
	uint64_t ino;
	if (!ours(fd, &kind, &ino))
		return REAL(listen)(fd, backlog);
	struct nk_ag_rep rep;
	int64_t r = request(NK_AG_LISTEN, ino, NULL, 0, backlog, 0, 0, &rep);
	if (r < 0)
		return nk_fail((int)-r);
	nk_fd_add_kind(fd, NK_AG_KIND_LISTEN);
	nk_fd_del_kind(fd, NK_FD_FRESH);
	return 0;
}

/* How long a blocking connect may wait: SO_SNDTIMEO, as Linux (kept on the app end,
 * see native_option). -1: forever. */
static int connect_timeout_ms(int fd)
{
	struct timeval tv = { 0 };
	socklen_t len = sizeof tv;
	if (REAL(getsockopt)(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, &len) < 0 ||
	    (tv.tv_sec == 0 && tv.tv_usec == 0))
		return -1;
	return (int)(tv.tv_sec * 1000 + (tv.tv_usec + 999) / 1000);
}

static int take_so_error(uint64_t ino)
{
	struct nk_ag_rep rep;
	int64_t r = request(NK_AG_GETSOCKOPT, ino, NULL, 0, SOL_SOCKET, SO_ERROR, sizeof(int), &rep);
	if (r < 0)
		return (int)-r;
	int err = 0;
	memcpy(&err, rep.data, rep.len < sizeof err ? rep.len : sizeof err);
	return err;
}

/* PRE-5: the CONNECT left; a non-blocking socket says EINPROGRESS, a blocking one
 * waits for the app end to become writable (the agent drains its filler when the
 * connection settles) in the kernel's own poll, so a signal interrupts it with
 * EINTR as on Linux (the connection goes on), then takes SO_ERROR. */
static int connect_wait(int fd, uint64_t ino)
{
	int fl = REAL(fcntl)(fd, F_GETFL);
	if (fl >= 0 && (fl & O_NONBLOCK))
		return nk_fail(EINPROGRESS);
	struct pollfd p = { .fd = fd, .events = POLLOUT };
	int r = poll(&p, 1, connect_timeout_ms(fd));
	if (r < 0)
		return -1; /* EINTR */
	if (r == 0)
		return nk_fail(EINPROGRESS); /* SO_SNDTIMEO expired, as Linux */
	int err = take_so_error(ino);
	if (err == 0)
		return 0;
	nk_fd_add_kind(fd, NK_FD_FRESH); /* unconnected again, as a failed Linux connect */
	return nk_fail(err);
}

NK_EXPORT int connect(int fd, __CONST_SOCKADDR_ARG addr, socklen_t len)
{
	uint32_t kind;
	uint64_t ino;
	if (!ours(fd, &kind, &ino))
		return REAL(connect)(fd, SA(addr), len);
	struct nk_ag_rep rep;
	int64_t r = request(NK_AG_CONNECT, ino, SA(addr), len, 0, 0, 0, &rep);
	if (kind & NK_AG_KIND_DGRAM) {
		if (r < 0)
			return nk_fail((int)-r);
		if (len >= sizeof(sa_family_t) && SA(addr)->sa_family == AF_UNSPEC)
			nk_fd_add_kind(fd, NK_FD_UNCONNECTED); /* dissolved the association */
		else
			nk_fd_del_kind(fd, NK_FD_UNCONNECTED);
		return 0;
	}
	if (r == -EINPROGRESS || r == 0)
		nk_fd_del_kind(fd, NK_FD_FRESH);
	if (r == -EINPROGRESS)
		return connect_wait(fd, ino);
	return r < 0 ? nk_fail((int)-r) : 0;
}

/* PRE-7: one struct nk_ag_accept record and its SCM_RIGHTS fd from the listening
 * app end. Blocking or not as the listening fd is; EAGAIN/EINTR are recvmsg's. */
static int accept_record(int fd, uint32_t kind, struct sockaddr *addr, socklen_t *addrlen,
			 int flags)
{
	if (!(kind & NK_AG_KIND_LISTEN))
		return nk_fail(EINVAL);
	if (flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC))
		return nk_fail(EINVAL);
	if (addr != NULL && addrlen == NULL)
		return nk_fail(EFAULT);
	struct nk_ag_accept rec;
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(2 * sizeof(int))];
	} cm;
	struct iovec iov = { &rec, sizeof rec };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf,
			     .msg_controllen = sizeof cm.buf };
	ssize_t n = REAL(recvmsg)(fd, &mh, (flags & SOCK_CLOEXEC) ? MSG_CMSG_CLOEXEC : 0);
	if (n < 0)
		return -1;
	int nfd = -1;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
			int got;
			memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof got);
			if (nfd < 0)
				nfd = got;
			else
				REAL(close)(got);
		}
	}
	if (n == 0 && nfd < 0)
		return nk_fail(EINVAL); /* the listener was shut down (or its agent is gone) */
	if (n != (ssize_t)sizeof rec || nfd < 0) {
		if (nfd >= 0)
			REAL(close)(nfd);
		return nk_fail((mh.msg_flags & MSG_CTRUNC) ? EMFILE : ECONNABORTED);
	}
	set_flags(nfd, true, flags & SOCK_NONBLOCK);
	struct stat st;
	nk_fd_set(nfd, NK_FD_OURS, NK_AG_KIND_STREAM | (kind & NK_AG_KIND_INET6),
		  fstat(nfd, &st) == 0 ? st.st_ino : 0);
	if (addr != NULL) {
		socklen_t full = rec.addrlen <= sizeof rec.addr ? rec.addrlen : sizeof rec.addr;
		memcpy(addr, rec.addr, full < *addrlen ? full : *addrlen);
		*addrlen = full;
	}
	return nfd;
}

NK_EXPORT int accept4(int fd, __SOCKADDR_ARG addr, socklen_t *addrlen, int flags)
{
	uint32_t kind;
	uint64_t ino;
	if (!ours(fd, &kind, &ino))
		return REAL(accept4)(fd, SA(addr), addrlen, flags);
	return accept_record(fd, kind, SA(addr), addrlen, flags);
}

NK_EXPORT int accept(int fd, __SOCKADDR_ARG addr, socklen_t *addrlen)
{
	uint32_t kind;
	uint64_t ino;
	if (!ours(fd, &kind, &ino))
		return REAL(accept)(fd, SA(addr), addrlen);
	return accept_record(fd, kind, SA(addr), addrlen, 0);
}

static int name_request(uint32_t op, int fd, struct sockaddr *addr, socklen_t *len,
			int (*real)(int, struct sockaddr *, socklen_t *))
{
	uint32_t kind;
	uint64_t ino;
	if (!ours(fd, &kind, &ino))
		return real(fd, addr, len);
	struct nk_ag_rep rep;
	int64_t r = request(op, ino, NULL, 0, 0, 0, 0, &rep);
	return r < 0 ? nk_fail((int)-r) : give(&rep, r, addr, len);
}

NK_EXPORT int getsockname(int fd, __SOCKADDR_ARG addr, socklen_t *len)
{
	return name_request(NK_AG_GETSOCKNAME, fd, SA(addr), len, REAL(getsockname));
}

NK_EXPORT int getpeername(int fd, __SOCKADDR_ARG addr, socklen_t *len)
{
	return name_request(NK_AG_GETPEERNAME, fd, SA(addr), len, REAL(getpeername));
}

/* Options that govern the app end itself, where the program blocks: the kernel's
 * own (a receive timeout must time out the read on the app end). */
static bool native_option(int level, int name)
{
	if (level != SOL_SOCKET)
		return false;
	switch (name) {
	case SO_RCVTIMEO:
	case SO_SNDTIMEO:
#if defined(SO_RCVTIMEO_NEW) && SO_RCVTIMEO_NEW != SO_RCVTIMEO
	case SO_RCVTIMEO_NEW:
	case SO_SNDTIMEO_NEW:
#endif
		return true;
	default:
		return false;
	}
}

NK_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
	uint32_t kind;
	uint64_t ino;
	if (!ours(fd, &kind, &ino) || native_option(level, name))
		return REAL(setsockopt)(fd, level, name, val, len);
	struct nk_ag_rep rep;
	int64_t r = request(NK_AG_SETSOCKOPT, ino, val, len, level, name, 0, &rep);
	return r < 0 ? nk_fail((int)-r) : 0;
}

NK_EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
	uint32_t kind;
	uint64_t ino;
	if (!ours(fd, &kind, &ino) || native_option(level, name))
		return REAL(getsockopt)(fd, level, name, val, len);
	if (len == NULL)
		return nk_fail(EFAULT);
	struct nk_ag_rep rep;
	int64_t r = request(NK_AG_GETSOCKOPT, ino, NULL, 0, level, name, *len, &rep);
	return r < 0 ? nk_fail((int)-r) : give(&rep, r, val, len);
}

/* PRE-6: shut the app end first, so the kernel's side of the fd shows it at once
 * (EPIPE on write, EOF on read), then tell the agent, which sends SHUTDOWN after
 * the bytes the app end still holds. */
NK_EXPORT int shutdown(int fd, int how)
{
	uint32_t kind;
	uint64_t ino;
	if (!ours(fd, &kind, &ino))
		return REAL(shutdown)(fd, how);
	if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR)
		return nk_fail(EINVAL);
	REAL(shutdown)(fd, how);
	struct nk_ag_rep rep;
	int64_t r = request(NK_AG_SHUTDOWN, ino, NULL, 0, how, 0, 0, &rep);
	return r < 0 ? nk_fail((int)-r) : 0;
}

/* --- fds: the kernel's calls, the table follows them ------------------------------ */

int nk_close(int fd)
{
	nk_ctl_lost(fd);
	nk_fd_clear(fd);
	return REAL(close)(fd);
}

NK_EXPORT int close(int fd)
{
	return nk_close(fd);
}

/* Forget fds [first, last]: only mapped chunks can hold entries. */
static void forget_range(unsigned first, unsigned last)
{
	for (unsigned fd = first; fd <= last && fd < (1u << 22); fd++) {
		if (nk_fd_get((int)fd) == NULL) {
			fd |= 4095; /* an unmapped chunk: skip it */
			continue;
		}
		nk_ctl_lost((int)fd);
		nk_fd_clear((int)fd);
	}
}

NK_EXPORT int close_range(unsigned first, unsigned last, int flags)
{
	int r = REAL(close_range)(first, last, flags);
	if (r == 0 && !(flags & 4 /* CLOSE_RANGE_CLOEXEC */))
		forget_range(first, last);
	return r;
}

NK_EXPORT void closefrom(int low)
{
	REAL(closefrom)(low);
	forget_range(low < 0 ? 0 : (unsigned)low, ~0U);
}

/* fclose closes its fd inside glibc, where close() is not seen: a FILE made with
 * fdopen() on a socket would leave a stale entry for the fd's next owner. */
NK_EXPORT int fclose(FILE *fp)
{
	int fd = fp != NULL ? fileno(fp) : -1;
	if (fd >= 0) {
		nk_ctl_lost(fd);
		nk_fd_clear(fd);
	}
	return REAL(fclose)(fp);
}

int nk_dup(int fd)
{
	int r = REAL(dup)(fd);
	if (r >= 0)
		nk_fd_copy(fd, r);
	return r;
}

int nk_dup3(int a, int b, int flags)
{
	if (a != b)
		nk_ctl_lost(b); /* the program takes our fd's number: it is its own now */
	int r = REAL(dup3)(a, b, flags);
	if (r >= 0)
		nk_fd_copy(a, r);
	return r;
}

int nk_dup2(int a, int b)
{
	if (a != b)
		nk_ctl_lost(b);
	int r = REAL(dup2)(a, b);
	if (r >= 0 && a != b)
		nk_fd_copy(a, r);
	return r;
}

NK_EXPORT int dup(int fd)
{
	return nk_dup(fd);
}

NK_EXPORT int dup2(int a, int b)
{
	return nk_dup2(a, b);
}

NK_EXPORT int dup3(int a, int b, int flags)
{
	return nk_dup3(a, b, flags);
}

static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, void *arg)
{
	int r = real(fd, cmd, arg);
	if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC))
		nk_fd_copy(fd, r);
	return r;
}

/* glibc reads the third argument as a pointer-sized word whatever cmd is; so do we. */
NK_EXPORT int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	return fcntl_common(REAL(fcntl), fd, cmd, arg);
}

/* Programs built with _FILE_OFFSET_BITS=64 call fcntl64 (glibc >= 2.28). */
NK_EXPORT int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	return fcntl_common(REAL(fcntl64), fd, cmd, arg);
}

/* FIONREAD on UDP is the size of the next datagram (Linux): the kernel's FIONREAD
 * on a seqpacket socket is every queued record with its header. So: the next record
 * in the app end, peeked (MSG_TRUNC gives its full length), else whatever the agent
 * still holds for it (NK_AG_NREAD). TCP: the app end's byte count, the kernel's. */
static int64_t next_datagram(int fd, uint64_t ino)
{
	struct nk_ag_dgram h;
	ssize_t n = REAL(recv)(fd, &h, sizeof h, MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);
	if (n >= (ssize_t)sizeof h)
		return n - (ssize_t)sizeof h;
	struct nk_ag_rep rep;
	return request(NK_AG_NREAD, ino, NULL, 0, 0, 0, 0, &rep);
}

NK_EXPORT int ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	va_start(ap, req);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	if (req == FIONREAD && (nk_fd_kind_fast(fd) & NK_AG_KIND_DGRAM)) {
		uint32_t kind;
		uint64_t ino;
		if (ours(fd, &kind, &ino)) {
			int64_t r = next_datagram(fd, ino);
			if (r < 0)
				return nk_fail((int)-r);
			if (arg == NULL)
				return nk_fail(EFAULT);
			*(int *)arg = (int)r;
			return 0;
		}
	}
	return REAL(ioctl)(fd, req, arg);
}
