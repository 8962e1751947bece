/* The running CoreEngine's switching loop (include/nk/ce.h).
 *
 * Who owns what (spec/device.md RING-2): on a to-engine ring (JOB, SEND) we are
 * the consumer and own head and flags; on an engine-to-device ring
 * (COMPLETION, RECEIVE) we are the producer and own tail. The ring.h
 * operations carry the index barriers; this file adds the ordering of the
 * bells and of the control word, commented where it happens.
 */
#define _GNU_SOURCE
#include "nk/ce.h"

#include <errno.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nk/bell.h"

#define NO_SOURCE (-1)
#define IN_RINGS 2  /* JOB, SEND */
#define OUT_RINGS 2 /* COMPLETION, RECEIVE */

/* Outputs waiting for room in one destination ring, oldest first (RING-4).
 * Each remembers the source ring whose reading it holds up, or NO_SOURCE. */
struct backlog {
	struct nk_nqe *nqes; /* cap slots (a power of two), FIFO from head */
	int32_t *srcs;
	uint32_t cap, head, len;
	int32_t listed; /* index in ce->pending, or -1 */
	struct nk_ring *ring;
	uint32_t *bell;      /* the device bell of the ring's queue set */
	struct device *dev;  /* the destination */
	uint8_t to_tenant;
};

struct qset {
	struct nk_ring in[IN_RINGS];
	uint32_t held[IN_RINGS]; /* outputs of this source still in a backlog */
	struct nk_ring out[OUT_RINGS];
	struct backlog backlog[OUT_RINGS];
	uint32_t *engine_bell; /* we sleep on it */
	uint32_t *device_bell; /* we ring it */
};

struct device {
	uint8_t kind, ident, broken;
	uint8_t polled; /* VM-2: its bells wake nobody; our flag, never the header's (VM-5) */
	int32_t slot; /* index in ce->slots: part of a source ID */
	uint32_t n_qsets;
	void *base;
	struct qset *qs;
};

struct nk_ce {
	struct nk_engine *engine;
	unsigned spin; /* empty passes before the loop sleeps (NK_CE_SPIN, env NK_CE_SPIN) */
	struct device *slots[NK_CE_MAX_DEVICES]; /* stable: source IDs name a slot */
	struct device *by_id[3][256];
	struct device *order[NK_CE_MAX_DEVICES]; /* polling order: attach order */
	uint32_t n_devices;
	struct backlog **pending; /* non-empty backlogs */
	uint32_t n_pending, pending_cap;
	uint64_t pending_nqes;
	uint32_t blocked;       /* sources with held > 0 */
	uint32_t n_broken;
	uint32_t n_polled;      /* devices with polled set: every sleep is bounded (VM-2) */
	int64_t poll_ns;        /* the next bounded sleep: NK_POLL_MIN_NS after work, doubling */
	_Atomic uint32_t ctl;   /* the control word: nk_ce_interrupt bumps it */
	uint32_t ctl_seen;
	struct nk_ce_stats stats;
	struct nk_nqe batch[NK_CE_BATCH];
};

/* -- source IDs: (slot, qset, input ring) in one int32 ------------------------------- */

static inline int32_t source_id(const struct device *d, uint32_t q, uint32_t r)
{
	return (d->slot << 9) | (int32_t)(q << 1) | (int32_t)r;
}

static inline uint32_t *held_of(struct nk_ce *ce, int32_t src)
{
	struct device *d = ce->slots[src >> 9];
	return &d->qs[(src >> 1) & 0xFF].held[src & 1];
}

static void hold(struct nk_ce *ce, int32_t src)
{
	uint32_t *h = held_of(ce, src);
	if ((*h)++ == 0)
		ce->blocked++;
}

static void release(struct nk_ce *ce, int32_t src)
{
	if (src == NO_SOURCE)
		return;
	uint32_t *h = held_of(ce, src);
	if (*h && --(*h) == 0)
		ce->blocked--;
}

/* -- backlogs ---------------------------------------------------------------------- */

