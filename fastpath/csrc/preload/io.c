/* The data calls (PRE-4, PRE-8).
 *
 * TCP: the app end is a stream socket and the kernel moves the bytes; only the
 * address arguments differ (recvfrom/recvmsg return no address, sendto ignores one
 * on a connected socket, as Linux TCP).
 * UDP: the app end is one end of a SOCK_SEQPACKET pair and every record is a
 * struct nk_ag_dgram header and the payload: a send prepends it (iovec, no copy),
 * a receive reads it into its own buffer ahead of the caller's iovec. Record
 * boundaries, MSG_PEEK, MSG_DONTWAIT, MSG_TRUNC, blocking and EINTR are the
 * kernel's seqpacket semantics, which are UDP's.
 *
 * The fast path is nk_fd_kind_fast: two loads, no system call, no lock. */
#include "preload.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SA(a) ((a).__sockaddr__)
#define HDR ((ssize_t)sizeof(struct nk_ag_dgram))
#define UDP4_MAX 65507  /* 65535 - IPv4 header - UDP header */
#define UDP6_MAX 65527  /* 65535 - UDP header (no jumbograms) */

static bool is_dgram(uint32_t kind)
{
	return kind & NK_AG_KIND_DGRAM;
}

static bool is_stream(uint32_t kind)
{
	return kind & NK_AG_KIND_STREAM;
}

/* A stream socket without a connection (never connected, or listening): Linux
 * says ENOTCONN to a receive and EPIPE (with SIGPIPE) to a send; the app end would
 * block instead (PRE-5). */
static ssize_t no_stream_recv(void)
{
	return nk_fail(ENOTCONN);
}

static ssize_t no_stream_send(int flags)
{
	if (!(flags & MSG_NOSIGNAL))
		raise(SIGPIPE);
	return nk_fail(EPIPE);
}

static ssize_t dgram_send(int fd, uint32_t kind, const struct iovec *iov, size_t iovcnt,
			  int flags, const struct sockaddr *to, socklen_t tolen)
{
	struct nk_ag_dgram h = { 0 };
	if (flags & MSG_OOB)
		return nk_fail(EOPNOTSUPP);
	if (iovcnt > IOV_MAX)
		return nk_fail(EMSGSIZE);
	if (to != NULL && tolen > 0) {
		if (tolen < sizeof(sa_family_t))
			return nk_fail(EINVAL);
		h.addrlen = tolen < sizeof h.addr ? tolen : sizeof h.addr;
		memcpy(h.addr, to, h.addrlen);
	} else if (kind & NK_FD_UNCONNECTED) {
		return nk_fail(EDESTADDRREQ);
	}
	struct iovec v[iovcnt + 1];
	size_t total = 0;
	v[0] = (struct iovec){ &h, sizeof h };
	for (size_t i = 0; i < iovcnt; i++) {
		v[i + 1] = iov[i];
		total += iov[i].iov_len;
	}
	if (total > ((kind & NK_AG_KIND_INET6) ? UDP6_MAX : UDP4_MAX))
		return nk_fail(EMSGSIZE);
	struct msghdr mh = { .msg_iov = v, .msg_iovlen = iovcnt + 1 };
	/* UDP never raises SIGPIPE; a gone agent shows as EPIPE only. */
	ssize_t n = REAL(sendmsg)(fd, &mh, (flags & MSG_DONTWAIT) | MSG_NOSIGNAL);
	if (n < 0)
		return -1;
	return n >= HDR ? n - HDR : 0;
}

/* One datagram into iov; its source into (from, *fromlen); MSG_TRUNC into *mflags. */
static ssize_t dgram_recv(int fd, const struct iovec *iov, size_t iovcnt, int flags,
			  struct sockaddr *from, socklen_t *fromlen, int *mflags)
{
	struct nk_ag_dgram h;
	if (flags & MSG_ERRQUEUE)
		return nk_fail(EAGAIN); /* no ICMP errors are queued here */
	if (flags & MSG_OOB)
		return nk_fail(EINVAL);
	if (iovcnt > IOV_MAX)
		return nk_fail(EMSGSIZE);
	struct iovec v[iovcnt + 1];
	v[0] = (struct iovec){ &h, sizeof h };
	for (size_t i = 0; i < iovcnt; i++)
		v[i + 1] = iov[i];
	struct msghdr mh = { .msg_iov = v, .msg_iovlen = iovcnt + 1 };
	ssize_t n = REAL(recvmsg)(fd, &mh, flags & (MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC));
	if (n < 0)
		return -1;
	if (mflags != NULL)
		*mflags = mh.msg_flags & MSG_TRUNC;
	if (n < HDR) {
		/* 0: the agent end is gone (its agent died, PRE-9) or SHUT_RD; as Linux after
		 * shutdown, an empty read. */
		if (fromlen != NULL)
			*fromlen = 0;
		return 0;
	}
	if (from != NULL && fromlen != NULL) {
		socklen_t full = h.addrlen <= sizeof h.addr ? h.addrlen : sizeof h.addr;
		memcpy(from, h.addr, full < *fromlen ? full : *fromlen);
		*fromlen = full;
	}
	return n - HDR;
}

