/* nkperf: an ordinary TCP socket program for the paper's figures (bench/paper.py).
 *
 * Nothing in it knows NetKernel: `python -m bench` runs the same binary directly
 * (kernel TCP on loopback) and under `netkernel run` (LD_PRELOAD GuestLib) with a
 * kernel NSM or a shm NSM behind it.
 *
 *   nkperf server --port P --mode stream|rr --size M --conns C
 *   nkperf client --port P --mode stream|rr --size M --conns C --seconds T [--host A]
 *
 * The server listens on 127.0.0.1:P (--host A: on A), prints {"ready":true,...} once listening, accepts
 * C connections (a thread each), and prints one JSON line when all of them are closed.
 *
 * stream: every client thread writes M-byte messages for T seconds, then shuts its
 *   write side down and reads until the server closes (the server closes after it has
 *   read EOF): the client's time runs from the first write to that close, so bytes
 *   still in buffers are counted only once they have arrived. bytes / seconds is the
 *   throughput over C connections together.
 * rr: every client thread sends M bytes and waits for the M bytes the server echoes
 *   (TCP_NODELAY on both ends), for T seconds; count / seconds is the round trip rate.
 *
 * The client connects to 127.0.0.1:P, or A:P with --host A (bench/vm.py: a guest whose
 * virtio-net NIC reaches the host's loopback as 10.0.2.2). Each end also reports the CPU
 * seconds its process used (getrusage: "cpu_user", "cpu_sys").
 *
 * Both ends print their own counts; the driver checks they agree.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 256
#define RECV_BUF (256 * 1024)

enum mode { MODE_STREAM, MODE_RR };

struct opts {
	int server;
	int port;
	enum mode mode;
	size_t size;
	int conns;
	double seconds;
	const char *host;
};

struct conn {
	const struct opts *o;
	int fd;
	uint64_t bytes;
	uint64_t count;
	double start;
	double end;
	int err; /* errno of the first failure, 0 if none */
	const char *what;
};

