/* Benchmark workers (include/nk/bench.h): one loop, two socket layers. */
#define _GNU_SOURCE /* accept4 */
#include "nk/bench.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "nk/tenant.h"

/* ---- the two socket layers: t == NULL is Linux, else the C tenant ---------------- */

static int sys_rc(long rc)
{
	return rc < 0 ? -errno : (int)rc;
}

static int x_socket(struct nk_tenant *t)
{
	return t ? nk_tenant_socket(t, AF_INET, SOCK_STREAM, 0)
		 : sys_rc(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
}

static int x_setopt(struct nk_tenant *t, int s, int level, int name, int value)
{
	return t ? nk_tenant_setsockopt(t, s, level, name, &value, sizeof(value))
		 : sys_rc(setsockopt(s, level, name, &value, sizeof(value)));
}

static int x_bind(struct nk_tenant *t, int s, const struct sockaddr_in *a)
{
	const struct sockaddr *sa = (const struct sockaddr *)a;
	return t ? nk_tenant_bind(t, s, sa, sizeof(*a)) : sys_rc(bind(s, sa, sizeof(*a)));
}

static int x_listen(struct nk_tenant *t, int s)
{
	return t ? nk_tenant_listen(t, s, 16) : sys_rc(listen(s, 16));
}

static int x_getsockname(struct nk_tenant *t, int s, struct sockaddr_in *a)
{
	socklen_t len = sizeof(*a);
	struct sockaddr *sa = (struct sockaddr *)a;
	return t ? nk_tenant_getsockname(t, s, sa, &len) : sys_rc(getsockname(s, sa, &len));
}

static int x_accept(struct nk_tenant *t, int s)
{
	return t ? nk_tenant_accept(t, s, NULL, NULL) : sys_rc(accept4(s, NULL, NULL, SOCK_CLOEXEC));
}

static int x_connect(struct nk_tenant *t, int s, const struct sockaddr_in *a)
{
	const struct sockaddr *sa = (const struct sockaddr *)a;
	return t ? nk_tenant_connect(t, s, sa, sizeof(*a)) : sys_rc(connect(s, sa, sizeof(*a)));
}

static long x_send(struct nk_tenant *t, int s, const void *buf, size_t len)
{
	return t ? nk_tenant_send(t, s, buf, len, 0) : (send(s, buf, len, MSG_NOSIGNAL) < 0 ? -errno
											     : (long)len);
}

static long x_recv(struct nk_tenant *t, int s, void *buf, size_t len)
{
	if (t)
		return nk_tenant_recv(t, s, buf, len, 0);
	long n = recv(s, buf, len, 0);
	return n < 0 ? -errno : n;
}

static void x_close(struct nk_tenant *t, int s)
{
	if (t)
		nk_tenant_close(t, s);
	else
		close(s);
}

/* ---- the loops ------------------------------------------------------------------ */

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t fnv1a(uint64_t h, const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

#define FNV_START 0xcbf29ce484222325ULL

static struct sockaddr_in loopback(uint16_t port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

/* send all of buf; a short kernel send is finished by more sends */
static int send_all(struct nk_tenant *t, int s, const char *buf, size_t len)
{
	while (len) {
		long n = x_send(t, s, buf, len);
		if (n < 0)
			return (int)n;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static int recv_exactly(struct nk_tenant *t, int s, char *buf, size_t len)
{
	while (len) {
		long n = x_recv(t, s, buf, len);
		if (n <= 0)
			return n < 0 ? (int)n : -ECONNRESET;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

int nk_bench_listen(struct nk_tenant *t, uint16_t *port)
{
	struct sockaddr_in a = loopback(0);
	int s = x_socket(t), rc;
	if (s < 0)
		return s;
	if ((rc = x_setopt(t, s, SOL_SOCKET, SO_REUSEADDR, 1)) < 0 || (rc = x_bind(t, s, &a)) < 0 ||
	    (rc = x_listen(t, s)) < 0 || (rc = x_getsockname(t, s, &a)) < 0) {
		x_close(t, s);
		return rc;
	}
	*port = ntohs(a.sin_port);
	return s;
}

static int connect_to(struct nk_tenant *t, uint16_t port)
{
	struct sockaddr_in a = loopback(port);
	int s = x_socket(t), rc;
	if (s < 0)
		return s;
	if ((rc = x_setopt(t, s, IPPROTO_TCP, TCP_NODELAY, 1)) < 0 ||
	    (rc = x_connect(t, s, &a)) < 0) {
		x_close(t, s);
		return rc;
	}
	return s;
}

int nk_bench_bulk_recv(struct nk_tenant *t, int listener, uint32_t bufsize, int checksum,
		       struct nk_bench_result *r)
{
	memset(r, 0, sizeof(*r));
	r->checksum = FNV_START;
	char *buf = malloc(bufsize ? bufsize : 1);
	if (!buf)
		return -ENOMEM;
	int c = x_accept(t, listener);
	if (c < 0) {
		free(buf);
		return c;
	}
	double first = 0;
	long n;
	while ((n = x_recv(t, c, buf, bufsize)) > 0) {
		if (r->bytes == 0)
			first = now_s();
		r->bytes += (uint64_t)n;
		if (checksum)
			r->checksum = fnv1a(r->checksum, (unsigned char *)buf, (size_t)n);
	}
	r->seconds = r->bytes ? now_s() - first : 0;
	x_close(t, c);
	x_close(t, listener);
	free(buf);
	return n < 0 ? (int)n : 0;
}

int nk_bench_bulk_send(struct nk_tenant *t, uint16_t port, uint32_t msg_size, double seconds,
		       uint64_t total, int checksum, struct nk_bench_result *r)
{
	memset(r, 0, sizeof(*r));
	r->checksum = FNV_START;
	char *msg = malloc(msg_size ? msg_size : 1);
	if (!msg)
		return -ENOMEM;
	uint64_t x = 0x9e3779b97f4a7c15ULL; /* xorshift: bytes no layer can compress away */
	for (uint32_t i = 0; i < msg_size; i++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		msg[i] = (char)x;
	}
	int s = connect_to(t, port), rc = 0;
	if (s < 0) {
		free(msg);
		return s;
	}
	double start = now_s(), deadline = start + seconds;
	for (uint32_t i = 0; rc == 0; i++) {
		if (total ? r->bytes >= total : (i % 16 == 0 && now_s() >= deadline))
			break;
		size_t len = total && total - r->bytes < msg_size ? total - r->bytes : msg_size;
		msg[0] = (char)i; /* each message differs: the checksum sees order */
		if ((rc = send_all(t, s, msg, len)) == 0) {
			r->bytes += len;
			if (checksum)
				r->checksum = fnv1a(r->checksum, (unsigned char *)msg, len);
		}
	}
	r->seconds = now_s() - start;
	x_close(t, s);
	free(msg);
	return rc;
}

int nk_bench_rr_server(struct nk_tenant *t, int listener, uint32_t size,
		       struct nk_bench_result *r)
{
	memset(r, 0, sizeof(*r));
	char *buf = malloc(size ? size : 1);
	if (!buf)
		return -ENOMEM;
	int c = x_accept(t, listener), rc = 0;
	if (c < 0) {
		free(buf);
		return c;
	}
	x_setopt(t, c, IPPROTO_TCP, TCP_NODELAY, 1);
	for (;;) {
		long n = x_recv(t, c, buf, size);
		if (n <= 0) {
			rc = (int)(n < 0 ? n : 0);
			break;
		}
		if ((size_t)n < size && (rc = recv_exactly(t, c, buf + n, size - (size_t)n)) < 0)
			break;
		if ((rc = send_all(t, c, buf, size)) < 0)
			break;
		r->count++;
	}
	x_close(t, c);
	x_close(t, listener);
	free(buf);
	return rc;
}

int nk_bench_rr_client(struct nk_tenant *t, uint16_t port, uint32_t size, double seconds,
		       struct nk_bench_result *r)
{
	memset(r, 0, sizeof(*r));
	char *buf = malloc(2 * (size_t)(size ? size : 1));
	if (!buf)
		return -ENOMEM;
	memset(buf, 'q', size);
	int s = connect_to(t, port), rc = 0;
	if (s < 0) {
		free(buf);
		return s;
	}
	double start = now_s(), deadline = start + seconds;
	while (rc == 0 && now_s() < deadline) {
		for (int i = 0; i < 8 && rc == 0; i++) {
			if ((rc = send_all(t, s, buf, size)) == 0 &&
			    (rc = recv_exactly(t, s, buf + size, size)) == 0)
				r->count++;
		}
	}
	r->seconds = now_s() - start;
	x_close(t, s);
	free(buf);
	return rc;
}

int nk_bench_call_rtt(struct nk_tenant *t, uint32_t calls, struct nk_bench_result *r)
{
	memset(r, 0, sizeof(*r));
	struct sockaddr_in a = loopback(0);
	int s = x_socket(t), rc = 0;
	if (s < 0)
		return s;
	double start = now_s();
	for (uint32_t i = 0; i < calls && rc == 0; i++)
		if ((rc = x_getsockname(t, s, &a)) == 0)
			r->count++;
	r->seconds = now_s() - start;
	x_close(t, s);
	return rc;
}
