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

int main(void)
{
	char dir[] = "/tmp/nk-test-nsm-XXXXXX";
	CHECK(mkdtemp(dir));
	uint64_t nsm_len = nk_geo_total_size(&nsm_geo);
	nsm_base = mmap(NULL, nsm_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(nsm_base != MAP_FAILED);
	init_header(nsm_base, &nsm_geo);
	char path[256];
	snprintf(path, sizeof(path), "%s/vm-%d.nk", dir, VM);
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
	CHECK(fd >= 0 && ftruncate(fd, (off_t)nk_geo_total_size(&vm_geo)) == 0);
	vm_base = mmap(NULL, nk_geo_total_size(&vm_geo), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(vm_base != MAP_FAILED);
	close(fd);
	init_header(vm_base, &vm_geo);
	vm_data = vm_base + nk_geo_data_offset(&vm_geo);
	nk_ring_init(&job, nsm_base + nk_geo_ring_offset(&nsm_geo, 0, NK_RING_JOB), 64);
	nk_ring_init(&completion, nsm_base + nk_geo_ring_offset(&nsm_geo, 0, NK_RING_COMPLETION), 64);
	nk_ring_init(&sendr, nsm_base + nk_geo_ring_offset(&nsm_geo, 0, NK_RING_SEND), 64);
	nk_ring_init(&receive, nsm_base + nk_geo_ring_offset(&nsm_geo, 0, NK_RING_RECEIVE), 64);

	CHECK(nk_nsm_new(vm_base, nk_geo_total_size(&vm_geo), dir, -1, -1) == NULL); /* not an NSM */
	struct nk_nsm *n = nk_nsm_new(nsm_base, nsm_len, dir, -1, -1);
	CHECK(n);
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