NK_EXPORT ssize_t read(int fd, void *buf, size_t len)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (kind & NK_FD_NO_STREAM)
		return no_stream_recv();
	if (is_dgram(kind)) {
		struct iovec v = { buf, len };
		return dgram_recv(fd, &v, 1, 0, NULL, NULL, NULL);
	}
	return REAL(read)(fd, buf, len);
}

NK_EXPORT ssize_t write(int fd, const void *buf, size_t len)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (kind & NK_FD_NO_STREAM)
		return no_stream_send(0);
	if (is_dgram(kind)) {
		struct iovec v = { (void *)buf, len };
		return dgram_send(fd, kind, &v, 1, 0, NULL, 0);
	}
	return REAL(write)(fd, buf, len);
}

NK_EXPORT ssize_t readv(int fd, const struct iovec *iov, int cnt)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (kind & NK_FD_NO_STREAM)
		return no_stream_recv();
	if (is_dgram(kind)) {
		if (cnt < 0)
			return nk_fail(EINVAL);
		return dgram_recv(fd, iov, (size_t)cnt, 0, NULL, NULL, NULL);
	}
	return REAL(readv)(fd, iov, cnt);
}

NK_EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (kind & NK_FD_NO_STREAM)
		return no_stream_send(0);
	if (is_dgram(kind)) {
		if (cnt < 0)
			return nk_fail(EINVAL);
		return dgram_send(fd, kind, iov, (size_t)cnt, 0, NULL, 0);
	}
	return REAL(writev)(fd, iov, cnt);
}

NK_EXPORT ssize_t send(int fd, const void *buf, size_t len, int flags)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (kind & NK_FD_NO_STREAM)
		return no_stream_send(flags);
	if (is_dgram(kind)) {
		struct iovec v = { (void *)buf, len };
		return dgram_send(fd, kind, &v, 1, flags, NULL, 0);
	}
	return REAL(send)(fd, buf, len, flags);
}

NK_EXPORT ssize_t recv(int fd, void *buf, size_t len, int flags)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (kind & NK_FD_NO_STREAM)
		return no_stream_recv();
	if (is_dgram(kind)) {
		struct iovec v = { buf, len };
		return dgram_recv(fd, &v, 1, flags, NULL, NULL, NULL);
	}
	return REAL(recv)(fd, buf, len, flags);
}

NK_EXPORT ssize_t sendto(int fd, const void *buf, size_t len, int flags,
			 __CONST_SOCKADDR_ARG to, socklen_t tolen)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (kind & NK_FD_NO_STREAM)
		return no_stream_send(flags);
	if (is_dgram(kind)) {
		struct iovec v = { (void *)buf, len };
		return dgram_send(fd, kind, &v, 1, flags, SA(to), tolen);
	}
	if (is_stream(kind))
		return REAL(send)(fd, buf, len, flags); /* TCP ignores the address */
	return REAL(sendto)(fd, buf, len, flags, SA(to), tolen);
}

NK_EXPORT ssize_t recvfrom(int fd, void *buf, size_t len, int flags, __SOCKADDR_ARG from,
			   socklen_t *fromlen)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (kind & NK_FD_NO_STREAM)
		return no_stream_recv();
	if (is_dgram(kind)) {
		struct iovec v = { buf, len };
		return dgram_recv(fd, &v, 1, flags, SA(from), fromlen, NULL);
	}
	if (is_stream(kind)) {
		ssize_t n = REAL(recv)(fd, buf, len, flags);
		if (n >= 0 && SA(from) != NULL && fromlen != NULL)
			*fromlen = 0; /* Linux TCP names no source */
		return n;
	}
	return REAL(recvfrom)(fd, buf, len, flags, SA(from), fromlen);
}

