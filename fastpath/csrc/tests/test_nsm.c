/* The C NSM without Python, under ASan + UBSan (`make -C fastpath/csrc test`).
 *
 * This test plays the CoreEngine: it builds an NSM device in shared memory and a
 * tenant device file vm-3.nk in a temporary runtime directory, runs nk_nsm_run()
 * in a thread, writes calls into COMPLETION / RECEIVE and reads the replies and
 * events from JOB / SEND, with plain Linux sockets as the peers.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "nk/bell.h"
#include "nk/device.h"
#include "nk/nqe.h"
#include "nk/nsm.h"
#include "nk/ring.h"

#define VM 3
#define GRANULE 4096u
#define CHECK(cond)                                                                    \
	do {                                                                           \
		if (!(cond)) {                                                         \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
			abort();                                                       \
		}                                                                      \
	} while (0)

static struct nk_geometry nsm_geo = { 1, 64, 2 * GRANULE, GRANULE, GRANULE, NK_KIND_NSM };
static struct nk_geometry vm_geo = { 1, 64, 64 * GRANULE, 32 * GRANULE, GRANULE, NK_KIND_TENANT };

static char *nsm_base, *vm_base, *vm_data;
static struct nk_ring job, completion, sendr, receive;
static uint16_t next_tag = 1;

static void init_header(void *base, const struct nk_geometry *g)
{
	struct nk_dev_header h;
	memset(&h, 0, sizeof(h));
	memcpy(h.magic, NK_DEV_MAGIC, 8);
	h.version = NK_DEV_VERSION;
	h.header_size = NK_DEV_HEADER_SIZE;
	h.features = NK_FEATURE_FUTEX_BELLS;
	h.total_size = nk_geo_total_size(g);
	h.kind = (uint8_t)g->kind;
	h.state = NK_STATE_READY;
	h.n_qsets = (uint16_t)g->n_qsets;
	h.ring_entries = g->ring_entries;
	h.qset_offset = nk_geo_qset_offset(g);
	h.qset_stride = nk_geo_qset_stride(g);
	h.data_offset = nk_geo_data_offset(g);
	h.data_size = g->data_size;
	h.send_size = g->send_size;
	h.buf_size = g->buf_size;
	memcpy(base, &h, sizeof(h));
}

static void push(struct nk_ring *r, struct nk_nqe *q)
{
	while (nk_ring_push(r, q, 1) != 1)
		usleep(100);
	if (nk_ring_consumer_sleeping(r))
		nk_bell_ring((uint32_t *)(nsm_base + nk_geo_bell_offset(&nsm_geo, 0, NK_BELL_DEVICE)));
}

/* The next output on `r` (JOB or SEND), waiting up to 5 s. */
static struct nk_nqe pop(struct nk_ring *r)
{
	struct nk_nqe out;
	for (int i = 0; i < 50000; i++) {
		if (nk_ring_pop(r, &out, 1) == 1)
			return out;
		usleep(100);
	}
	fprintf(stderr, "no output\n");
	abort();
}

static int64_t call(uint8_t op, uint32_t sock, uint64_t op_data, const void *data, uint32_t size,
		    uint32_t out_room)
{
	struct nk_nqe q = { .op = op, .vm_id = VM, .sock_id = sock, .op_data = op_data };
	uint32_t room = size > out_room ? size : out_room;
	q.tag = next_tag++;
	if (room) {
		q.data_ptr = GRANULE;
		q.size = room;
		if (data)
			memcpy(vm_data + GRANULE, data, size);
	}
	bool on_receive = op == NK_OP_SEND || op == NK_OP_BUF_RETURN || op == NK_OP_TENANT_MAP ||
			  op == NK_OP_TENANT_UNMAP;
	push(on_receive ? &receive : &completion, &q);
	struct nk_nqe r = pop(on_receive ? &sendr : &job);
	CHECK(r.op == (op | NK_REPLY_BIT) && r.sock_id == sock && r.tag == q.tag);
	return nk_nqe_result(&r);
}