static int backlog_grow(struct backlog *b)
{
	uint32_t cap = b->cap ? b->cap * 2 : NK_CE_BATCH * 2;
	struct nk_nqe *nqes = malloc((size_t)cap * sizeof(*nqes));
	int32_t *srcs = malloc((size_t)cap * sizeof(*srcs));
	if (!nqes || !srcs) {
		free(nqes);
		free(srcs);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < b->len; i++) { /* linearize: oldest at 0 */
		uint32_t at = (b->head + i) & (b->cap - 1);
		nqes[i] = b->nqes[at];
		srcs[i] = b->srcs[at];
	}
	free(b->nqes);
	free(b->srcs);
	b->nqes = nqes;
	b->srcs = srcs;
	b->cap = cap;
	b->head = 0;
	return 0;
}

static int list_pending(struct nk_ce *ce, struct backlog *b)
{
	if (b->listed >= 0)
		return 0;
	if (ce->n_pending == ce->pending_cap) {
		uint32_t cap = ce->pending_cap ? ce->pending_cap * 2 : 16;
		struct backlog **p = realloc(ce->pending, cap * sizeof(*p));
		if (!p)
			return -ENOMEM;
		ce->pending = p;
		ce->pending_cap = cap;
	}
	b->listed = (int32_t)ce->n_pending;
	ce->pending[ce->n_pending++] = b;
	return 0;
}

static void unlist_pending(struct nk_ce *ce, struct backlog *b)
{
	if (b->listed < 0)
		return;
	struct backlog *last = ce->pending[--ce->n_pending];
	ce->pending[b->listed] = last;
	last->listed = b->listed;
	b->listed = -1;
}

/* Queue one output behind what already waits for its ring (RING-4). An NSM's
 * output for a tenant holds nothing up while the tenant's backlog is short:
 * the NSM's ring carries every other tenant's NQEs too (TENANT_BACKLOG). */
static void enqueue(struct nk_ce *ce, struct backlog *b, const struct nk_nqe *n, int32_t src,
		    uint8_t src_kind)
{
	if (b->len == b->cap && backlog_grow(b) < 0)
		return; /* out of memory: the NQE is lost, as the reference's MemoryError would */
#ifndef NK_BROKEN_CE_HOLD_ALL /* tests/test_fastpath_coreengine.py builds it broken once */
	if (src != NO_SOURCE && src_kind == NK_KIND_NSM && b->to_tenant &&
	    b->len < NK_CE_TENANT_BACKLOG)
		src = NO_SOURCE;
#else
	(void)src_kind;
#endif
	uint32_t at = (b->head + b->len) & (b->cap - 1);
	b->nqes[at] = *n;
	b->srcs[at] = src;
	b->len++;
	ce->pending_nqes++;
	if (src != NO_SOURCE)
		hold(ce, src);
	if (list_pending(ce, b) < 0) { /* cannot track it: take it back */
		b->len--;
		ce->pending_nqes--;
		release(ce, src);
	}
}

static void mark_broken(struct nk_ce *ce, struct device *d)
{
	if (!d->broken) {
		d->broken = 1;
		ce->n_broken++;
	}
}

/* Push a backlog into its ring, oldest first, in at most two runs (the FIFO
 * may wrap). Rings the device's bell when its consumer sleeps (RING-6). */
static int64_t backlog_flush(struct nk_ce *ce, struct backlog *b)
{
	int64_t sent = 0;
	if (b->dev->broken)
		return 0;
	while (b->len) {
		uint32_t run = b->cap - b->head;
		if (run > b->len)
			run = b->len;
		/* nk_ring_push: acquire of the consumer's head, release of our tail (RING-5) */
		int64_t n = nk_ring_push(b->ring, &b->nqes[b->head], run);
		if (n < 0) { /* the device moved its head impossibly (RING-10) */
			mark_broken(ce, b->dev);
			break;
		}
		for (int64_t i = 0; i < n; i++)
			release(ce, b->srcs[(b->head + (uint32_t)i) & (b->cap - 1)]);
		b->head = (b->head + (uint32_t)n) & (b->cap - 1);
		b->len -= (uint32_t)n;
		sent += n;
		if ((uint32_t)n < run)
			break; /* full */
	}
	if (sent) {
		ce->pending_nqes -= (uint64_t)sent;
		ce->stats.delivered += (uint64_t)sent;
		/* nk_ring_consumer_sleeping: seq_cst fence between our tail store and
		 * the flags load, paired with the consumer's in prepare_sleep (RING-6) */
		if (nk_ring_consumer_sleeping(b->ring)) {
			if (b->dev->polled)
				nk_bell_bump(b->bell); /* VM-2: its sleeper is in another kernel */
			else
				nk_bell_ring(b->bell);
			ce->stats.bells++;
		}
	}
	if (!b->len) {
		b->head = 0;
		unlist_pending(ce, b);
	}
	return sent;
}

