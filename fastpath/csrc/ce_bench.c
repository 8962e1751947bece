/* A benchmark harness for the switching loop (bench/coreengine.py): one thread
 * plays a tenant and an NSM on their rings around nk_ce_poll, so what is timed
 * is the CoreEngine's work and nothing waits on another process.
 *
 * The tenant keeps `window` SENDs in flight on one socket (each its own tag and
 * buffer, BUF-3, NQE-9); the NSM answers each SEND it reads with its size. Every
 * round trip is two NQEs switched: the SEND to the NSM, the reply to the tenant.
 */
#include "nk/ce.h"

#include <errno.h>
#include <string.h>
#include <time.h>

static int64_t bench_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int ring_at(struct nk_ring *r, void *base, const struct nk_geometry *g, uint32_t ring)
{
	return nk_ring_init(r, (char *)base + nk_geo_ring_offset(g, 0, ring), g->ring_entries);
}

int64_t nk_ce_bench_sends(struct nk_ce *ce, struct nk_ce_bench *b)
{
	struct nk_ring t_send, t_comp, n_recv, n_send;
	struct nk_nqe buf[NK_CE_BATCH];
	if (!b->window || ring_at(&t_send, b->tenant_base, &b->tenant_geo, NK_RING_SEND) ||
	    ring_at(&t_comp, b->tenant_base, &b->tenant_geo, NK_RING_COMPLETION) ||
	    ring_at(&n_recv, b->nsm_base, &b->nsm_geo, NK_RING_RECEIVE) ||
	    ring_at(&n_send, b->nsm_base, &b->nsm_geo, NK_RING_SEND))
		return -EINVAL;
	uint64_t sent = 0, answered = 0;
	int64_t polling = 0, start = bench_now();
	while (answered < b->sends) {
		/* the tenant: refill its window */
		uint32_t room = (uint32_t)(b->window - (sent - answered));
		if (room > NK_CE_BATCH)
			room = NK_CE_BATCH;
		if (sent + room > b->sends)
			room = (uint32_t)(b->sends - sent);
		for (uint32_t i = 0; i < room; i++) {
			uint64_t k = sent + i;
			memset(&buf[i], 0, sizeof(buf[i]));
			buf[i].op = NK_OP_SEND;
			buf[i].sock_id = b->sock_id;
			buf[i].tag = (uint16_t)(k % b->window);
			buf[i].data_ptr = (k % b->window) * b->tenant_geo.buf_size;
			buf[i].size = 64;
		}
		int64_t n = room ? nk_ring_push(&t_send, buf, room) : 0;
		if (n < 0)
			return n;
		sent += (uint64_t)n;
		int64_t t0 = bench_now();
		nk_ce_poll(ce);
		polling += bench_now() - t0;
		/* the NSM: answer every SEND with its size */
		n = nk_ring_pop(&n_recv, buf, NK_CE_BATCH);
		if (n < 0)
			return n;
		for (int64_t i = 0; i < n; i++) {
			buf[i].op |= NK_REPLY_BIT;
			buf[i].op_data = buf[i].size;
			buf[i].data_ptr = 0;
			buf[i].size = 0;
		}
		if (n && nk_ring_push(&n_send, buf, (uint32_t)n) != n)
			return -EOVERFLOW;
		t0 = bench_now();
		nk_ce_poll(ce);
		polling += bench_now() - t0;
		/* the tenant: take the replies */
		n = nk_ring_pop(&t_comp, buf, NK_CE_BATCH);
		if (n < 0)
			return n;
		for (int64_t i = 0; i < n; i++)
			if ((buf[i].op & ~NK_REPLY_BIT) != NK_OP_SEND || (int64_t)buf[i].op_data != 64)
				return -EPROTO;
		answered += (uint64_t)n;
	}
	b->elapsed_ns = bench_now() - start;
	b->polling_ns = polling;
	return (int64_t)(2 * answered);
}