static struct nk_nqe control(uint8_t op, uint64_t op_data, uint64_t ptr, uint32_t size)
{
	struct nk_nqe q = { .op = op, .op_data = op_data, .data_ptr = ptr, .size = size,
			    .tag = next_tag++ };
	push(&receive, &q);
	return pop(&sendr);
}

static void *runner(void *arg)
{
	return (void *)(intptr_t)nk_nsm_run(arg);
}

static struct sockaddr_in loop4(uint16_t port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

/* An NSM device (anonymous memory) and tenant VM's device file vm-<VM>.nk in a new
 * directory made from the template `dir`, both with fresh headers, and the NSM's four
 * rings of queue set 0 as the CoreEngine's side sees them. Returns the NSM device size. */
static uint64_t make_devices(char *dir, char *path, size_t path_len)
{
	CHECK(mkdtemp(dir));
	uint64_t nsm_len = nk_geo_total_size(&nsm_geo);
	nsm_base = mmap(NULL, nsm_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(nsm_base != MAP_FAILED);
	init_header(nsm_base, &nsm_geo);
	snprintf(path, path_len, "%s/vm-%d.nk", dir, VM);
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
	CHECK(fd >= 0 && ftruncate(fd, (off_t)nk_geo_total_size(&vm_geo)) == 0);
	vm_base = mmap(NULL, nk_geo_total_size(&vm_geo), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(vm_base != MAP_FAILED);
	close(fd);
	init_header(vm_base, &vm_geo);
	vm_data = vm_base + nk_geo_data_offset(&vm_geo);
	uint32_t e = nsm_geo.ring_entries;
	nk_ring_init(&job, nsm_base + nk_geo_ring_offset(&nsm_geo, 0, NK_RING_JOB), e);
	nk_ring_init(&completion, nsm_base + nk_geo_ring_offset(&nsm_geo, 0, NK_RING_COMPLETION), e);
	nk_ring_init(&sendr, nsm_base + nk_geo_ring_offset(&nsm_geo, 0, NK_RING_SEND), e);
	nk_ring_init(&receive, nsm_base + nk_geo_ring_offset(&nsm_geo, 0, NK_RING_RECEIVE), e);
	return nsm_len;
}

static int run_tests(void)
{
	char dir[] = "/tmp/nk-test-nsm-XXXXXX";
	char path[256];
	uint64_t nsm_len = make_devices(dir, path, sizeof(path));

	CHECK(nk_nsm_new(vm_base, nk_geo_total_size(&vm_geo), dir, -1, -1) == NULL); /* not an NSM */
	struct nk_nsm *n = nk_nsm_new(nsm_base, nsm_len, dir, -1, -1);
	CHECK(n);
	CHECK(nk_nsm_set_placement(n, 7) == -EINVAL);
	CHECK(nk_nsm_set_placement(n, NK_PLACE_AUTO) == 0); /* pairing on (spec/shm.md) */
	pthread_t t;
	CHECK(pthread_create(&t, NULL, runner, n) == 0);

	/* NSM-11: TENANT_MAP, again (0), with another slice (EEXIST), a missing tenant (ENOENT) */
	uint64_t half = vm_geo.send_size, slice = vm_geo.data_size - vm_geo.send_size;
	CHECK(call(NK_OP_SOCKET, 1, AF_INET | SOCK_DGRAM << 16, NULL, 0, 0) == -EFAULT);
	CHECK((int64_t)control(NK_OP_TENANT_MAP, VM, half, (uint32_t)slice).op_data == 0);
	CHECK((int64_t)control(NK_OP_TENANT_MAP, VM, half, (uint32_t)slice).op_data == 0);
	CHECK((int64_t)control(NK_OP_TENANT_MAP, VM, half, GRANULE).op_data == -EEXIST);
	CHECK((int64_t)control(NK_OP_TENANT_MAP, 9, half, GRANULE).op_data == -ENOENT);

	/* NSM-5, NSM-15: a UDP socket receives a datagram behind its source sockaddr */
	CHECK(call(NK_OP_SOCKET, 1, AF_INET | SOCK_DGRAM << 16, NULL, 0, 0) == 0);
	CHECK(call(NK_OP_SOCKET, 1, AF_INET | SOCK_DGRAM << 16, NULL, 0, 0) == -EEXIST);
	CHECK(call(NK_OP_SOCKET, 2, AF_INET | SOCK_RAW << 16, NULL, 0, 0) == -EPROTONOSUPPORT);
	struct sockaddr_in any = loop4(0);
	CHECK(call(NK_OP_BIND, 1, 0, &any, sizeof(any), 0) == 0);
	CHECK(call(NK_OP_GETSOCKNAME, 1, 0, NULL, 0, 28) == 16);
	struct sockaddr_in bound;
	memcpy(&bound, vm_data + GRANULE, sizeof(bound));
	int peer = socket(AF_INET, SOCK_DGRAM, 0);
	CHECK(sendto(peer, "hello", 5, 0, (struct sockaddr *)&bound, sizeof(bound)) == 5);
	struct nk_nqe ev = pop(&sendr);
	CHECK(ev.op == NK_OP_EV_DATA && ev.sock_id == 1 && ev.op_data == 16 && ev.size == 21);
	CHECK(ev.data_ptr >= half && ev.data_ptr % GRANULE == 0); /* BUF-2, BUF-8 */
	CHECK(memcmp(vm_data + ev.data_ptr + 16, "hello", 5) == 0);
	/* NSM-13: BUF_RETURN outside the slice, of a part, then exactly (no reply), then again */
	CHECK((int64_t)control(NK_OP_BUF_RETURN, 0, 0, GRANULE).op_data == -EFAULT);
	struct nk_nqe br = { .op = NK_OP_BUF_RETURN, .vm_id = VM, .data_ptr = ev.data_ptr,
			     .size = 20, .tag = next_tag++ };
	push(&receive, &br);
	CHECK((int64_t)pop(&sendr).op_data == -EINVAL);
	br.size = ev.size;
	push(&receive, &br);
	push(&receive, &br);
	struct nk_nqe again = pop(&sendr);
	CHECK(again.op == (NK_OP_BUF_RETURN | NK_REPLY_BIT) && (int64_t)again.op_data == -EINVAL);

	/* NSM-10: an unknown op is answered 0xFF -ENOSYS, a reply is dropped */
	struct nk_nqe bad = { .op = 0x3E, .vm_id = VM, .sock_id = 1, .tag = 777 };
	push(&completion, &bad);
	struct nk_nqe r = pop(&job);
	CHECK(r.op == NK_OP_UNKNOWN_REPLY && (int64_t)r.op_data == -ENOSYS && r.tag == 777);

	/* NSM-7, NSM-6, NSM-15: TCP to a Linux listener, SEND, echo back as EV_DATA, EV_FIN */
	int lst = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in la = loop4(0);
	socklen_t ll = sizeof(la);
	CHECK(bind(lst, (struct sockaddr *)&la, sizeof(la)) == 0 && listen(lst, 4) == 0);
	CHECK(getsockname(lst, (struct sockaddr *)&la, &ll) == 0);
	CHECK(call(NK_OP_SOCKET, 5, AF_INET | SOCK_STREAM << 16, NULL, 0, 0) == 0);
	CHECK(call(NK_OP_CONNECT, 5, 0, &la, sizeof(la), 0) == 0);
	int conn = accept(lst, NULL, NULL);
	CHECK(conn >= 0);
	char msg[3000];
	for (size_t i = 0; i < sizeof(msg); i++)
		msg[i] = (char)(i * 7);
	CHECK(call(NK_OP_SEND, 5, 0, msg, sizeof(msg), 0) == (int64_t)sizeof(msg));
	char got[3000];
	size_t have = 0;
	while (have < sizeof(got)) {
		ssize_t k = recv(conn, got + have, sizeof(got) - have, 0);
		CHECK(k > 0);
		have += (size_t)k;
	}
	CHECK(memcmp(got, msg, sizeof(msg)) == 0);
	CHECK(send(conn, got, sizeof(got), 0) == (ssize_t)sizeof(got));
	close(conn);
	have = 0;
	for (;;) {
		ev = pop(&sendr);
		CHECK(ev.sock_id == 5);
		if (ev.op == NK_OP_EV_FIN)
			break;
		CHECK(ev.op == NK_OP_EV_DATA && ev.op_data == 0 && have + ev.size <= sizeof(msg));
		CHECK(memcmp(vm_data + ev.data_ptr, msg + have, ev.size) == 0);
		have += ev.size;
		br = (struct nk_nqe){ .op = NK_OP_BUF_RETURN, .vm_id = VM, .data_ptr = ev.data_ptr,
				      .size = ev.size, .tag = next_tag++ };
		push(&receive, &br);
	}
	CHECK(have == sizeof(msg));

	/* SHM-2..SHM-9: the tenant connects to its own listener: paired, no TCP */
	CHECK(call(NK_OP_SOCKET, 10, AF_INET | SOCK_STREAM << 16, NULL, 0, 0) == 0);
	struct sockaddr_in here = loop4(0);
	CHECK(call(NK_OP_BIND, 10, 0, &here, sizeof(here), 0) == 0);
	CHECK(call(NK_OP_LISTEN, 10, 4, NULL, 0, 0) == 0);
	CHECK(call(NK_OP_GETSOCKNAME, 10, 0, NULL, 0, 16) == 16);
	memcpy(&here, vm_data + GRANULE, sizeof(here));
	CHECK(call(NK_OP_SOCKET, 11, AF_INET | SOCK_STREAM << 16, NULL, 0, 0) == 0);
	CHECK(call(NK_OP_CONNECT, 11, 0, &here, sizeof(here), 0) == 0); /* SHM-3: at once */
	ev = pop(&sendr);
	CHECK(ev.op == NK_OP_EV_ACCEPTABLE && ev.sock_id == 10 && ev.op_data == 1);
	CHECK(call(NK_OP_ACCEPT, 10, 12, NULL, 0, 16) == 16);
	struct sockaddr_in client;
	memcpy(&client, vm_data + GRANULE, sizeof(client));
	CHECK(call(NK_OP_GETSOCKNAME, 11, 0, NULL, 0, 16) == 16); /* SHM-4 */
	CHECK(memcmp(vm_data + GRANULE, &client, sizeof(client)) == 0 && client.sin_port != 0);
	CHECK(call(NK_OP_GETPEERNAME, 12, 0, NULL, 0, 16) == 16);
	CHECK(memcmp(vm_data + GRANULE, &client, sizeof(client)) == 0);
	CHECK(call(NK_OP_GETPEERNAME, 11, 0, NULL, 0, 16) == 16);
	CHECK(memcmp(vm_data + GRANULE, &here, sizeof(here)) == 0);
	struct nk_nqe snd = { .op = NK_OP_SEND, .vm_id = VM, .sock_id = 11, .data_ptr = GRANULE,
			      .size = sizeof(msg), .tag = next_tag++ };
	memcpy(vm_data + GRANULE, msg, sizeof(msg));
	push(&receive, &snd);
	ev = pop(&sendr); /* SHM-5: the copy is announced before the SEND is answered */
	CHECK(ev.op == NK_OP_EV_DATA && ev.sock_id == 12 && ev.size == sizeof(msg));
	CHECK(ev.data_ptr >= half && memcmp(vm_data + ev.data_ptr, msg, sizeof(msg)) == 0);
	r = pop(&sendr);
	CHECK(r.op == (NK_OP_SEND | NK_REPLY_BIT) && (int64_t)r.op_data == (int64_t)sizeof(msg));
	br = (struct nk_nqe){ .op = NK_OP_BUF_RETURN, .vm_id = VM, .data_ptr = ev.data_ptr,
			      .size = ev.size, .tag = next_tag++ };
	push(&receive, &br);
	struct nk_nqe cl = { .op = NK_OP_CLOSE, .vm_id = VM, .sock_id = 12,
			     .op_data = NK_CLOSE_ABORT, .tag = next_tag++ };
	push(&completion, &cl); /* SHM-9: the peer is reset; the reply follows that event */
	ev = pop(&sendr);
	CHECK(ev.op == NK_OP_EV_ERROR && ev.sock_id == 11 && (int64_t)ev.op_data == -ECONNRESET);
	r = pop(&job);
	CHECK(r.op == (NK_OP_CLOSE | NK_REPLY_BIT) && r.op_data == 0);
	CHECK(call(NK_OP_SEND, 11, 0, "x", 1, 0) == -EPIPE);
	/* one connection accepted, one waiting in the accept queue: TENANT_UNMAP ends them */
	CHECK(call(NK_OP_SOCKET, 13, AF_INET | SOCK_STREAM << 16, NULL, 0, 0) == 0);
	CHECK(call(NK_OP_CONNECT, 13, 0, &here, sizeof(here), 0) == 0);
	CHECK(pop(&sendr).op == NK_OP_EV_ACCEPTABLE);
	CHECK(call(NK_OP_SOCKET, 14, AF_INET | SOCK_STREAM << 16, NULL, 0, 0) == 0);
	CHECK(call(NK_OP_CONNECT, 14, 0, &here, sizeof(here), 0) == 0);
	CHECK(pop(&sendr).op == NK_OP_EV_ACCEPTABLE);
	CHECK(call(NK_OP_ACCEPT, 10, 15, NULL, 0, 0) == 0);
	struct nk_nsm_tenant_counters tc;
	CHECK(nk_nsm_get_tenant_counters(n, VM, &tc) == 0); /* SHM-7 */
	CHECK(tc.paired == 5 && tc.paired_now == 4 && tc.shm_bytes_out == sizeof(msg) &&
	      tc.shm_bytes_in == sizeof(msg) && tc.stack_bytes_out == sizeof(msg));

	/* NSM-8: CLOSE, then the ID is EBADF; NSM-12: TENANT_UNMAP closes the rest */
	CHECK(call(NK_OP_CLOSE, 5, 0, NULL, 0, 0) == 0);
	CHECK(call(NK_OP_GETSOCKNAME, 5, 0, NULL, 0, 28) == -EBADF);
	CHECK((int64_t)control(NK_OP_TENANT_UNMAP, VM, 0, 0).op_data == 0);
	CHECK(call(NK_OP_GETSOCKNAME, 1, 0, NULL, 0, 28) == -EFAULT);

	struct nk_nsm_counters c;
	nk_nsm_get_counters(n, &c);
	CHECK(c.sockets == 0 && c.tenants == 0 && c.malformed == 1);
	nk_nsm_stop(n);
	void *rc;
	CHECK(pthread_join(t, &rc) == 0 && (intptr_t)rc == NK_NSM_STOPPED);
	nk_nsm_free(n);
	close(peer);
	close(lst);
	munmap(vm_base, nk_geo_total_size(&vm_geo));
	munmap(nsm_base, nsm_len);
	unlink(path);
	rmdir(dir);
	printf("test_nsm: ok\n");
	return 0;
}

/* ---------------------------------------------------------------------------------------
 * `test_nsm --bench SECONDS`: the NSM alone, this program in the CoreEngine's place
 * (polling its rings in C), Linux sockets as the peers: 8 KB bulk SENDs, and 64 B
 * request/response (SEND, EV_DATA, BUF_RETURN), each next to the same traffic on plain
 * Linux sockets. Not a test: numbers for the report.
 */
static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *sink(void *arg)
{
	int fd = (int)(intptr_t)arg;
	static char buf[1 << 16];
	while (recv(fd, buf, sizeof(buf), 0) > 0)
		;
	close(fd);
	return NULL;
}

static void *echo64(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[64];
	for (;;) {
		size_t have = 0;
		while (have < sizeof(buf)) {
			ssize_t k = recv(fd, buf + have, sizeof(buf) - have, 0);
			if (k <= 0) {
				close(fd);
				return NULL;
			}
			have += (size_t)k;
		}
		if (send(fd, buf, sizeof(buf), MSG_NOSIGNAL) != (ssize_t)sizeof(buf))
			break;
	}
	close(fd);
	return NULL;
}

static int listener(struct sockaddr_in *a)
{
	int lst = socket(AF_INET, SOCK_STREAM, 0);
	socklen_t l = sizeof(*a);
	*a = loop4(0);
	CHECK(bind(lst, (struct sockaddr *)a, sizeof(*a)) == 0 && listen(lst, 4) == 0);
	CHECK(getsockname(lst, (struct sockaddr *)a, &l) == 0);
	return lst;
}

static int try_pop(struct nk_ring *r, struct nk_nqe *out)
{
	return nk_ring_pop(r, out, 1) == 1;
}

static double bench_bulk_nsm(double seconds)
{
	struct sockaddr_in a;
	int lst = listener(&a);
	int one = 1;
	CHECK(call(NK_OP_SOCKET, 20, AF_INET | SOCK_STREAM << 16, NULL, 0, 0) == 0);
	CHECK(call(NK_OP_CONNECT, 20, 0, &a, sizeof(a), 0) == 0);
	(void)one;
	pthread_t t;
	CHECK(pthread_create(&t, NULL, sink, (void *)(intptr_t)accept(lst, NULL, NULL)) == 0);
	const uint32_t msg = 8192, inflight = 32; /* 32 x 8 KB of the send half */
	uint64_t bytes = 0;
	uint32_t posted = 0;
	double end = now_s() + seconds, start = now_s();
	for (uint32_t i = 0; i < inflight; i++) {
		struct nk_nqe q = { .op = NK_OP_SEND, .vm_id = VM, .sock_id = 20,
				    .data_ptr = (uint64_t)i * msg, .size = msg, .tag = (uint16_t)i };
		push(&receive, &q);
		posted++;
	}
	while (posted) {
		struct nk_nqe r;
		if (!try_pop(&sendr, &r)) {
			sched_yield();
			continue;
		}
		CHECK(r.op == (NK_OP_SEND | NK_REPLY_BIT) && (int64_t)r.op_data == msg);
		bytes += msg;
		posted--;
		if (now_s() < end) {
			struct nk_nqe q = { .op = NK_OP_SEND, .vm_id = VM, .sock_id = 20,
					    .data_ptr = r.data_ptr, .size = msg, .tag = r.tag };
			push(&receive, &q);
			posted++;
		}
	}
	double rate = (double)bytes / (now_s() - start);
	CHECK(call(NK_OP_CLOSE, 20, 0, NULL, 0, 0) == 0);
	pthread_join(t, NULL);
	close(lst);
	return rate;
}

static double bench_bulk_direct(double seconds)
{
	struct sockaddr_in a;
	int lst = listener(&a);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	CHECK(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
	pthread_t t;
	CHECK(pthread_create(&t, NULL, sink, (void *)(intptr_t)accept(lst, NULL, NULL)) == 0);
	static char buf[8192];
	uint64_t bytes = 0;
	double start = now_s(), end = start + seconds;
	while (now_s() < end) {
		CHECK(send(fd, buf, sizeof(buf), 0) == (ssize_t)sizeof(buf));
		bytes += sizeof(buf);
	}
	double rate = (double)bytes / (now_s() - start);
	close(fd);
	pthread_join(t, NULL);
	close(lst);
	return rate;
}

static double bench_rr_nsm(double seconds)
{
	struct sockaddr_in a;
	int lst = listener(&a);
	CHECK(call(NK_OP_SOCKET, 21, AF_INET | SOCK_STREAM << 16, NULL, 0, 0) == 0);
	int on = 1;
	CHECK(call(NK_OP_SETSOCKOPT, 21, IPPROTO_TCP | (uint64_t)TCP_NODELAY << 32, &on, 4, 0) == 0);
	CHECK(call(NK_OP_CONNECT, 21, 0, &a, sizeof(a), 0) == 0);
	pthread_t t;
	int peer = accept(lst, NULL, NULL);
	setsockopt(peer, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
	CHECK(pthread_create(&t, NULL, echo64, (void *)(intptr_t)peer) == 0);
	uint64_t trips = 0;
	double start = now_s(), end = start + seconds;
	memset(vm_data, 'x', 64);
	while (now_s() < end) {
		struct nk_nqe q = { .op = NK_OP_SEND, .vm_id = VM, .sock_id = 21, .data_ptr = 0,
				    .size = 64, .tag = (uint16_t)trips };
		push(&receive, &q);
		uint32_t got = 0;
		bool replied = false;
		while (got < 64 || !replied) {
			struct nk_nqe r;
			if (!try_pop(&sendr, &r)) {
				sched_yield();
				continue;
			}
			if (r.op == (NK_OP_SEND | NK_REPLY_BIT)) {
				replied = true;
				continue;
			}
			CHECK(r.op == NK_OP_EV_DATA);
			got += r.size;
			struct nk_nqe br = { .op = NK_OP_BUF_RETURN, .vm_id = VM,
					     .data_ptr = r.data_ptr, .size = r.size };
			push(&receive, &br);
		}
		trips++;
	}
	double rate = (double)trips / (now_s() - start);
	CHECK(call(NK_OP_CLOSE, 21, 0, NULL, 0, 0) == 0);
	pthread_join(t, NULL);
	close(lst);
	return rate;
}

static double bench_rr_direct(double seconds)
{
	struct sockaddr_in a;
	int lst = listener(&a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), on = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
	CHECK(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
	int peer = accept(lst, NULL, NULL);
	setsockopt(peer, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
	pthread_t t;
	CHECK(pthread_create(&t, NULL, echo64, (void *)(intptr_t)peer) == 0);
	char buf[64] = { 0 };
	uint64_t trips = 0;
	double start = now_s(), end = start + seconds;
	while (now_s() < end) {
		CHECK(send(fd, buf, sizeof(buf), 0) == 64);
		size_t have = 0;
		while (have < 64) {
			ssize_t k = recv(fd, buf + have, 64 - have, 0);
			CHECK(k > 0);
			have += (size_t)k;
		}
		trips++;
	}
	double rate = (double)trips / (now_s() - start);
	close(fd);
	pthread_join(t, NULL);
	close(lst);
	return rate;
}

static int run_bench(double seconds)
{
	vm_geo = (struct nk_geometry){ 1, 256, 8u << 20, 4u << 20, GRANULE, NK_KIND_TENANT };
	nsm_geo = (struct nk_geometry){ 1, 256, 2 * GRANULE, GRANULE, GRANULE, NK_KIND_NSM };
	char dir[] = "/tmp/nk-bench-nsm-XXXXXX";
	char path[256];
	uint64_t nsm_len = make_devices(dir, path, sizeof(path));
	struct nk_nsm *n = nk_nsm_new(nsm_base, nsm_len, dir, -1, -1);
	CHECK(n);
	CHECK(nk_nsm_set_placement(n, 7) == -EINVAL);
	CHECK(nk_nsm_set_placement(n, NK_PLACE_AUTO) == 0); /* pairing on (spec/shm.md) */
	pthread_t t;
	CHECK(pthread_create(&t, NULL, runner, n) == 0);
	CHECK((int64_t)control(NK_OP_TENANT_MAP, VM, vm_geo.send_size,
			       (uint32_t)(vm_geo.data_size - vm_geo.send_size)).op_data == 0);
	double bn = bench_bulk_nsm(seconds), bd = bench_bulk_direct(seconds);
	double rn = bench_rr_nsm(seconds), rd = bench_rr_direct(seconds);
	printf("bulk 8 KB   NSM alone %9.1f MB/s   direct %9.1f MB/s   ratio %.3f\n", bn / 1e6,
	       bd / 1e6, bn / bd);
	printf("rr 64 B     NSM alone %9.0f /s     direct %9.0f /s     ratio %.3f\n", rn, rd,
	       rn / rd);
	nk_nsm_stop(n);
	pthread_join(t, NULL);
	nk_nsm_free(n);
	munmap(vm_base, nk_geo_total_size(&vm_geo));
	munmap(nsm_base, nsm_len);
	unlink(path);
	rmdir(dir);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "--bench") == 0)
		return run_bench(atof(argv[2]));
	return run_tests();
}