static int64_t flush(struct nk_ce *ce)
{
	int64_t sent = 0;
	/* backwards: a backlog that empties swaps the last one into its place */
	for (uint32_t i = ce->n_pending; i-- > 0;)
		if (i < ce->n_pending)
			sent += backlog_flush(ce, ce->pending[i]);
	return sent;
}

static void backlog_free(struct nk_ce *ce, struct backlog *b)
{
	for (uint32_t i = 0; i < b->len; i++)
		release(ce, b->srcs[(b->head + i) & (b->cap - 1)]);
	ce->pending_nqes -= b->len;
	unlist_pending(ce, b);
	free(b->nqes);
	free(b->srcs);
	memset(b, 0, sizeof(*b));
	b->listed = -1;
}

/* -- routing the engine's outputs --------------------------------------------------- */

static inline int out_index(uint8_t ring)
{
	return ring == NK_RING_COMPLETION ? 0 : ring == NK_RING_RECEIVE ? 1 : -1;
}

static void route(struct nk_ce *ce, const struct nk_out *outs, uint32_t n, int32_t src,
		  uint8_t src_kind)
{
	for (uint32_t i = 0; i < n; i++) {
		const struct nk_out *o = &outs[i];
		struct device *d = o->kind <= NK_KIND_NSM ? ce->by_id[o->kind][o->ident] : NULL;
		int r = out_index(o->ring);
		if (!d || r < 0 || o->qset >= d->n_qsets)
			continue; /* its device detached meanwhile: nobody will read it */
		enqueue(ce, &d->qs[o->qset].backlog[r], &o->nqe, src, src_kind);
	}
}

/* -- devices ------------------------------------------------------------------------ */

struct nk_ce *nk_ce_new(const struct nk_engine_config *cfg)
{
	struct nk_ce *ce = calloc(1, sizeof(*ce));
	if (ce) {
		const char *spin = getenv("NK_CE_SPIN"); /* tuning, for bench/ */
		ce->spin = spin && *spin ? (unsigned)strtoul(spin, NULL, 10) : NK_CE_SPIN;
		ce->poll_ns = NK_POLL_MIN_NS;
	}
	if (!ce)
		return NULL;
	ce->engine = nk_engine_new(cfg);
	if (!ce->engine) {
		free(ce);
		return NULL;
	}
	return ce;
}

static void device_free(struct nk_ce *ce, struct device *d)
{
	for (uint32_t q = 0; q < d->n_qsets; q++)
		for (int r = 0; r < OUT_RINGS; r++)
			backlog_free(ce, &d->qs[q].backlog[r]);
	free(d->qs);
	free(d);
}

void nk_ce_free(struct nk_ce *ce)
{
	if (!ce)
		return;
	for (uint32_t i = 0; i < ce->n_devices; i++)
		device_free(ce, ce->order[i]);
	free(ce->pending);
	nk_engine_free(ce->engine);
	free(ce);
}

struct nk_engine *nk_ce_engine(struct nk_ce *ce)
{
	return ce->engine;
}

static void map_qset(struct device *d, const struct nk_geometry *g, uint32_t q)
{
	static const uint32_t in_ids[IN_RINGS] = { NK_RING_JOB, NK_RING_SEND };
	static const uint32_t out_ids[OUT_RINGS] = { NK_RING_COMPLETION, NK_RING_RECEIVE };
	struct qset *qs = &d->qs[q];
	char *base = d->base;
	for (int r = 0; r < IN_RINGS; r++)
		nk_ring_init(&qs->in[r], base + nk_geo_ring_offset(g, q, in_ids[r]), g->ring_entries);
	for (int r = 0; r < OUT_RINGS; r++) {
		nk_ring_init(&qs->out[r], base + nk_geo_ring_offset(g, q, out_ids[r]), g->ring_entries);
		struct backlog *b = &qs->backlog[r];
		b->listed = -1;
		b->ring = &qs->out[r];
		b->dev = d;
		b->to_tenant = d->kind == NK_KIND_TENANT;
	}
	qs->engine_bell = (uint32_t *)(base + nk_geo_bell_offset(g, q, NK_BELL_ENGINE));
	qs->device_bell = (uint32_t *)(base + nk_geo_bell_offset(g, q, NK_BELL_DEVICE));
	for (int r = 0; r < OUT_RINGS; r++)
		qs->backlog[r].bell = qs->device_bell;
}

