/* A tenant side's view of one queue set of its device: the four rings, the two bells
 * and the data area (spec/device.md DEV-2, DEV-8, DEV-9). The C tenant (tenant.c) and
 * nk-agent both speak NQEs through one; this is where a READY tenant device is checked
 * and its queue set laid out, once.
 */
#ifndef NK_TQUEUE_H
#define NK_TQUEUE_H

#include <errno.h>
#include <stdint.h>

#include "nk/device.h"
#include "nk/outbox.h"
#include "nk/ring.h"

struct nk_tqueue {
	char *base, *data;
	uint64_t len;
	struct nk_geometry geo;
	struct nk_ring completion, receive; /* consumed */
	struct nk_outbox job, send;         /* produced, through their outboxes */
	uint32_t *device_bell, *engine_bell;
};

/* Check that [base, base+len) is a READY tenant device (DEV-2, DEV-12..14, SEC-1) and
 * lay out queue set `qset`: 0, or -EINVAL/-EPROTO/-EBADMSG. The mapping stays the
 * caller's; the outboxes start empty (nk_outbox_free them). */
static inline int nk_tqueue_open(struct nk_tqueue *q, void *base, uint64_t len, unsigned qset)
{
	struct nk_geometry g;
	int rc = nk_dev_read_header(base, len, &g);
	if (rc < 0)
		return rc;
	const struct nk_dev_header *h = base;
	if (g.kind != NK_KIND_TENANT || h->state != NK_STATE_READY)
		return -EPROTO;
	char *b = base;
	*q = (struct nk_tqueue){ .base = b, .len = len, .geo = g,
				 .data = b + nk_geo_data_offset(&g) };
	nk_ring_init(&q->job.ring, b + nk_geo_ring_offset(&g, qset, NK_RING_JOB), g.ring_entries);
	nk_ring_init(&q->send.ring, b + nk_geo_ring_offset(&g, qset, NK_RING_SEND),
		     g.ring_entries);
	nk_ring_init(&q->completion, b + nk_geo_ring_offset(&g, qset, NK_RING_COMPLETION),
		     g.ring_entries);
	nk_ring_init(&q->receive, b + nk_geo_ring_offset(&g, qset, NK_RING_RECEIVE),
		     g.ring_entries);
	q->device_bell = (uint32_t *)(b + nk_geo_bell_offset(&g, qset, NK_BELL_DEVICE));
	q->engine_bell = (uint32_t *)(b + nk_geo_bell_offset(&g, qset, NK_BELL_ENGINE));
	return 0;
}

#endif