static pthread_barrier_t start_line;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
	fprintf(stderr, "nkperf: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(void)
{
	fprintf(stderr, "usage: nkperf server|client --port P --mode stream|rr --size M"
			" --conns C [--seconds T] [--host A]\n");
	exit(2);
}

static int fail(struct conn *c, const char *what)
{
	if (!c->err) {
		c->err = errno ? errno : EIO;
		c->what = what;
	}
	return -1;
}

/* Write all of buf; -1 with c->err set on an error. */
static int send_all(struct conn *c, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return fail(c, "send");
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Read exactly len bytes: 1 done, 0 EOF before any byte, -1 error or EOF mid-message. */
static int recv_all(struct conn *c, char *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = recv(c->fd, buf + got, len - got, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return fail(c, "recv");
		}
		if (n == 0) {
			if (got == 0)
				return 0;
			errno = EPROTO;
			return fail(c, "recv: EOF inside a message");
		}
		got += (size_t)n;
	}
	return 1;
}

static void nodelay(struct conn *c)
{
	int one = 1;

	if (setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		fail(c, "setsockopt(TCP_NODELAY)");
}

/* Read to EOF, counting bytes (the server's stream side, the client's drain). */
static void drain(struct conn *c, char *buf, size_t cap, uint64_t *bytes)
{
	for (;;) {
		ssize_t n = recv(c->fd, buf, cap, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			fail(c, "recv");
			return;
		}
		if (n == 0)
			return;
		if (bytes)
			*bytes += (uint64_t)n;
	}
}

static void *serve(void *arg)
{
	struct conn *c = arg;
	size_t cap = c->o->mode == MODE_STREAM ? RECV_BUF : c->o->size;
	char *buf = malloc(cap);

	if (!buf) {
		fail(c, "malloc");
		return NULL;
	}
	c->start = now();
	if (c->o->mode == MODE_STREAM) {
		drain(c, buf, cap, &c->bytes);
	} else {
		nodelay(c);
		while (!c->err && recv_all(c, buf, c->o->size) == 1) {
			if (send_all(c, buf, c->o->size) < 0)
				break;
			c->count++;
			c->bytes += c->o->size;
		}
	}
	c->end = now();
	close(c->fd);
	free(buf);
	return NULL;
}

static void *drive(void *arg)
{
	struct conn *c = arg;
	const struct opts *o = c->o;
	char *buf = malloc(o->size > RECV_BUF ? o->size : RECV_BUF);
	double deadline;

	if (!buf) {
		fail(c, "malloc");
		pthread_barrier_wait(&start_line);
		return NULL;
	}
	memset(buf, 'n', o->size);
	if (o->mode == MODE_RR)
		nodelay(c);
	/* Every connection is open before any of them starts the clock. */
	pthread_barrier_wait(&start_line);
	c->start = now();
	deadline = c->start + o->seconds;
	if (o->mode == MODE_STREAM) {
		/* The clock is read once per message: a vDSO call, ~20 ns. */
		while (now() < deadline) {
			if (send_all(c, buf, o->size) < 0)
				break;
			c->count++;
			c->bytes += o->size;
		}
	} else {
		while (now() < deadline) {
			if (send_all(c, buf, o->size) < 0)
				break;
			if (recv_all(c, buf, o->size) != 1) {
				if (!c->err) {
					errno = ECONNRESET;
					fail(c, "recv: EOF before the reply");
				}
				break;
			}
			c->count++;
			c->bytes += o->size;
		}
	}
	/* Done sending: the server reads to EOF, then closes; its close ends our clock. */
	if (shutdown(c->fd, SHUT_WR) < 0)
		fail(c, "shutdown");
	drain(c, buf, RECV_BUF, NULL);
	c->end = now();
	close(c->fd);
	free(buf);
	return NULL;
}

static void report(const struct opts *o, struct conn *cs)
{
	uint64_t bytes = 0, count = 0;
	double start = 0, end = 0;

	for (int i = 0; i < o->conns; i++) {
		struct conn *c = &cs[i];

		if (c->err) {
			fprintf(stderr, "nkperf %s: connection %d: %s: %s\n",
				o->server ? "server" : "client", i, c->what, strerror(c->err));
			printf("{\"role\":\"%s\",\"error\":\"connection %d: %s: %s\"}\n",
			       o->server ? "server" : "client", i, c->what, strerror(c->err));
			exit(1);
		}
		bytes += c->bytes;
		count += c->count;
		if (i == 0 || c->start < start)
			start = c->start;
		if (i == 0 || c->end > end)
			end = c->end;
	}
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	printf("{\"role\":\"%s\",\"mode\":\"%s\",\"size\":%zu,\"conns\":%d,\"bytes\":%llu,"
	       "\"count\":%llu,\"seconds\":%.6f,\"cpu_user\":%.6f,\"cpu_sys\":%.6f}\n",
	       o->server ? "server" : "client", o->mode == MODE_STREAM ? "stream" : "rr",
	       o->size, o->conns, (unsigned long long)bytes, (unsigned long long)count,
	       end - start, (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6,
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6);
	fflush(stdout);
}

static struct sockaddr_in address(const struct opts *o)
{
	struct sockaddr_in sa;

	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)o->port);
	if (inet_pton(AF_INET, o->host, &sa.sin_addr) != 1)
		usage();
	return sa;
}

static void run_server(const struct opts *o, struct conn *cs, pthread_t *th)
{
	struct sockaddr_in sa = address(o);
	socklen_t len = sizeof(sa);
	int one = 1;
	int lfd = socket(AF_INET, SOCK_STREAM, 0);

	if (lfd < 0)
		die("socket");
	if (setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		die("setsockopt(SO_REUSEADDR)");
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("bind");
	if (listen(lfd, MAX_CONNS) < 0)
		die("listen");
	if (getsockname(lfd, (struct sockaddr *)&sa, &len) < 0)
		die("getsockname");
	printf("{\"ready\":true,\"port\":%d}\n", ntohs(sa.sin_port));
	fflush(stdout);
	for (int i = 0; i < o->conns; i++) {
		cs[i].fd = accept(lfd, NULL, NULL);
		if (cs[i].fd < 0) {
			if (errno == EINTR) {
				i--;
				continue;
			}
			die("accept");
		}
		if ((errno = pthread_create(&th[i], NULL, serve, &cs[i])))
			die("pthread_create");
	}
	close(lfd);
}

static void run_client(const struct opts *o, struct conn *cs, pthread_t *th)
{
	struct sockaddr_in sa = address(o);

	for (int i = 0; i < o->conns; i++) {
		cs[i].fd = socket(AF_INET, SOCK_STREAM, 0);
		if (cs[i].fd < 0)
			die("socket");
		if (connect(cs[i].fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
			die("connect");
	}
	for (int i = 0; i < o->conns; i++)
		if ((errno = pthread_create(&th[i], NULL, drive, &cs[i])))
			die("pthread_create");
}

static long number(const char *s, long lo, long hi)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *end || v < lo || v > hi)
		usage();
	return v;
}

int main(int argc, char **argv)
{
	struct opts o = { .port = 0, .mode = MODE_STREAM, .size = 8192, .conns = 1,
			  .seconds = 1.0, .host = "127.0.0.1" };
	struct conn *cs;
	pthread_t *th;

	if (argc < 2)
		usage();
	if (!strcmp(argv[1], "server"))
		o.server = 1;
	else if (strcmp(argv[1], "client"))
		usage();
	for (int i = 2; i < argc; i += 2) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--port"))
			o.port = (int)number(argv[i + 1], 0, 65535);
		else if (!strcmp(argv[i], "--size"))
			o.size = (size_t)number(argv[i + 1], 1, 64L << 20);
		else if (!strcmp(argv[i], "--conns"))
			o.conns = (int)number(argv[i + 1], 1, MAX_CONNS);
		else if (!strcmp(argv[i], "--host"))
			o.host = argv[i + 1];
		else if (!strcmp(argv[i], "--seconds"))
			o.seconds = atof(argv[i + 1]);
		else if (!strcmp(argv[i], "--mode") && !strcmp(argv[i + 1], "stream"))
			o.mode = MODE_STREAM;
		else if (!strcmp(argv[i], "--mode") && !strcmp(argv[i + 1], "rr"))
			o.mode = MODE_RR;
		else
			usage();
	}
	if (!o.server && (o.port == 0 || !(o.seconds > 0)))
		usage();
	cs = calloc((size_t)o.conns, sizeof(*cs));
	th = calloc((size_t)o.conns, sizeof(*th));
	if (!cs || !th)
		die("calloc");
	for (int i = 0; i < o.conns; i++)
		cs[i].o = &o;
	if ((errno = pthread_barrier_init(&start_line, NULL, (unsigned)o.conns)))
		die("pthread_barrier_init");
	if (o.server)
		run_server(&o, cs, th);
	else
		run_client(&o, cs, th);
	for (int i = 0; i < o.conns; i++)
		pthread_join(th[i], NULL);
	report(&o, cs);
	free(cs);
	free(th);
	return 0;
}