int nk_ce_add_device(struct nk_ce *ce, const struct nk_geometry *geo, int ident, void *base)
{
	if ((geo->kind != NK_KIND_TENANT && geo->kind != NK_KIND_NSM) || ident < 1 ||
	    ident > 254 || !base || geo->n_qsets < 1 || geo->n_qsets > NK_MAX_QSETS ||
	    geo->ring_entries < NK_MIN_RING_ENTRIES || geo->ring_entries > NK_MAX_RING_ENTRIES ||
	    (geo->ring_entries & (geo->ring_entries - 1)))
		return -EINVAL;
	if (ce->by_id[geo->kind][ident])
		return -EEXIST;
	int32_t slot = 0;
	while (slot < NK_CE_MAX_DEVICES && ce->slots[slot])
		slot++;
	if (slot == NK_CE_MAX_DEVICES)
		return -ENOSPC;
	struct device *d = calloc(1, sizeof(*d));
	struct qset *qs = calloc(geo->n_qsets, sizeof(*qs));
	if (!d || !qs) {
		free(d);
		free(qs);
		return -ENOMEM;
	}
	int rc = nk_engine_attach(ce->engine, geo, ident);
	if (rc < 0) {
		free(d);
		free(qs);
		return rc;
	}
	d->kind = (uint8_t)geo->kind;
	d->ident = (uint8_t)ident;
	d->slot = slot;
	d->n_qsets = geo->n_qsets;
	d->base = base;
	d->qs = qs;
	for (uint32_t q = 0; q < geo->n_qsets; q++)
		map_qset(d, geo, q);
	ce->slots[slot] = d;
	ce->by_id[d->kind][d->ident] = d;
	ce->order[ce->n_devices++] = d;
	return 0;
}

/* Outputs of other backlogs that held up one of d's rings now hold up nothing:
 * d is gone, nobody will read from its rings again. */
static void forget_sources_of(struct nk_ce *ce, struct device *d)
{
	for (uint32_t i = 0; i < ce->n_pending; i++) {
		struct backlog *b = ce->pending[i];
		for (uint32_t k = 0; k < b->len; k++) {
			int32_t *s = &b->srcs[(b->head + k) & (b->cap - 1)];
			if (*s != NO_SOURCE && (*s >> 9) == d->slot)
				*s = NO_SOURCE;
		}
	}
	for (uint32_t q = 0; q < d->n_qsets; q++)
		for (int r = 0; r < IN_RINGS; r++)
			if (d->qs[q].held[r]) {
				d->qs[q].held[r] = 0;
				ce->blocked--;
			}
}

int nk_ce_set_polled(struct nk_ce *ce, int kind, int ident, int polled)
{
	if ((kind != NK_KIND_TENANT && kind != NK_KIND_NSM) || ident < 0 || ident > 255)
		return -ENOENT;
	struct device *d = ce->by_id[kind][ident];
	if (!d)
		return -ENOENT;
	if (d->polled != (polled != 0)) {
		d->polled = polled != 0;
		if (d->polled)
			ce->n_polled++;
		else
			ce->n_polled--;
	}
	return 0;
}

