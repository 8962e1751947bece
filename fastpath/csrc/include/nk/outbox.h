/* An outbox: NQEs a device side produced, waiting for room on their ring (DEV-8).
 *
 * A producer never blocks on a full ring (RING-4 gives no wake-up for free room), so
 * what does not fit waits here, in order, and goes out at the next flush. Used by every
 * C device side that produces on JOB and SEND: the C tenant (tenant.c) and nk-agent.
 */
#ifndef NK_OUTBOX_H
#define NK_OUTBOX_H

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

#include "nk/bell.h"
#include "nk/nqe.h"
#include "nk/ring.h"

struct nk_outbox {
	struct nk_ring ring;
	struct nk_nqe *q; /* NQEs waiting for room, FIFO */
	uint32_t head, len, cap;
	bool polled; /* VM-2: the consumer is in another kernel: bump the bell, no FUTEX_WAKE */
};

/* Queue one NQE behind those waiting: 0, or -ENOMEM. */
static inline int nk_outbox_add(struct nk_outbox *b, const struct nk_nqe *n)
{
	if (b->len == b->cap) {
		uint32_t cap = b->cap ? b->cap * 2 : 64;
		struct nk_nqe *q = malloc(cap * sizeof(*q));
		if (!q)
			return -ENOMEM;
		for (uint32_t i = 0; i < b->len; i++)
			q[i] = b->q[(b->head + i) % b->cap];
		free(b->q);
		b->q = q;
		b->head = 0;
		b->cap = cap;
	}
	b->q[(b->head + b->len) % b->cap] = *n;
	b->len++;
	return 0;
}

/* Publish what waits, in order, as far as the ring has room; ring `bell` (the ENGINE
 * bell) if the consumer sleeps (RING-6) and count it in *bells. Never blocks.
 * Returns the NQEs published (>= 0), or -EBADMSG for a broken ring (RING-10). */
static inline int64_t nk_outbox_flush(struct nk_outbox *b, uint32_t *bell, uint64_t *bells)
{
	int64_t pushed = 0;
	while (b->len) {
		uint32_t run = b->cap - b->head; /* contiguous part of the FIFO */
		if (run > b->len)
			run = b->len;
		int64_t n = nk_ring_push(&b->ring, &b->q[b->head], run);
		if (n < 0)
			return n;
		if (n == 0)
			break;
		pushed += n;
		b->head = (b->head + (uint32_t)n) % b->cap;
		b->len -= (uint32_t)n;
	}
	/* consumer_sleeping's seq_cst fence orders our tail store before its flags load */
	if (pushed && nk_ring_consumer_sleeping(&b->ring)) {
		if (b->polled)
			nk_bell_bump(bell);
		else
			nk_bell_ring(bell);
		(*bells)++;
	}
	return pushed;
}

static inline void nk_outbox_free(struct nk_outbox *b)
{
	free(b->q);
	b->q = NULL;
	b->head = b->len = b->cap = 0;
}

#endif