NK_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (kind & NK_FD_NO_STREAM)
		return no_stream_send(flags);
	if (is_dgram(kind))
		return dgram_send(fd, kind, msg->msg_iov, msg->msg_iovlen, flags, msg->msg_name,
				  msg->msg_namelen);
	if (is_stream(kind) && msg->msg_name != NULL) {
		struct msghdr m = *msg;
		m.msg_name = NULL; /* TCP ignores the address; a unix stream would refuse it */
		m.msg_namelen = 0;
		return REAL(sendmsg)(fd, &m, flags);
	}
	return REAL(sendmsg)(fd, msg, flags);
}

NK_EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (kind & NK_FD_NO_STREAM)
		return no_stream_recv();
	if (is_dgram(kind)) {
		msg->msg_controllen = 0; /* no IP_PKTINFO & co (docs/preload-calls.md) */
		return dgram_recv(fd, msg->msg_iov, msg->msg_iovlen, flags, msg->msg_name,
				  &msg->msg_namelen, &msg->msg_flags);
	}
	ssize_t n = REAL(recvmsg)(fd, msg, flags);
	if (n >= 0 && is_stream(kind))
		msg->msg_namelen = 0;
	return n;
}

NK_EXPORT int sendmmsg(int fd, struct mmsghdr *vec, unsigned vlen, int flags)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (!is_dgram(kind))
		return REAL(sendmmsg)(fd, vec, vlen, flags);
	if (vlen > 1024 /* UIO_MAXIOV */)
		vlen = 1024 /* UIO_MAXIOV */;
	unsigned i;
	for (i = 0; i < vlen; i++) {
		ssize_t n = dgram_send(fd, kind, vec[i].msg_hdr.msg_iov, vec[i].msg_hdr.msg_iovlen,
				       flags, vec[i].msg_hdr.msg_name, vec[i].msg_hdr.msg_namelen);
		if (n < 0)
			return i > 0 ? (int)i : -1; /* Linux: the count if any went */
		vec[i].msg_len = (unsigned)n;
	}
	return (int)i;
}

static bool past(const struct timespec *deadline)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return now.tv_sec > deadline->tv_sec ||
	       (now.tv_sec == deadline->tv_sec && now.tv_nsec >= deadline->tv_nsec);
}

/* As Linux: blocks for the first datagram (unless MSG_DONTWAIT); MSG_WAITFORONE makes
 * the rest non-blocking; the timeout is checked after each datagram only. */
NK_EXPORT int recvmmsg(int fd, struct mmsghdr *vec, unsigned vlen, int flags,
		       struct timespec *timeout)
{
	uint32_t kind = nk_fd_kind_fast(fd);
	if (!is_dgram(kind)) {
		int n = REAL(recvmmsg)(fd, vec, vlen, flags, timeout);
		for (int i = 0; is_stream(kind) && i < n; i++)
			vec[i].msg_hdr.msg_namelen = 0;
		return n;
	}
	struct timespec deadline;
	if (timeout != NULL) {
		clock_gettime(CLOCK_MONOTONIC, &deadline);
		deadline.tv_sec += timeout->tv_sec;
		deadline.tv_nsec += timeout->tv_nsec;
		if (deadline.tv_nsec >= 1000000000L) {
			deadline.tv_sec++;
			deadline.tv_nsec -= 1000000000L;
		}
	}
	unsigned i;
	for (i = 0; i < vlen; i++) {
		int f = flags & ~MSG_WAITFORONE;
		if (i > 0 && (flags & MSG_WAITFORONE))
			f |= MSG_DONTWAIT;
		struct msghdr *m = &vec[i].msg_hdr;
		m->msg_controllen = 0;
		ssize_t n = dgram_recv(fd, m->msg_iov, m->msg_iovlen, f, m->msg_name,
				       &m->msg_namelen, &m->msg_flags);
		if (n < 0)
			return i > 0 ? (int)i : -1;
		vec[i].msg_len = (unsigned)n;
		if (timeout != NULL && past(&deadline)) {
			i++;
			break;
		}
	}
	return (int)i;
}

/* The _FORTIFY_SOURCE entry points: the same check glibc makes, then the call. */
extern void __chk_fail(void) __attribute__((noreturn));

NK_EXPORT ssize_t __read_chk(int fd, void *buf, size_t len, size_t buflen)
{
	if (len > buflen)
		__chk_fail();
	return read(fd, buf, len);
}

NK_EXPORT ssize_t __recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags)
{
	if (len > buflen)
		__chk_fail();
	return recv(fd, buf, len, flags);
}

NK_EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags,
				 __SOCKADDR_ARG from, socklen_t *fromlen)
{
	if (len > buflen)
		__chk_fail();
	return recvfrom(fd, buf, len, flags, from, fromlen);
}