int nk_ce_remove_device(struct nk_ce *ce, int kind, int ident)
{
	if ((kind != NK_KIND_TENANT && kind != NK_KIND_NSM) || ident < 0 || ident > 255)
		return -ENOENT;
	struct device *d = ce->by_id[kind][ident];
	if (!d)
		return -ENOENT;
	for (uint32_t q = 0; q < d->n_qsets; q++) /* its own outputs go nowhere now */
		for (int r = 0; r < OUT_RINGS; r++)
			backlog_free(ce, &d->qs[q].backlog[r]);
	forget_sources_of(ce, d);
	ce->by_id[kind][ident] = NULL;
	ce->slots[d->slot] = NULL;
	uint32_t i = 0;
	while (ce->order[i] != d)
		i++;
	memmove(&ce->order[i], &ce->order[i + 1], (ce->n_devices - i - 1) * sizeof(ce->order[0]));
	ce->n_devices--;
	if (d->broken)
		ce->n_broken--;
	if (d->polled)
		ce->n_polled--;
	/* CE-18, CE-19: what the engine owes the other side goes out like any output */
	int n = nk_engine_detach(ce->engine, kind, ident);
	if (n > 0) {
		uint32_t got = 0;
		const struct nk_out *outs = nk_engine_outputs(ce->engine, &got);
		route(ce, outs, got, NO_SOURCE, 0);
	}
	free(d->qs);
	free(d);
	flush(ce);
	return 0;
}

/* -- the pass ----------------------------------------------------------------------- */

static void switch_batch(struct nk_ce *ce, struct device *d, uint32_t q, uint32_t r, int64_t n)
{
	static const uint8_t ring_ids[IN_RINGS] = { NK_RING_JOB, NK_RING_SEND };
	int32_t src = source_id(d, q, r);
	for (int64_t i = 0; i < n; i++) {
		int k = nk_engine_switch(ce->engine, d->kind, d->ident, (int)q, ring_ids[r],
					 &ce->batch[i]);
		if (k <= 0)
			continue; /* CE-24 or nothing to say; an engine error costs that NQE */
		uint32_t got = 0;
		const struct nk_out *outs = nk_engine_outputs(ce->engine, &got);
		route(ce, outs, got, src, d->kind);
	}
	ce->stats.switched += (uint64_t)n;
}

int64_t nk_ce_poll(struct nk_ce *ce)
{
	int64_t moved = flush(ce);
	for (uint32_t i = 0; i < ce->n_devices; i++) {
		struct device *d = ce->order[i];
		for (uint32_t q = 0; q < d->n_qsets && !d->broken; q++) {
			struct qset *qs = &d->qs[q];
			for (uint32_t r = 0; r < IN_RINGS; r++) {
				if (qs->held[r])
					continue; /* its earlier outputs wait for room: keep order */
				/* nk_ring_pop: acquire of the producer's tail (the slots are
				 * written), release of our head (we are done with them) */
				int64_t n = nk_ring_pop(&qs->in[r], ce->batch, NK_CE_BATCH);
				if (n < 0) { /* RING-10: impossible indices */
					mark_broken(ce, d);
					break;
				}
				if (!n)
					continue;
				switch_batch(ce, d, q, r, n);
				moved += n + flush(ce);
			}
		}
	}
	return moved;
}

/* -- sleeping ----------------------------------------------------------------------- */

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void nk_ce_interrupt(struct nk_ce *ce)
{
	/* nk_bell_ring: a seq_cst RMW on the word, then FUTEX_WAKE. A run that
	 * read the old value before the RMW either sees the new one on its next
	 * check or is woken from futex_waitv, which compares the word first. */
	nk_bell_ring((uint32_t *)&ce->ctl);
}

static int interrupted(struct nk_ce *ce)
{
	/* acquire: what the interrupter wrote before ringing is visible after */
	uint32_t v = atomic_load_explicit(&ce->ctl, memory_order_acquire);
	if (v == ce->ctl_seen)
		return 0;
	ce->ctl_seen = v;
	return 1;
}

/* Sleep on every ENGINE bell and the control word unless a to-engine ring has
 * work (RING-6), at most until `deadline`. */
