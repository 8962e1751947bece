/* The switching core without Python: one tenant, one NSM, a socket's life (CE-7..CE-19).
 *
 * The byte-for-byte comparison with the reference is tests/test_fastpath_engine.py; this
 * test checks the C API itself under ASan + UBSan: outputs, clone independence, SEC-8.
 */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "nk/engine.h"

static struct nk_engine *e;
static const struct nk_out *outs;
static uint32_t nouts;

static int feed(uint8_t kind, uint8_t id, uint8_t qset, uint8_t ring, struct nk_nqe n)
{
	int r = nk_engine_switch(e, kind, id, qset, ring, &n);
	outs = nk_engine_outputs(e, &nouts);
	assert(r < 0 || (uint32_t)r == nouts);
	return r;
}

static struct nk_nqe reply(struct nk_nqe req, int64_t result)
{
	req.op |= NK_REPLY_BIT;
	req.op_data = (uint64_t)result;
	return req;
}

#define CHECK(c)                                                                       \
	do {                                                                           \
		if (!(c)) {                                                            \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); \
			return 1;                                                      \
		}                                                                      \
	} while (0)

int main(void)
{
	struct nk_engine_config cfg = {.slices = 1};
	e = nk_engine_new(&cfg);
	struct nk_geometry tg = {2, 8, 64 << 10, 32 << 10, 4096, NK_KIND_TENANT};
	struct nk_geometry ng = {1, 8, 8 << 10, 4 << 10, 4096, NK_KIND_NSM};
	CHECK(nk_engine_attach(e, &tg, -1) == 1);
	CHECK(nk_engine_attach(e, &tg, 1) == -EEXIST);
	CHECK(nk_engine_attach(e, &tg, 255) == -EINVAL);
	CHECK(nk_engine_attach(e, &ng, -1) == 1);

	/* CE-16: SOCKET -> TENANT_MAP first, the SOCKET held until it is answered */
	struct nk_nqe sock = {.op = NK_OP_SOCKET, .vm_id = 77, .sock_id = 5, .op_data = 2 | 1 << 16,
			      .tag = 9};
	CHECK(feed(NK_KIND_TENANT, 1, 1, NK_RING_JOB, sock) == 1);
	CHECK(outs[0].kind == NK_KIND_NSM && outs[0].nqe.op == NK_OP_TENANT_MAP);
	CHECK(outs[0].nqe.vm_id == 1 && outs[0].nqe.data_ptr == 32 << 10);
	struct nk_nqe map = outs[0].nqe;
	CHECK(nk_engine_in_flight(e) == 1);
	CHECK(feed(NK_KIND_NSM, 1, 0, NK_RING_JOB, reply(map, 0)) == 1);
	struct nk_out fwd = outs[0];
	CHECK(fwd.nqe.op == NK_OP_SOCKET && fwd.nqe.vm_id == 1 && fwd.nqe.sock_id == 1);
	CHECK(fwd.ring == NK_RING_COMPLETION && fwd.qset == 0);

	/* value semantics: a clone does not see what happens next */
	struct nk_engine *before = nk_engine_clone(e);
	CHECK(feed(NK_KIND_NSM, 1, 0, NK_RING_JOB, reply(fwd.nqe, 0)) == 1);
	CHECK(outs[0].kind == NK_KIND_TENANT && outs[0].qset == 1 && outs[0].nqe.sock_id == 5);
	CHECK(outs[0].nqe.op == (NK_OP_SOCKET | NK_REPLY_BIT) && outs[0].nqe.tag == 9);
	CHECK(nk_engine_open_sockets(e, NK_KIND_TENANT, 1) == 1);
	CHECK(nk_engine_open_sockets(before, NK_KIND_TENANT, 1) == 0);
	nk_engine_free(before);

	/* SEND: stamped, translated, lent (BUF-3); the same buffer again is EINVAL */
	struct nk_nqe send = {.op = NK_OP_SEND, .vm_id = 200, .sock_id = 5, .data_ptr = 4096,
			      .size = 100, .tag = 1};
	CHECK(feed(NK_KIND_TENANT, 1, 1, NK_RING_SEND, send) == 1);
	struct nk_out sent = outs[0];
	CHECK(sent.nqe.vm_id == 1 && sent.nqe.sock_id == 1 && sent.ring == NK_RING_RECEIVE);
	struct nk_counters before_c, after_c;
	nk_engine_counters(e, NK_KIND_TENANT, 1, &before_c);
	send.tag = 2;
	send.data_ptr = 4100;
	CHECK(feed(NK_KIND_TENANT, 1, 1, NK_RING_SEND, send) == 1);
	CHECK(outs[0].nqe.op == (NK_OP_SEND | NK_REPLY_BIT) && (int64_t)outs[0].nqe.op_data == -EINVAL);
	nk_engine_counters(e, NK_KIND_TENANT, 1, &after_c);
	CHECK(after_c.rejected == before_c.rejected + 1 && nk_engine_in_flight(e) == 1);
	/* SEC-3: outside the send half is EFAULT, before anything else */
	send.data_ptr = UINT64_MAX;
	CHECK(feed(NK_KIND_TENANT, 1, 1, NK_RING_SEND, send) == 1);
	CHECK((int64_t)outs[0].nqe.op_data == -EFAULT);
	CHECK(feed(NK_KIND_NSM, 1, 0, NK_RING_JOB, reply(sent.nqe, 100)) == 1);
	CHECK(outs[0].nqe.data_ptr == 4096 && outs[0].nqe.vm_id == 1 && outs[0].nqe.op_data == 100);

	/* EV_DATA into the NSM's slice, then BUF_RETURN back to it (CE-12, CE-14) */
	struct nk_nqe ev = {.op = NK_OP_EV_DATA, .sock_id = 1, .data_ptr = 32 << 10, .size = 40};
	CHECK(feed(NK_KIND_NSM, 1, 0, NK_RING_SEND, ev) == 1);
	CHECK(outs[0].kind == NK_KIND_TENANT && outs[0].ring == NK_RING_RECEIVE);
	CHECK(outs[0].nqe.sock_id == 5 && outs[0].nqe.qset == 1 && outs[0].nqe.vm_id == 1);
	CHECK(feed(NK_KIND_NSM, 1, 0, NK_RING_SEND, ev) == 0); /* overlaps a held buffer: dropped */
	struct nk_nqe ret = {.op = NK_OP_BUF_RETURN, .data_ptr = 32 << 10, .size = 40};
	CHECK(feed(NK_KIND_TENANT, 1, 0, NK_RING_SEND, ret) == 1);
	CHECK(outs[0].kind == NK_KIND_NSM && outs[0].nqe.op == NK_OP_BUF_RETURN);
	CHECK(feed(NK_KIND_TENANT, 1, 0, NK_RING_SEND, ret) == 1); /* not held any more */
	CHECK((int64_t)outs[0].nqe.op_data == -EINVAL);

	/* caller bugs */
	CHECK(feed(NK_KIND_TENANT, 1, 0, NK_RING_COMPLETION, ret) == -EINVAL);
	CHECK(feed(NK_KIND_TENANT, 1, 2, NK_RING_JOB, ret) == -EINVAL);
	CHECK(feed(NK_KIND_TENANT, 9, 0, NK_RING_JOB, ret) == 0); /* CE-24 */

	/* CE-19: the NSM leaves: the open socket gets EV_ERROR ECONNRESET */
	CHECK(nk_engine_detach(e, NK_KIND_NSM, 1) == 1);
	outs = nk_engine_outputs(e, &nouts);
	CHECK(outs[0].nqe.op == NK_OP_EV_ERROR && (int64_t)outs[0].nqe.op_data == -ECONNRESET);
	CHECK(nk_engine_sockets(e) == 0 && nk_engine_in_flight(e) == 0);
	nk_engine_free(e);
	printf("test_engine: ok\n");
	return 0;
}