static void sleep_idle(struct nk_ce *ce, int64_t deadline)
{
	uint32_t *bells[NK_BELL_WAITV_MAX];
	uint32_t expect[NK_BELL_WAITV_MAX];
	unsigned n = 0;
	int64_t until = deadline;
	if (ce->n_pending && now_ns() + NK_CE_BLOCKED_SLEEP_NS < until)
		until = now_ns() + NK_CE_BLOCKED_SLEEP_NS; /* room in a ring rings no bell */
	bells[n] = (uint32_t *)&ce->ctl;
	expect[n++] = ce->ctl_seen;
	unsigned qsets = 0; /* bells to watch: a POLLED device's wake nobody (VM-2), and a
			     * guest that flips its bell word must not keep us from sleeping */
	for (uint32_t i = 0; i < ce->n_devices; i++)
		qsets += ce->order[i]->broken || ce->order[i]->polled ? 0 : ce->order[i]->n_qsets;
	int watch = qsets < NK_BELL_WAITV_MAX; /* else a short timed sleep, as the reference */
	if (!watch && now_ns() + NK_CE_BLOCKED_SLEEP_NS < until)
		until = now_ns() + NK_CE_BLOCKED_SLEEP_NS;
	if (ce->n_polled) {
		/* VM-2: a guest rings our bell word but its FUTEX_WAKE stays in its kernel:
		 * look again after poll_ns, which doubles while nothing comes */
		if (now_ns() + ce->poll_ns < until)
			until = now_ns() + ce->poll_ns;
		ce->poll_ns = ce->poll_ns * 2 > NK_POLL_MAX_NS ? NK_POLL_MAX_NS : ce->poll_ns * 2;
	}
	int idle = 1;
	for (uint32_t i = 0; i < ce->n_devices; i++) {
		struct device *d = ce->order[i];
		for (uint32_t q = 0; q < d->n_qsets && !d->broken; q++) {
			if (watch && !d->polled) {
				/* the bell's value before the rings' re-check (bell.h) */
				bells[n] = d->qs[q].engine_bell;
				expect[n++] = nk_bell_value(d->qs[q].engine_bell);
			}
			for (int r = 0; r < IN_RINGS; r++) {
				/* prepare_sleep: flag store, seq_cst fence, tail re-load (RING-6) */
				int rc = nk_ring_prepare_sleep(&d->qs[q].in[r]);
				if (rc < 0)
					mark_broken(ce, d);
				if (rc != 1)
					idle = 0;
			}
		}
	}
	/* futex_waitv compares every word first: a control ring or a device bell
	 * rung since we read `expect` ends the sleep at once */
	if (idle) {
		struct timespec ts = nk_ns_to_timespec(until);
		ce->stats.sleeps++;
		int rc = nk_bell_wait_any(bells, expect, n, &ts);
		if (rc == -ETIMEDOUT)
			ce->stats.timeouts++;
		else
			ce->stats.wakeups++;
	}
	for (uint32_t i = 0; i < ce->n_devices; i++) {
		struct device *d = ce->order[i];
		for (uint32_t q = 0; q < d->n_qsets; q++)
			for (int r = 0; r < IN_RINGS; r++)
				nk_ring_finish_sleep(&d->qs[q].in[r]); /* RING-6, RING-11 */
	}
}

int nk_ce_run(struct nk_ce *ce, int64_t timeout_ns)
{
	int64_t deadline = now_ns() + (timeout_ns < 0 ? 0 : timeout_ns);
	unsigned idle = 0;
	for (;;) {
		if (interrupted(ce))
			return NK_CE_INTERRUPT;
		if (ce->n_broken)
			return NK_CE_BROKEN;
		if (nk_ce_poll(ce)) {
			ce->stats.busy_passes++;
			idle = 0;
			ce->poll_ns = NK_POLL_MIN_NS; /* VM-2: work came: short sleeps again */
		} else if (++idle < ce->spin) {
			sched_yield();
		} else {
			idle = 0;
			sleep_idle(ce, deadline);
		}
		if (now_ns() >= deadline)
			return ce->n_broken ? NK_CE_BROKEN : interrupted(ce) ? NK_CE_INTERRUPT
									     : NK_CE_TIMEOUT;
	}
}

/* -- reporting ---------------------------------------------------------------------- */

int nk_ce_broken(struct nk_ce *ce, uint8_t *kinds, uint8_t *idents, int max)
{
	int n = 0;
	for (uint32_t i = 0; i < ce->n_devices && n < max; i++)
		if (ce->order[i]->broken) {
			kinds[n] = ce->order[i]->kind;
			idents[n++] = ce->order[i]->ident;
		}
	return n;
}

uint64_t nk_ce_pending(const struct nk_ce *ce)
{
	return ce->pending_nqes;
}

uint32_t nk_ce_blocked_sources(const struct nk_ce *ce)
{
	return ce->blocked;
}

void nk_ce_get_stats(const struct nk_ce *ce, struct nk_ce_stats *out)
{
	*out = ce->stats;
}
