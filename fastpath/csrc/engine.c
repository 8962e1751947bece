/* The CoreEngine's switching core: a port of reference/engine.py (CE-*, SEC-*).
 *
 * Same outputs, in the same order, for every input, and the same connection
 * table and counters. Where the reference builds a new engine and throws it
 * away on a refusal (SEC-8), this file checks everything a handler can refuse
 * *before* it changes anything, so a refused NQE changes nothing but counters.
 *
 * State, and the index that makes each hot-path question O(1):
 *   conns    connection table entries; fwd (tenant key) and rev (NSM key) maps (CE-1)
 *   flights  requests in flight, by (NSM key, tag) (CE-11, NQE-9); per-VM counts (SEC-5)
 *   opening  tenant keys a SOCKET/ACCEPT in flight will create (CE-10)
 *   nsock    NSM socket IDs in use per NSM (table, opening, draining), refcounted (CE-10)
 *   grants   (vm, nsm) -> receive slice, ready, held SOCKETs (CE-16)
 *   drain    (nsm, sock) -> vm and (nsm, vm) pairs until TENANT_UNMAP is answered (CE-18)
 *   ledgers  per tenant: slices, send buffers lent, receive buffers held (BUF-3..BUF-8);
 *            spans keyed by offset, plus per-bucket counts for the overlap checks
 *
 * Memory: every table grows by doubling (amortised); once warm, a SEND, its
 * reply, EV_DATA and BUF_RETURN allocate nothing. An allocation failure aborts:
 * the engine cannot honour SEC-8 half way through a step.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nk/engine.h"

#define NONE UINT32_MAX
#define U32 0xFFFFFFFFull

/* -- allocation ------------------------------------------------------------------ */

static void *xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);
	if (!q) {
		fprintf(stderr, "nk_engine: out of memory\n");
		abort();
	}
	return q;
}

static void *xdup(const void *p, size_t n)
{
	void *q = xrealloc(NULL, n);
	if (n)
		memcpy(q, p, n);
	return q;
}

/* A growable array of `T`: items, n, cap. */
#define VEC(T) struct { T *v; uint32_t n, cap; }
#define VEC_PUSH(vec, item)                                                          \
	do {                                                                         \
		if ((vec).n == (vec).cap) {                                          \
			(vec).cap = (vec).cap ? 2 * (vec).cap : 8;                   \
			(vec).v = xrealloc((vec).v, (size_t)(vec).cap * sizeof(*(vec).v)); \
		}                                                                    \
		(vec).v[(vec).n++] = (item);                                         \
	} while (0)
#define VEC_CLONE(dst, src)                                                          \
	do {                                                                         \
		(dst).n = (src).n;                                                   \
		(dst).cap = (src).n;                                                 \
		(dst).v = xdup((src).v, (size_t)(src).n * sizeof(*(src).v));         \
	} while (0)

/* -- an open-addressing hash map u64 -> u32 (linear probing, backward-shift delete) -- */

struct map {
	uint64_t *keys;
	uint32_t *vals; /* NONE: empty slot */
	uint32_t mask, n;
};

static inline uint32_t map_home(const struct map *m, uint64_t k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdULL;
	k ^= k >> 33;
	return (uint32_t)k & m->mask;
}

static void map_init(struct map *m, uint32_t cap)
{
	m->mask = cap - 1;
	m->n = 0;
	m->keys = xrealloc(NULL, (size_t)cap * sizeof(*m->keys));
	m->vals = xrealloc(NULL, (size_t)cap * sizeof(*m->vals));
	memset(m->vals, 0xFF, (size_t)cap * sizeof(*m->vals));
}

static void map_free(struct map *m)
{
	free(m->keys);
	free(m->vals);
}

static void map_clone(struct map *dst, const struct map *src)
{
	size_t cap = (size_t)src->mask + 1;
	dst->mask = src->mask;
	dst->n = src->n;
	dst->keys = xdup(src->keys, cap * sizeof(*src->keys));
	dst->vals = xdup(src->vals, cap * sizeof(*src->vals));
}

static inline uint32_t map_get(const struct map *m, uint64_t k)
{
	for (uint32_t i = map_home(m, k);; i = (i + 1) & m->mask) {
		if (m->vals[i] == NONE)
			return NONE;
		if (m->keys[i] == k)
			return m->vals[i];
	}
}

static void map_put(struct map *m, uint64_t k, uint32_t v);

static void map_grow(struct map *m)
{
	struct map old = *m;
	map_init(m, 2 * (old.mask + 1));
	for (uint32_t i = 0; i <= old.mask; i++)
		if (old.vals[i] != NONE)
			map_put(m, old.keys[i], old.vals[i]);
	map_free(&old);
}

/* Room for `n` entries without growing (sized at attach, so the hot path does not allocate). */
static void map_reserve(struct map *m, uint32_t n)
{
	while (2 * (uint64_t)n > (uint64_t)m->mask + 1)
		map_grow(m);
}

/* Insert or overwrite. Load stays below 1/2. */
static void map_put(struct map *m, uint64_t k, uint32_t v)
{
	if (2 * (m->n + 1) > m->mask + 1)
		map_grow(m);
	uint32_t i = map_home(m, k);
	for (; m->vals[i] != NONE; i = (i + 1) & m->mask) {
		if (m->keys[i] == k) {
			m->vals[i] = v;
			return;
		}
	}
	m->keys[i] = k;
	m->vals[i] = v;
	m->n++;
}

static void map_del(struct map *m, uint64_t k)
{
	uint32_t i = map_home(m, k);
	for (;; i = (i + 1) & m->mask) {
		if (m->vals[i] == NONE)
			return;
		if (m->keys[i] == k)
			break;
	}
	m->vals[i] = NONE;
	m->n--;
	/* backward shift: pull later members of the cluster into the hole if their
	 * home is cyclically at or before it */
	for (uint32_t j = (i + 1) & m->mask; m->vals[j] != NONE; j = (j + 1) & m->mask) {
		uint32_t h = map_home(m, m->keys[j]);
		if (((j - h) & m->mask) >= ((j - i) & m->mask)) {
			m->keys[i] = m->keys[j];
			m->vals[i] = m->vals[j];
			m->vals[j] = NONE;
			i = j;
		}
	}
}

/* -- keys ------------------------------------------------------------------------- */

/* (owner, qset, sock) of a tenant or NSM socket (CE-1); numeric order = tuple order. */
static inline uint64_t skey(uint8_t owner, uint8_t qset, uint32_t sock)
{
	return (uint64_t)owner << 40 | (uint64_t)qset << 32 | sock;
}

/* (NSM key, tag) of a request in flight (NQE-9); numeric order = tuple order. */
static inline uint64_t fkey(uint8_t nsm, uint8_t qset, uint32_t sock, uint16_t tag)
{
	return (uint64_t)nsm << 56 | (uint64_t)qset << 48 | (uint64_t)sock << 16 | tag;
}

static inline uint64_t idkey(uint8_t nsm, uint32_t sock) /* an NSM socket ID, any qset */
{
	return (uint64_t)nsm << 32 | sock;
}

static inline uint64_t pairkey(uint8_t a, uint8_t b)
{
	return (uint64_t)a << 8 | b;
}

/* -- spans: buffers in one half of a data area (BUF-3, BUF-4) ------------------------ */

struct span {
	uint64_t off;
	uint64_t size;
	uint8_t nsm;
};

/* Disjoint spans keyed by offset; `cnt[b]` counts spans touching bucket b, so an
 * overlap check over free buckets is O(span / bucket) with no scan. */
struct spanset {
	VEC(struct span) s;
	struct map by_off; /* offset -> index in s */
	uint64_t base;
	uint32_t shift, nbuckets;
	uint32_t *cnt;
};

#define MAX_BUCKETS (1u << 18) /* 1 MiB of counts per half at most */
#define SCAN_BUCKETS 64 /* a span over more buckets than this is checked by a scan */

static void spanset_init(struct spanset *ss, uint64_t base, uint64_t size, uint32_t granule)
{
	memset(ss, 0, sizeof(*ss));
	map_init(&ss->by_off, 16);
	ss->base = base;
	uint32_t shift = (uint32_t)__builtin_ctz(granule); /* a power of two (DEV-11) */
	while ((size >> shift) >= MAX_BUCKETS)
		shift++;
	ss->shift = shift;
	ss->nbuckets = (uint32_t)((size + ((uint64_t)1 << shift) - 1) >> shift);
	ss->cnt = calloc(ss->nbuckets ? ss->nbuckets : 1, sizeof(*ss->cnt));
	if (!ss->cnt)
		abort();
}

static void spanset_free(struct spanset *ss)
{
	free(ss->s.v);
	map_free(&ss->by_off);
	free(ss->cnt);
}

static void spanset_clone(struct spanset *dst, const struct spanset *src)
{
	*dst = *src;
	VEC_CLONE(dst->s, src->s);
	map_clone(&dst->by_off, &src->by_off);
	dst->cnt = xdup(src->cnt, (size_t)(src->nbuckets ? src->nbuckets : 1) * sizeof(*dst->cnt));
}

/* Buckets [*b0, *b1] of a non-empty span inside the set's half. */
static inline void spanset_buckets(const struct spanset *ss, uint64_t off, uint64_t size,
				   uint32_t *b0, uint32_t *b1)
{
	*b0 = (uint32_t)((off - ss->base) >> ss->shift);
	*b1 = (uint32_t)((off - ss->base + size - 1) >> ss->shift);
}

/* True if [off, off+size) overlaps a span of the set (size > 0, inside the half). */
static int spanset_overlaps(const struct spanset *ss, uint64_t off, uint64_t size)
{
	uint32_t b0, b1;
	spanset_buckets(ss, off, size, &b0, &b1);
	if (b1 - b0 <= SCAN_BUCKETS) {
		int busy = 0;
		for (uint32_t b = b0; b <= b1 && !busy; b++)
			busy = ss->cnt[b] != 0;
		if (!busy)
			return 0;
	}
	uint64_t end = off + size;
	for (uint32_t i = 0; i < ss->s.n; i++) {
		const struct span *s = &ss->s.v[i];
		if (s->off < end && off < s->off + s->size)
			return 1;
	}
	return 0;
}

static void spanset_count(struct spanset *ss, const struct span *s, uint32_t delta)
{
	uint32_t b0, b1;
	spanset_buckets(ss, s->off, s->size, &b0, &b1);
	for (uint32_t b = b0; b <= b1; b++)
		ss->cnt[b] += delta;
}

static void spanset_add(struct spanset *ss, uint64_t off, uint64_t size, uint8_t nsm)
{
	struct span s = {off, size, nsm};
	map_put(&ss->by_off, off, ss->s.n);
	VEC_PUSH(ss->s, s);
	spanset_count(ss, &s, 1);
}

static const struct span *spanset_at(const struct spanset *ss, uint64_t off)
{
	uint32_t i = map_get(&ss->by_off, off);
	return i == NONE ? NULL : &ss->s.v[i];
}

static void spanset_remove(struct spanset *ss, uint64_t off)
{
	uint32_t i = map_get(&ss->by_off, off);
	if (i == NONE)
		return;
	spanset_count(ss, &ss->s.v[i], (uint32_t)-1);
	map_del(&ss->by_off, off);
	uint32_t last = --ss->s.n;
	if (i != last) {
		ss->s.v[i] = ss->s.v[last];
		map_put(&ss->by_off, ss->s.v[i].off, i);
	}
}

/* -- devices and ledgers ------------------------------------------------------------- */

/* The ledger of one tenant (reference bufpool.Ledger): BUF-3..BUF-5, BUF-8. */
struct nk_ledger {
	struct nk_geometry geo;
	uint64_t slice_off[256], slice_size[256]; /* by NSM ID; size 0: no slice */
	struct spanset sent;                      /* send buffers lent to an NSM (BUF-3) */
	struct spanset held;                      /* receive buffers the tenant holds (BUF-4) */
};

struct dev {
	struct nk_geometry geo;
	struct nk_counters ctr;
	struct nk_ledger *ledger; /* tenants only */
};

struct conn {
	uint8_t vm, tq, nsm, nq;
	uint32_t tsock, nsock;
};

/* The connection table (CE-1..CE-6): entries, and both directions as maps to them. */
struct nk_table {
	VEC(struct conn) conns;
	struct map fwd, rev; /* tenant key / NSM key -> conns index */
};

static void table_init(struct nk_table *t)
{
	memset(t, 0, sizeof(*t));
	map_init(&t->fwd, 64);
	map_init(&t->rev, 64);
}

static void table_free(struct nk_table *t)
{
	free(t->conns.v);
	map_free(&t->fwd);
	map_free(&t->rev);
}

static void table_clone(struct nk_table *dst, const struct nk_table *src)
{
	VEC_CLONE(dst->conns, src->conns);
	map_clone(&dst->fwd, &src->fwd);
	map_clone(&dst->rev, &src->rev);
}

/* CE-3: add tkey <-> nkey; an entry never replaces another, on either side. */
static int table_insert(struct nk_table *t, const struct conn *c)
{
	uint64_t tk = skey(c->vm, c->tq, c->tsock), nk = skey(c->nsm, c->nq, c->nsock);
	if (map_get(&t->fwd, tk) != NONE)
		return -EEXIST;
	if (map_get(&t->rev, nk) != NONE)
		return -EADDRINUSE;
	map_put(&t->fwd, tk, t->conns.n);
	map_put(&t->rev, nk, t->conns.n);
	VEC_PUSH(t->conns, *c);
	return 0;
}

static void table_remove_at(struct nk_table *t, uint32_t i)
{
	struct conn c = t->conns.v[i];
	map_del(&t->fwd, skey(c.vm, c.tq, c.tsock));
	map_del(&t->rev, skey(c.nsm, c.nq, c.nsock));
	uint32_t last = --t->conns.n;
	if (i != last) {
		struct conn *m = &t->conns.v[i];
		*m = t->conns.v[last];
		map_put(&t->fwd, skey(m->vm, m->tq, m->tsock), i);
		map_put(&t->rev, skey(m->nsm, m->nq, m->nsock), i);
	}
}

struct flight {
	uint64_t fk;
	uint8_t vm, tq;    /* tkey: the socket the request names */
	uint32_t tsock;
	uint8_t opens, held;
	uint8_t o_vm, o_tq, o_nsm, o_nq; /* the entry a successful reply creates (CE-7) */
	uint32_t o_tsock, o_nsock;
	struct nk_nqe req; /* stamped */
	struct nk_nqe fwd;
	uint8_t fwd_nsm, fwd_q, fwd_ring;
};

struct grant {
	uint8_t vm, nsm, ready;
	uint64_t off, size;
	VEC(uint64_t) held; /* flight keys, in arrival order */
};

struct nk_engine {
	struct nk_engine_config cfg;
	int64_t limit;  /* SEC-5; < 0: the tenant's completion capacity */
	int choice;     /* the policy's answer, -1: use cfg */
	struct dev *devs[3][256];
	struct nk_table tab; /* the connection table (CE-1) */
	VEC(struct flight) flights;
	struct map fl;      /* flight key -> flights index */
	struct map opening; /* tenant keys being opened */
	uint32_t inflight[256];
	struct map nsock;   /* (nsm, sock) -> refcount */
	VEC(struct grant) grants;
	struct map gr;      /* (vm, nsm) -> grants index */
	struct map drain;   /* (nsm, sock) -> vm */
	struct map dpair;   /* (nsm, vm) -> 1 */
	uint32_t drain_vm[256];
	uint32_t next_sock[256]; /* 0: none yet */
	VEC(struct nk_out) out;
};

static inline struct dev *dev_of(const struct nk_engine *e, uint8_t kind, uint8_t ident)
{
	return kind == NK_KIND_TENANT || kind == NK_KIND_NSM ? e->devs[kind][ident] : NULL;
}

static struct nk_ledger *ledger_new(const struct nk_geometry *g)
{
	struct nk_ledger *l = calloc(1, sizeof(*l));
	if (!l)
		abort();
	l->geo = *g;
	spanset_init(&l->sent, 0, g->send_size, g->buf_size);
	spanset_init(&l->held, g->send_size, g->data_size - g->send_size, g->buf_size);
	return l;
}

static void ledger_free(struct nk_ledger *l)
{
	if (!l)
		return;
	spanset_free(&l->sent);
	spanset_free(&l->held);
	free(l);
}

static struct nk_ledger *ledger_clone(const struct nk_ledger *src)
{
	struct nk_ledger *l = xdup(src, sizeof(*src));
	spanset_clone(&l->sent, &src->sent);
	spanset_clone(&l->held, &src->held);
	return l;
}

/* [off, off+size) lies in [o, o+osz), never forming off+size (NQE-14). */
static inline int within(uint64_t o, uint64_t osz, uint64_t off, uint64_t size)
{
	uint64_t end = o + osz;
	return off >= o && off <= end && size <= end - off;
}

static inline int in_send_half(const struct nk_geometry *g, uint64_t off, uint64_t size)
{
	return within(0, g->send_size, off, size);
}

static inline int in_recv_half(const struct nk_geometry *g, uint64_t off, uint64_t size)
{
	return within(g->send_size, g->data_size - g->send_size, off, size);
}

/* _rebuild_ledger(drop_nsm): the slice and the receive buffers of that NSM go. */
static void ledger_drop_nsm(struct nk_ledger *l, uint8_t nsm)
{
	l->slice_size[nsm] = 0;
	l->slice_off[nsm] = 0;
	for (uint32_t i = l->held.s.n; i-- > 0;)
		if (l->held.s.v[i].nsm == nsm)
			spanset_remove(&l->held, l->held.s.v[i].off);
}

/* -- engine life cycle ---------------------------------------------------------------- */

struct nk_engine *nk_engine_new(const struct nk_engine_config *cfg)
{
	struct nk_engine *e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	if (cfg)
		e->cfg = *cfg;
	e->limit = e->cfg.max_inflight ? (int64_t)e->cfg.max_inflight : -1;
	e->choice = -1;
	table_init(&e->tab);
	map_init(&e->fl, 64);
	map_init(&e->opening, 16);
	map_init(&e->nsock, 64);
	map_init(&e->gr, 16);
	map_init(&e->drain, 16);
	map_init(&e->dpair, 16);
	return e;
}

static void grant_free(struct grant *g)
{
	free(g->held.v);
}

void nk_engine_free(struct nk_engine *e)
{
	if (!e)
		return;
	for (int k = 1; k <= 2; k++)
		for (int i = 0; i < 256; i++)
			if (e->devs[k][i]) {
				ledger_free(e->devs[k][i]->ledger);
				free(e->devs[k][i]);
			}
	table_free(&e->tab);
	free(e->flights.v);
	for (uint32_t i = 0; i < e->grants.n; i++)
		grant_free(&e->grants.v[i]);
	free(e->grants.v);
	free(e->out.v);
	struct map *maps[] = {&e->fl, &e->opening, &e->nsock,
			      &e->gr, &e->drain, &e->dpair};
	for (size_t i = 0; i < sizeof(maps) / sizeof(maps[0]); i++)
		map_free(maps[i]);
	free(e);
}

struct nk_engine *nk_engine_clone(const struct nk_engine *src)
{
	struct nk_engine *e = xdup(src, sizeof(*src));
	for (int k = 1; k <= 2; k++)
		for (int i = 0; i < 256; i++)
			if (src->devs[k][i]) {
				e->devs[k][i] = xdup(src->devs[k][i], sizeof(struct dev));
				if (src->devs[k][i]->ledger)
					e->devs[k][i]->ledger = ledger_clone(src->devs[k][i]->ledger);
			}
	table_clone(&e->tab, &src->tab);
	VEC_CLONE(e->flights, src->flights);
	VEC_CLONE(e->grants, src->grants);
	for (uint32_t i = 0; i < e->grants.n; i++)
		VEC_CLONE(e->grants.v[i].held, src->grants.v[i].held);
	VEC_CLONE(e->out, src->out);
	map_clone(&e->fl, &src->fl);
	map_clone(&e->opening, &src->opening);
	map_clone(&e->nsock, &src->nsock);
	map_clone(&e->gr, &src->gr);
	map_clone(&e->drain, &src->drain);
	map_clone(&e->dpair, &src->dpair);
	return e;
}

void nk_engine_set_max_inflight(struct nk_engine *e, int64_t limit)
{
	e->limit = limit;
}

void nk_engine_set_policy_choice(struct nk_engine *e, int nsm)
{
	e->choice = nsm;
}

/* -- outputs and counters (CE-23) ------------------------------------------------------ */

static inline void count_out(struct nk_engine *e, uint8_t kind, uint8_t ident, uint64_t bytes)
{
	struct dev *d = dev_of(e, kind, ident);
	if (d) {
		d->ctr.nqes_out++;
		d->ctr.bytes_out += bytes;
	}
}

/* Write `n` to ring `ring` of queue set `qset` of (kind, ident), counted there. */
static void emit(struct nk_engine *e, uint8_t kind, uint8_t ident, uint8_t qset, uint8_t ring,
		 const struct nk_nqe *n)
{
	if (e->out.n == e->out.cap) {
		e->out.cap = e->out.cap ? 2 * e->out.cap : 16;
		e->out.v = xrealloc(e->out.v, (size_t)e->out.cap * sizeof(*e->out.v));
	}
	struct nk_out *o = &e->out.v[e->out.n++]; /* built in place: this is the hot path */
	o->kind = kind;
	o->ident = ident;
	o->qset = qset;
	o->ring = ring;
	o->nqe = *n;
	count_out(e, kind, ident, n->op == NK_OP_SEND || n->op == NK_OP_EV_DATA ? n->size : 0);
}

static inline void reply_to(struct nk_nqe *r, const struct nk_nqe *req, int64_t result)
{
	/* NQE-8, NQE-13, NQE-4: the request with its reply op and result, reserved zero */
	*r = *req;
	r->op = nk_op_is_answerable(req->op) && !(req->op & NK_REPLY_BIT)
			? (uint8_t)(req->op | NK_REPLY_BIT)
			: NK_OP_UNKNOWN_REPLY;
	r->op_data = (uint64_t)result;
	memset(r->reserved, 0, sizeof(r->reserved));
}

static inline int answerable(uint8_t op)
{
	return !(op & NK_REPLY_BIT) && nk_op_is_answerable(op);
}

/* SEC-6, SEC-8: refuse `m` from `src`: counted, answered on its COMPLETION ring if it may be. */
static void refuse(struct nk_engine *e, struct dev *src, uint8_t kind, uint8_t ident,
		   const struct nk_nqe *m, int err)
{
	src->ctr.rejected++;
	if (answerable(m->op)) {
		struct nk_nqe r;
		reply_to(&r, m, -(int64_t)err);
		emit(e, kind, ident, m->qset, NK_RING_COMPLETION, &r);
	}
}

/* NQE-8, SEC-7: drop an NQE nobody may answer. */
static inline void drop(struct dev *src, int stale)
{
	if (stale)
		src->ctr.stale++;
	else
		src->ctr.rejected++;
}

/* -- the connection table (CE-1..CE-6) and NSM socket IDs (CE-10) ------------------------- */

static inline void nsock_ref(struct nk_engine *e, uint8_t nsm, uint32_t sock)
{
	uint64_t k = idkey(nsm, sock);
	uint32_t v = map_get(&e->nsock, k);
	map_put(&e->nsock, k, v == NONE ? 1 : v + 1);
}

static inline void nsock_unref(struct nk_engine *e, uint8_t nsm, uint32_t sock)
{
	uint64_t k = idkey(nsm, sock);
	uint32_t v = map_get(&e->nsock, k);
	if (v == NONE)
		return;
	if (v <= 1)
		map_del(&e->nsock, k);
	else
		map_put(&e->nsock, k, v - 1);
}

static void conn_insert(struct nk_engine *e, uint8_t vm, uint8_t tq, uint32_t tsock, uint8_t nsm,
			uint8_t nq, uint32_t nsock)
{
	struct conn c = {vm, tq, nsm, nq, tsock, nsock};
	if (table_insert(&e->tab, &c) == 0) /* never refused: both keys were reserved (CE-10) */
		nsock_ref(e, nsm, nsock);
}

static void conn_remove_at(struct nk_engine *e, uint32_t i)
{
	nsock_unref(e, e->tab.conns.v[i].nsm, e->tab.conns.v[i].nsock);
	table_remove_at(&e->tab, i);
}

static inline int reserved_tkey(const struct nk_engine *e, uint64_t tk) /* CE-10 */
{
	return map_get(&e->tab.fwd, tk) != NONE || map_get(&e->opening, tk) != NONE;
}

static uint32_t alloc_sock(struct nk_engine *e, uint8_t nsm) /* CE-10 */
{
	uint32_t sock = e->next_sock[nsm] ? e->next_sock[nsm] : 1;
	while (map_get(&e->nsock, idkey(nsm, sock)) != NONE)
		sock = (uint32_t)(sock % U32 + 1);
	e->next_sock[nsm] = (uint32_t)(sock % U32 + 1);
	return sock;
}

/* -- grants (CE-16) and flights (CE-11) --------------------------------------------------- */

static inline struct grant *grant_of(struct nk_engine *e, uint8_t vm, uint8_t nsm)
{
	uint32_t i = map_get(&e->gr, pairkey(vm, nsm));
	return i == NONE ? NULL : &e->grants.v[i];
}

static void grant_remove(struct nk_engine *e, uint8_t vm, uint8_t nsm)
{
	uint32_t i = map_get(&e->gr, pairkey(vm, nsm));
	if (i == NONE)
		return;
	grant_free(&e->grants.v[i]);
	map_del(&e->gr, pairkey(vm, nsm));
	uint32_t last = --e->grants.n;
	if (i != last) {
		e->grants.v[i] = e->grants.v[last];
		map_put(&e->gr, pairkey(e->grants.v[i].vm, e->grants.v[i].nsm), i);
	}
}

static inline struct flight *flight_of(struct nk_engine *e, uint64_t fk)
{
	uint32_t i = map_get(&e->fl, fk);
	return i == NONE ? NULL : &e->flights.v[i];
}

/* Forget flight `fk`; *out gets a copy of it. */
static void flight_remove(struct nk_engine *e, uint64_t fk, struct flight *out)
{
	uint32_t i = map_get(&e->fl, fk);
	if (i == NONE)
		return;
	struct flight f = e->flights.v[i];
	if (out)
		*out = f;
	map_del(&e->fl, fk);
	e->inflight[f.vm]--;
	if (f.opens) {
		map_del(&e->opening, skey(f.o_vm, f.o_tq, f.o_tsock));
		nsock_unref(e, f.o_nsm, f.o_nsock);
	}
	if (f.held) { /* answered before its NSM answered TENANT_MAP: no longer held */
		struct grant *g = grant_of(e, f.vm, (uint8_t)(fk >> 56));
		if (g)
			for (uint32_t j = 0; j < g->held.n; j++)
				if (g->held.v[j] == fk) {
					memmove(&g->held.v[j], &g->held.v[j + 1],
						(g->held.n - j - 1) * sizeof(uint64_t));
					g->held.n--;
					break;
				}
	}
	uint32_t last = --e->flights.n;
	if (i != last) {
		e->flights.v[i] = e->flights.v[last];
		map_put(&e->fl, e->flights.v[i].fk, i);
	}
}

/* _answer: the tenant's reply is its request with op and result set (CE-11, SEC-4). */
static void answer(struct nk_engine *e, const struct flight *f, uint8_t op, uint64_t op_data)
{
	struct nk_nqe r = f->req;
	r.op = op;
	r.op_data = op_data;
	emit(e, NK_KIND_TENANT, r.vm_id, r.qset, NK_RING_COMPLETION, &r);
}

/* -- entry points: attach / detach (CE-18, CE-19, CE-22) ------------------------------------ */

static int geometry_ok(const struct nk_geometry *g)
{
	uint32_t b = g->buf_size;
	return (g->kind == NK_KIND_TENANT || g->kind == NK_KIND_NSM) && g->n_qsets >= 1 &&
	       g->n_qsets <= NK_MAX_QSETS && b >= 64 && !(b & (b - 1)) &&
	       g->send_size > 0 && g->send_size < g->data_size && !(g->send_size % b) &&
	       !(g->data_size % b) && g->ring_entries >= NK_MIN_RING_ENTRIES &&
	       g->ring_entries <= NK_MAX_RING_ENTRIES && !(g->ring_entries & (g->ring_entries - 1));
}

static inline int id_taken(const struct nk_engine *e, uint8_t kind, int id)
{
	return e->devs[kind][id] || (kind == NK_KIND_TENANT && e->drain_vm[id]);
}

int nk_engine_attach(struct nk_engine *e, const struct nk_geometry *geo, int ident)
{
	if (!geometry_ok(geo))
		return -EINVAL;
	uint8_t kind = (uint8_t)geo->kind;
	if (ident < 0) {
		for (ident = NK_ID_MIN; ident <= NK_ID_MAX && id_taken(e, kind, ident); ident++)
			;
		if (ident > NK_ID_MAX)
			return -ENOSPC;
	} else if (ident < NK_ID_MIN || ident > NK_ID_MAX) {
		return -EINVAL;
	} else if (id_taken(e, kind, ident)) {
		return -EEXIST;
	}
	struct dev *d = calloc(1, sizeof(*d));
	if (!d)
		abort();
	d->geo = *geo;
	if (kind == NK_KIND_TENANT)
		d->ledger = ledger_new(geo);
	e->devs[kind][ident] = d;
	if (kind == NK_KIND_TENANT) { /* SEC-5 bounds its flights: make room for them now */
		int64_t limit = e->limit >= 0 ? e->limit : (int64_t)geo->n_qsets * geo->ring_entries;
		uint32_t more = (uint32_t)(limit < (1 << 16) ? limit : (1 << 16));
		uint32_t want = e->flights.n + more;
		map_reserve(&e->fl, want);
		if (want > e->flights.cap) {
			e->flights.cap = want;
			e->flights.v = xrealloc(e->flights.v, (size_t)want * sizeof(*e->flights.v));
		}
	}
	return ident;
}

/* CE-18, SEC-11: everything of a tenant goes; its NSMs get TENANT_UNMAP. */
static void detach_tenant(struct nk_engine *e, uint8_t vm)
{
	VEC(uint64_t) ids = {0}; /* (nsm, sock) of every NSM socket the tenant had */
	for (uint32_t i = e->tab.conns.n; i-- > 0;) {
		struct conn c = e->tab.conns.v[i];
		if (c.vm != vm)
			continue;
		VEC_PUSH(ids, idkey(c.nsm, c.nsock));
		conn_remove_at(e, i);
	}
	for (uint32_t i = e->flights.n; i-- > 0;) {
		if (i >= e->flights.n)
			continue;
		struct flight f = e->flights.v[i];
		if (f.vm != vm)
			continue;
		VEC_PUSH(ids, idkey((uint8_t)(f.fk >> 56), (uint32_t)(f.fk >> 16)));
		if (f.opens)
			VEC_PUSH(ids, idkey((uint8_t)(f.fk >> 56), f.o_nsock));
		flight_remove(e, f.fk, NULL);
	}
	uint8_t has[256] = {0};
	for (uint32_t i = 0; i < ids.n; i++)
		has[ids.v[i] >> 32] = 1;
	for (int nsm = NK_ID_MIN; nsm <= NK_ID_MAX; nsm++) {
		int granted = grant_of(e, vm, (uint8_t)nsm) != NULL;
		if (!granted && !has[nsm])
			continue;
		grant_remove(e, vm, (uint8_t)nsm);
		if (!e->devs[NK_KIND_NSM][nsm])
			continue;
		map_put(&e->dpair, pairkey((uint8_t)nsm, vm), 1);
		e->drain_vm[vm]++;
		for (uint32_t i = 0; i < ids.n; i++) {
			if ((ids.v[i] >> 32) != (uint64_t)nsm || map_get(&e->drain, ids.v[i]) != NONE)
				continue;
			map_put(&e->drain, ids.v[i], vm);
			nsock_ref(e, (uint8_t)nsm, (uint32_t)ids.v[i]);
		}
		struct nk_nqe u = {.op = NK_OP_TENANT_UNMAP, .vm_id = vm, .op_data = vm, .tag = vm};
		emit(e, NK_KIND_NSM, (uint8_t)nsm, 0, NK_RING_RECEIVE, &u);
	}
	free(ids.v);
}

/* The draining of (nsm, vm) ends (TENANT_UNMAP answered, or the NSM left). */
static void drain_end(struct nk_engine *e, uint8_t nsm, uint8_t vm)
{
	VEC(uint64_t) gone = {0};
	for (uint32_t i = 0; i <= e->drain.mask; i++)
		if (e->drain.vals[i] == vm && (e->drain.keys[i] >> 32) == nsm)
			VEC_PUSH(gone, e->drain.keys[i]);
	for (uint32_t i = 0; i < gone.n; i++) {
		map_del(&e->drain, gone.v[i]);
		nsock_unref(e, nsm, (uint32_t)gone.v[i]);
	}
	free(gone.v);
	map_del(&e->dpair, pairkey(nsm, vm));
	e->drain_vm[vm]--;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* CE-19, SEC-11: everything an NSM served is answered or reset, then forgotten. */
static void detach_nsm(struct nk_engine *e, uint8_t nsm)
{
	VEC(uint64_t) fks = {0};
	for (uint32_t i = 0; i < e->flights.n; i++)
		if ((uint8_t)(e->flights.v[i].fk >> 56) == nsm)
			VEC_PUSH(fks, e->flights.v[i].fk);
	if (fks.n)
		qsort(fks.v, fks.n, sizeof(uint64_t), cmp_u64);
	VEC(uint64_t) closing = {0};
	for (uint32_t i = 0; i < fks.n; i++) {
		struct flight f;
		flight_remove(e, fks.v[i], &f);
		int64_t result = -ECONNRESET;
		if (f.req.op == NK_OP_CLOSE) {
			result = 0;
			VEC_PUSH(closing, skey(f.vm, f.tq, f.tsock));
		}
		struct dev *t = dev_of(e, NK_KIND_TENANT, f.req.vm_id);
		if (f.req.op == NK_OP_SEND && f.req.size && t)
			spanset_remove(&t->ledger->sent, f.req.data_ptr); /* BUF-3 settle */
		answer(e, &f, (uint8_t)(f.req.op | NK_REPLY_BIT), (uint64_t)result);
	}
	free(fks.v);
	if (closing.n)
		qsort(closing.v, closing.n, sizeof(uint64_t), cmp_u64);
	VEC(uint64_t) gone = {0};
	for (uint32_t i = 0; i < e->tab.conns.n; i++)
		if (e->tab.conns.v[i].nsm == nsm) {
			struct conn c = e->tab.conns.v[i];
			VEC_PUSH(gone, skey(c.vm, c.tq, c.tsock));
		}
	if (gone.n)
		qsort(gone.v, gone.n, sizeof(uint64_t), cmp_u64);
	for (uint32_t i = 0; i < gone.n; i++) {
		uint64_t tk = gone.v[i];
		conn_remove_at(e, map_get(&e->tab.fwd, tk));
		if (closing.n && bsearch(&tk, closing.v, closing.n, sizeof(uint64_t), cmp_u64))
			continue;
		struct nk_nqe ev = {.op = NK_OP_EV_ERROR, .qset = (uint8_t)(tk >> 32),
				    .vm_id = (uint8_t)(tk >> 40), .sock_id = (uint32_t)tk,
				    .op_data = (uint64_t)(int64_t)-ECONNRESET};
		emit(e, NK_KIND_TENANT, ev.vm_id, ev.qset, NK_RING_RECEIVE, &ev);
	}
	free(gone.v);
	free(closing.v);
	for (uint32_t i = e->grants.n; i-- > 0;)
		if (i < e->grants.n && e->grants.v[i].nsm == nsm)
			grant_remove(e, e->grants.v[i].vm, nsm);
	for (int vm = NK_ID_MIN; vm <= NK_ID_MAX; vm++) {
		struct dev *t = e->devs[NK_KIND_TENANT][vm];
		if (t && t->ledger->slice_size[nsm])
			ledger_drop_nsm(t->ledger, nsm);
	}
	for (int vm = 0; vm < 256; vm++)
		if (map_get(&e->dpair, pairkey(nsm, (uint8_t)vm)) != NONE)
			drain_end(e, nsm, (uint8_t)vm);
	e->next_sock[nsm] = 0;
}

static void detach_dev(struct nk_engine *e, uint8_t kind, uint8_t ident)
{
	if (kind == NK_KIND_TENANT)
		detach_tenant(e, ident);
	else
		detach_nsm(e, ident);
	struct dev *d = e->devs[kind][ident];
	ledger_free(d->ledger);
	free(d);
	e->devs[kind][ident] = NULL;
}

int nk_engine_detach(struct nk_engine *e, uint8_t kind, uint8_t ident)
{
	e->out.n = 0;
	if (!dev_of(e, kind, ident))
		return 0;
	detach_dev(e, kind, ident);
	return (int)e->out.n;
}

/* -- from a tenant (CE-9..CE-17, SEC-9) ------------------------------------------------------ */

enum half { H_NONE, H_SEND, H_RECV };

/* HALF: the half of the data area each op's buffer lies in (NQE-6, CE-14). */
static inline enum half half_of(uint8_t op)
{
	switch (op) {
	case NK_OP_BIND: case NK_OP_CONNECT: case NK_OP_ACCEPT: case NK_OP_SEND:
	case NK_OP_SETSOCKOPT: case NK_OP_GETSOCKOPT: case NK_OP_GETSOCKNAME:
	case NK_OP_GETPEERNAME:
		return H_SEND;
	default:
		return H_NONE;
	}
}

static inline uint8_t nsm_ring_of(uint8_t op) /* DEV-8, CE-13 */
{
	return op == NK_OP_SEND ? NK_RING_RECEIVE : NK_RING_COMPLETION;
}

static inline int quota_ok(const struct nk_engine *e, const struct dev *t, uint8_t vm) /* SEC-5 */
{
	int64_t limit = e->limit >= 0 ? e->limit : (int64_t)t->geo.n_qsets * t->geo.ring_entries;
	return (int64_t)e->inflight[vm] < limit;
}

/* _forward: send a checked request on to its NSM, remember it until answered (CE-11). */
static void forward(struct nk_engine *e, struct dev *t, uint8_t vm, uint8_t nsm, uint8_t nq,
		    uint32_t nsock, const struct nk_nqe *m, const struct nk_nqe *fwd,
		    const struct flight *opens)
{
	if (e->flights.n == e->flights.cap) {
		e->flights.cap = e->flights.cap ? 2 * e->flights.cap : 64;
		e->flights.v = xrealloc(e->flights.v, (size_t)e->flights.cap * sizeof(*e->flights.v));
	}
	struct flight *f = &e->flights.v[e->flights.n]; /* built in place: the hot path */
	f->fk = fkey(nsm, nq, nsock, m->tag);
	f->vm = vm;
	f->tq = m->qset;
	f->tsock = m->sock_id;
	f->held = 0;
	f->opens = opens != NULL;
	if (opens) {
		f->o_vm = opens->o_vm;
		f->o_tq = opens->o_tq;
		f->o_tsock = opens->o_tsock;
		f->o_nsm = opens->o_nsm;
		f->o_nq = opens->o_nq;
		f->o_nsock = opens->o_nsock;
		map_put(&e->opening, skey(f->o_vm, f->o_tq, f->o_tsock), 1);
		nsock_ref(e, f->o_nsm, f->o_nsock);
	} else {
		f->o_vm = f->o_tq = f->o_nsm = f->o_nq = 0;
		f->o_tsock = f->o_nsock = 0;
	}
	f->req = *m;
	f->fwd = *fwd;
	f->fwd_nsm = nsm;
	f->fwd_q = nq;
	f->fwd_ring = nsm_ring_of(m->op);
	map_put(&e->fl, f->fk, e->flights.n++);
	e->inflight[vm]++;
	uint64_t payload = m->op == NK_OP_SEND ? m->size : 0;
	t->ctr.bytes_in += payload;
	struct grant *g = grant_of(e, vm, nsm);
	if (g && !g->ready) { /* CE-16: held until the NSM has mapped the tenant */
		f->held = 1;
		VEC_PUSH(g->held, f->fk);
	} else {
		emit(e, NK_KIND_NSM, nsm, nq, f->fwd_ring, fwd);
	}
}

/* _free_slice: the first of `slices` equal granule-aligned parts no NSM holds (CE-17, BUF-8). */
static int free_slice(const struct dev *t, uint32_t slices, uint64_t *off, uint64_t *size)
{
	const struct nk_geometry *g = &t->geo;
	uint64_t n = slices ? slices : 1;
	uint64_t recv_off = g->send_size, recv_size = g->data_size - g->send_size;
	uint64_t per = recv_size / n;
	if (per > U32)
		per = U32;
	per = per / g->buf_size * g->buf_size;
	if (!per)
		return 0;
	const struct nk_ledger *l = t->ledger;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t s = recv_off + i * per, end = s + per;
		int clash = 0;
		for (int k = 0; k < 256 && !clash; k++)
			clash = l->slice_size[k] && l->slice_off[k] < end &&
				s < l->slice_off[k] + l->slice_size[k];
		if (!clash) {
			*off = s;
			*size = per;
			return 1;
		}
	}
	return 0;
}

/* CE-15: the policy's NSM for tenant `vm`, or 0. */
static uint8_t pick_nsm(struct nk_engine *e, uint8_t vm)
{
	if (e->choice >= 0)
		return (uint8_t)(e->choice <= 255 ? e->choice : 0);
	uint8_t want = e->cfg.assign[vm];
	if (want && e->devs[NK_KIND_NSM][want])
		return want;
	int first = 0;
	for (int n = NK_ID_MIN; n <= NK_ID_MAX; n++) { /* first_nsm */
		if (!e->devs[NK_KIND_NSM][n])
			continue;
		if (map_get(&e->gr, pairkey(vm, (uint8_t)n)) != NONE)
			return (uint8_t)n;
		if (!first)
			first = n;
	}
	return (uint8_t)first;
}

/* SOCKET: pick the NSM, map the tenant into it if new, allocate its ID (CE-10, CE-15..17). */
static void open_socket(struct nk_engine *e, struct dev *t, uint8_t vm, const struct nk_nqe *m)
{
	if (m->sock_id == 0 || m->size)
		return refuse(e, t, NK_KIND_TENANT, vm, m, EINVAL);
	uint64_t tk = skey(vm, m->qset, m->sock_id);
	if (reserved_tkey(e, tk))
		return refuse(e, t, NK_KIND_TENANT, vm, m, EEXIST);
	if (!quota_ok(e, t, vm))
		return refuse(e, t, NK_KIND_TENANT, vm, m, ENOBUFS);
	uint8_t nsm = pick_nsm(e, vm);
	struct dev *n = nsm ? e->devs[NK_KIND_NSM][nsm] : NULL;
	if (!n)
		return refuse(e, t, NK_KIND_TENANT, vm, m, ENETDOWN);
	if (!grant_of(e, vm, nsm)) {
		uint64_t off, size;
		if (!free_slice(t, e->cfg.slices, &off, &size))
			return refuse(e, t, NK_KIND_TENANT, vm, m, ENOBUFS);
		t->ledger->slice_off[nsm] = off;
		t->ledger->slice_size[nsm] = size;
		struct grant g = {.vm = vm, .nsm = nsm, .ready = 0, .off = off, .size = size};
		map_put(&e->gr, pairkey(vm, nsm), e->grants.n);
		VEC_PUSH(e->grants, g);
		struct nk_nqe map = {.op = NK_OP_TENANT_MAP, .vm_id = vm, .op_data = vm,
				     .data_ptr = off, .size = (uint32_t)size, .tag = vm};
		emit(e, NK_KIND_NSM, nsm, 0, NK_RING_RECEIVE, &map);
	}
	uint8_t nq = (uint8_t)(m->qset % n->geo.n_qsets);
	uint32_t nsock = alloc_sock(e, nsm);
	struct nk_nqe fwd = *m;
	fwd.qset = nq;
	fwd.sock_id = nsock;
	fwd.data_ptr = 0;
	struct flight opens = {.opens = 1, .o_vm = vm, .o_tq = m->qset, .o_tsock = m->sock_id,
			       .o_nsm = nsm, .o_nq = nq, .o_nsock = nsock};
	forward(e, t, vm, nsm, nq, nsock, m, &fwd, &opens);
}

/* Op-specific argument checks the engine itself depends on (SEC-9); 0 if fine. */
static inline int argument_errno(uint8_t op, const struct nk_nqe *m)
{
	if (half_of(op) == H_NONE && m->size)
		return EINVAL;
	if (op == NK_OP_ACCEPT && ((m->op_data >> 33) || !(m->op_data & U32)))
		return EINVAL;
	if (op == NK_OP_SEND && ((m->op_data >> 32) & 0xFFFF) > m->size)
		return EINVAL;
	return 0;
}

/* A socket call from a tenant (CE-9..CE-15); checks in the order of SEC-9. */
static void tenant_call(struct nk_engine *e, struct dev *t, uint8_t vm, const struct nk_nqe *m)
{
	uint8_t op = m->op;
	if (m->size && half_of(op) == H_SEND && !in_send_half(&t->geo, m->data_ptr, m->size))
		return refuse(e, t, NK_KIND_TENANT, vm, m, EFAULT); /* NQE-14, SEC-3 */
	if (op == NK_OP_SOCKET)
		return open_socket(e, t, vm, m);
	uint32_t ci = map_get(&e->tab.fwd, skey(vm, m->qset, m->sock_id));
	if (ci == NONE) /* not one of this tenant's sockets (CE-9, SEC-1) */
		return refuse(e, t, NK_KIND_TENANT, vm, m, EBADF);
	struct conn c = e->tab.conns.v[ci];
	int err = argument_errno(op, m);
	if (err)
		return refuse(e, t, NK_KIND_TENANT, vm, m, err);
	uint32_t new_tsock = (uint32_t)m->op_data;
	if (op == NK_OP_ACCEPT && reserved_tkey(e, skey(vm, m->qset, new_tsock)))
		return refuse(e, t, NK_KIND_TENANT, vm, m, EEXIST);
	if (map_get(&e->fl, fkey(c.nsm, c.nq, c.nsock, m->tag)) != NONE) /* NQE-9 */
		return refuse(e, t, NK_KIND_TENANT, vm, m, EINVAL);
	if (op == NK_OP_SEND && m->size && spanset_overlaps(&t->ledger->sent, m->data_ptr, m->size))
		return refuse(e, t, NK_KIND_TENANT, vm, m, EINVAL); /* BUF-3: still lent */
	if (!quota_ok(e, t, vm))
		return refuse(e, t, NK_KIND_TENANT, vm, m, ENOBUFS);
	/* every check passed: from here on the step changes state (SEC-8) */
	if (op == NK_OP_SEND && m->size)
		spanset_add(&t->ledger->sent, m->data_ptr, m->size, c.nsm);
	struct nk_nqe fwd = *m;
	fwd.qset = c.nq;
	fwd.sock_id = c.nsock;
	if (!m->size)
		fwd.data_ptr = 0;
	if (op == NK_OP_ACCEPT) { /* the NSM sees an ID the engine chose (CE-10) */
		uint32_t nsock = alloc_sock(e, c.nsm);
		struct flight opens = {.opens = 1, .o_vm = vm, .o_tq = m->qset, .o_tsock = new_tsock,
				       .o_nsm = c.nsm, .o_nq = c.nq, .o_nsock = nsock};
		fwd.op_data = (m->op_data & ~U32) | nsock;
		return forward(e, t, vm, c.nsm, c.nq, c.nsock, m, &fwd, &opens);
	}
	forward(e, t, vm, c.nsm, c.nq, c.nsock, m, &fwd, NULL);
}

/* BUF_RETURN: a receive buffer goes back to the NSM that lent it (CE-14, BUF-5). */
static void buf_return(struct nk_engine *e, struct dev *t, uint8_t vm, const struct nk_nqe *m)
{
	if (m->size && !in_recv_half(&t->geo, m->data_ptr, m->size))
		return refuse(e, t, NK_KIND_TENANT, vm, m, EFAULT);
	if (m->sock_id != NK_SOCK_NONE) /* NQE-7: control ops name no socket */
		return refuse(e, t, NK_KIND_TENANT, vm, m, EINVAL);
	const struct span *s = spanset_at(&t->ledger->held, m->data_ptr);
	if (!s || s->size != m->size || m->size == 0)
		return refuse(e, t, NK_KIND_TENANT, vm, m, EINVAL);
	uint8_t nsm = s->nsm;
	spanset_remove(&t->ledger->held, m->data_ptr);
	struct nk_nqe r = *m;
	r.qset = (uint8_t)(m->qset % e->devs[NK_KIND_NSM][nsm]->geo.n_qsets);
	emit(e, NK_KIND_NSM, nsm, r.qset, NK_RING_RECEIVE, &r);
}

/* -- from an NSM (CE-7, CE-11, CE-12, CE-16, CE-18) -------------------------------------------- */

/* A reply or event naming nothing: stale after a detach, else the NSM's fault (CE-18). */
static void unmatched(struct nk_engine *e, struct dev *n, uint8_t nsm, const struct nk_nqe *m)
{
	drop(n, map_get(&e->drain, idkey(nsm, m->sock_id)) != NONE);
}

/* TENANT_MAP / TENANT_UNMAP answered (CE-16, CE-18). The tag is the VM ID. */
static void map_reply(struct nk_engine *e, struct dev *n, uint8_t nsm, const struct nk_nqe *m)
{
	if (m->tag > 255) {
		drop(n, 0);
		return;
	}
	uint8_t vm = (uint8_t)m->tag;
	int draining = map_get(&e->dpair, pairkey(nsm, vm)) != NONE;
	if ((m->op & ~NK_REPLY_BIT) == NK_OP_TENANT_UNMAP) {
		if (!draining)
			return drop(n, 0);
		return drain_end(e, nsm, vm);
	}
	struct grant *g = grant_of(e, vm, nsm);
	if (!g || g->ready)
		return drop(n, draining);
	if ((int64_t)m->op_data >= 0) {
		g->ready = 1;
		for (uint32_t i = 0; i < g->held.n; i++) {
			struct flight *f = flight_of(e, g->held.v[i]);
			if (!f)
				continue;
			f->held = 0;
			struct nk_out o = {NK_KIND_NSM, f->fwd_nsm, f->fwd_q, f->fwd_ring, f->fwd};
			VEC_PUSH(e->out, o);
			count_out(e, NK_KIND_NSM, f->fwd_nsm, 0); /* as the reference: no bytes */
		}
		g->held.n = 0;
		return;
	}
	/* the NSM could not map the tenant: its held requests fail with the NSM's errno */
	VEC(uint64_t) held;
	held.v = g->held.v;
	held.n = g->held.n;
	g->held.v = NULL;
	g->held.n = g->held.cap = 0;
	for (uint32_t i = 0; i < held.n; i++) { /* no longer held: flight_remove leaves lists alone */
		struct flight *f = flight_of(e, held.v[i]);
		if (f)
			f->held = 0;
	}
	grant_remove(e, vm, nsm);
	struct dev *t = dev_of(e, NK_KIND_TENANT, vm);
	if (t)
		ledger_drop_nsm(t->ledger, nsm);
	for (uint32_t i = 0; i < held.n; i++) {
		struct flight f;
		if (map_get(&e->fl, held.v[i]) == NONE)
			continue;
		flight_remove(e, held.v[i], &f);
		answer(e, &f, NK_OP_SOCKET | NK_REPLY_BIT, m->op_data);
	}
	free(held.v);
}

/* A reply from an NSM: back to the tenant that asked (CE-7, CE-11). */
static void nsm_reply(struct nk_engine *e, struct dev *n, uint8_t nsm, const struct nk_nqe *m)
{
	uint8_t rop = m->op & (uint8_t)~NK_REPLY_BIT;
	if (m->sock_id == NK_SOCK_NONE && (rop == NK_OP_TENANT_MAP || rop == NK_OP_TENANT_UNMAP))
		return map_reply(e, n, nsm, m);
	uint64_t fk = fkey(nsm, m->qset, m->sock_id, m->tag);
	struct flight *fp = flight_of(e, fk);
	if (!fp || (m->op != (fp->req.op | NK_REPLY_BIT) && m->op != NK_OP_UNKNOWN_REPLY))
		return unmatched(e, n, nsm, m);
	/* The reference forgets the flight first; every step below commutes with that, so
	 * the flight is read in place and forgotten last (no copy on the hot path). */
	const struct flight *f = fp;
	int ok = m->op == (f->req.op | NK_REPLY_BIT) && (int64_t)m->op_data >= 0;
	struct dev *t = dev_of(e, NK_KIND_TENANT, f->req.vm_id);
	if (f->req.op == NK_OP_SEND && f->req.size && t) /* BUF-3: settle */
		spanset_remove(&t->ledger->sent, f->req.data_ptr);
	if (f->opens && ok)
		conn_insert(e, f->o_vm, f->o_tq, f->o_tsock, f->o_nsm, f->o_nq, f->o_nsock);
	if (f->req.op == NK_OP_CLOSE) {
		uint32_t ci = map_get(&e->tab.fwd, skey(f->vm, f->tq, f->tsock));
		if (ci != NONE)
			conn_remove_at(e, ci);
	}
	answer(e, f, m->op, m->op_data);
	flight_remove(e, fk, NULL);
}

/* An event from an NSM: to the tenant socket it serves (CE-12, SEC-4). */
static void nsm_event(struct nk_engine *e, struct dev *n, uint8_t nsm, const struct nk_nqe *m)
{
	uint32_t ci = map_get(&e->tab.rev, skey(nsm, m->qset, m->sock_id));
	if (ci == NONE)
		return unmatched(e, n, nsm, m);
	struct conn c = e->tab.conns.v[ci];
	struct dev *t = e->devs[NK_KIND_TENANT][c.vm];
	if (m->op == NK_OP_EV_DATA) {
		if (m->op_data > m->size)
			return drop(n, 0); /* an address prefix longer than the buffer */
		struct nk_ledger *l = t->ledger;
		if (!l->slice_size[nsm] ||
		    !within(l->slice_off[nsm], l->slice_size[nsm], m->data_ptr, m->size) ||
		    m->size == 0 || spanset_overlaps(&l->held, m->data_ptr, m->size))
			return drop(n, 0); /* BUF-4, BUF-8 */
		spanset_add(&l->held, m->data_ptr, m->size, nsm);
	} else if (m->size) {
		return drop(n, 0); /* a buffer on an event that takes none */
	}
	struct nk_nqe ev = *m;
	ev.vm_id = c.vm;
	ev.qset = c.tq;
	ev.sock_id = c.tsock;
	if (!m->size)
		ev.data_ptr = 0;
	n->ctr.bytes_in += m->op == NK_OP_EV_DATA ? m->size : 0;
	emit(e, NK_KIND_TENANT, c.vm, c.tq, NK_RING_RECEIVE, &ev);
}

/* -- any device ------------------------------------------------------------------------------ */

/* An NQE the codec rejects: answer it if it may be answered (NQE-10, NQE-11, SEC-6). */
static void malformed(struct nk_engine *e, struct dev *d, uint8_t kind, uint8_t ident,
		      uint8_t qset, const struct nk_nqe *raw, int err)
{
	d->ctr.rejected++;
	uint8_t op = raw->op;
	if (op & NK_REPLY_BIT || (nk_op_is_known(op) && !nk_op_is_answerable(op)))
		return; /* a reply or an event: never answered */
	struct nk_nqe r = *raw;
	r.op = nk_op_is_answerable(op) ? (uint8_t)(op | NK_REPLY_BIT) : NK_OP_UNKNOWN_REPLY;
	r.op_data = (uint64_t)(int64_t)err;
	memset(r.reserved, 0, sizeof(r.reserved));
	r.vm_id = kind == NK_KIND_TENANT ? ident : 0; /* CE-8 */
	r.qset = qset;
	emit(e, kind, ident, qset, NK_RING_COMPLETION, &r);
}

int nk_engine_switch(struct nk_engine *e, uint8_t kind, uint8_t ident, uint8_t qset,
		     uint8_t ring, const struct nk_nqe *in)
{
	e->out.n = 0;
	struct dev *d = dev_of(e, kind, ident);
	if (!d)
		return 0; /* CE-24 */
	if ((ring != NK_RING_JOB && ring != NK_RING_SEND) || qset >= d->geo.n_qsets)
		return -EINVAL;
	struct nk_nqe m = *in;
	d->ctr.nqes_in++;
	d->ctr.ops[m.op]++;
	int err = nk_nqe_check(&m, NULL);
	if (err) {
		malformed(e, d, kind, ident, qset, &m, err);
		return (int)e->out.n;
	}
#ifndef NK_BROKEN_ENGINE_STAMP /* a deliberately broken build, for the fuzz test to catch */
	m.vm_id = kind == NK_KIND_TENANT ? ident : 0; /* CE-8, SEC-2: stamped */
#endif
	m.qset = qset;
	uint8_t op = m.op;
	if (op == NK_OP_ATTACH) { /* CE-20 */
		if (m.op_data >> 16)
			refuse(e, d, kind, ident, &m, EINVAL);
		else if (m.op_data != NK_ENGINE_NQE_VERSION)
			refuse(e, d, kind, ident, &m, EPROTO);
		else {
			struct nk_nqe r;
			reply_to(&r, &m, ident);
			emit(e, kind, ident, qset, NK_RING_COMPLETION, &r);
		}
	} else if (op == NK_OP_DETACH) { /* CE-21: answer, then detach */
		struct nk_nqe r;
		reply_to(&r, &m, 0);
		emit(e, kind, ident, qset, NK_RING_COMPLETION, &r);
		detach_dev(e, kind, ident);
	} else if (kind == NK_KIND_TENANT) {
		if (op >= NK_OP_SOCKET && op <= NK_OP_GETPEERNAME)
			tenant_call(e, d, ident, &m);
		else if (op == NK_OP_BUF_RETURN)
			buf_return(e, d, ident, &m);
		else /* SEC-10: events, replies, TENANT_MAP/UNMAP */
			refuse(e, d, kind, ident, &m, EPERM);
	} else {
		if (op & NK_REPLY_BIT)
			nsm_reply(e, d, ident, &m);
		else if (op >= NK_OP_EV_DATA && op <= NK_OP_EV_ACCEPTABLE)
			nsm_event(e, d, ident, &m);
		else /* SEC-10: calls, BUF_RETURN, TENANT_MAP/UNMAP */
			refuse(e, d, kind, ident, &m, EPERM);
	}
	return (int)e->out.n;
}

const struct nk_out *nk_engine_outputs(const struct nk_engine *e, uint32_t *n)
{
	if (n)
		*n = e->out.n;
	return e->out.v;
}

/* -- queries (CE-23) -------------------------------------------------------------------------- */

int nk_engine_counters(const struct nk_engine *e, uint8_t kind, uint8_t ident,
		       struct nk_counters *out)
{
	const struct dev *d = dev_of(e, kind, ident);
	if (!d)
		return -ENOENT;
	*out = d->ctr;
	return 0;
}

int nk_engine_open_sockets(const struct nk_engine *e, uint8_t kind, uint8_t ident)
{
	int n = 0;
	for (uint32_t i = 0; i < e->tab.conns.n; i++)
		n += kind == NK_KIND_TENANT ? e->tab.conns.v[i].vm == ident : e->tab.conns.v[i].nsm == ident;
	return n;
}

int nk_engine_geometry(const struct nk_engine *e, uint8_t kind, uint8_t ident,
		       struct nk_geometry *out)
{
	const struct dev *d = dev_of(e, kind, ident);
	if (!d)
		return -ENOENT;
	*out = d->geo;
	return 0;
}

uint32_t nk_engine_in_flight(const struct nk_engine *e)
{
	return e->flights.n;
}

uint32_t nk_engine_sockets(const struct nk_engine *e)
{
	return e->tab.conns.n;
}

uint32_t nk_engine_table(const struct nk_engine *e, struct nk_conn_info *out, uint32_t max)
{
	for (uint32_t i = 0; i < e->tab.conns.n && i < max; i++) {
		const struct conn *c = &e->tab.conns.v[i];
		out[i] = (struct nk_conn_info){c->vm, c->tq, c->nsm, c->nq, c->tsock, c->nsock};
	}
	return e->tab.conns.n;
}

uint32_t nk_engine_grants(const struct nk_engine *e, struct nk_grant_info *out, uint32_t max)
{
	for (uint32_t i = 0; i < e->grants.n && i < max; i++) {
		const struct grant *g = &e->grants.v[i];
		out[i] = (struct nk_grant_info){g->vm, g->nsm, g->ready, 0, g->held.n, g->off,
						g->size};
	}
	return e->grants.n;
}

int nk_engine_grant_held(const struct nk_engine *e, uint8_t vm, uint8_t nsm, uint64_t *out,
			 uint32_t max)
{
	uint32_t i = map_get(&e->gr, pairkey(vm, nsm));
	if (i == NONE)
		return -ENOENT;
	const struct grant *g = &e->grants.v[i];
	for (uint32_t j = 0; j < g->held.n && j < max; j++)
		out[j] = g->held.v[j];
	return (int)g->held.n;
}

uint32_t nk_engine_flights(const struct nk_engine *e, struct nk_flight_info *out, uint32_t max)
{
	for (uint32_t i = 0; i < e->flights.n && i < max; i++) {
		const struct flight *f = &e->flights.v[i];
		struct nk_flight_info *o = &out[i];
		memset(o, 0, sizeof(*o));
		o->nsm = (uint8_t)(f->fk >> 56);
		o->nqset = (uint8_t)(f->fk >> 48);
		o->nsock = (uint32_t)(f->fk >> 16);
		o->tag = (uint16_t)f->fk;
		o->vm = f->vm;
		o->tqset = f->tq;
		o->tsock = f->tsock;
		o->opens = f->opens;
		o->held = f->held;
		o->open_vm = f->o_vm;
		o->open_tqset = f->o_tq;
		o->open_tsock = f->o_tsock;
		o->open_nsm = f->o_nsm;
		o->open_nqset = f->o_nq;
		o->open_nsock = f->o_nsock;
		o->request = f->req;
		o->fwd = f->fwd;
		o->fwd_qset = f->fwd_q;
		o->fwd_ring = f->fwd_ring;
	}
	return e->flights.n;
}

uint32_t nk_engine_draining(const struct nk_engine *e, struct nk_drain_info *out, uint32_t max)
{
	uint32_t n = 0;
	for (uint32_t i = 0; i <= e->dpair.mask; i++)
		if (e->dpair.vals[i] != NONE) {
			if (n < max)
				out[n] = (struct nk_drain_info){(uint8_t)(e->dpair.keys[i] >> 8),
								(uint8_t)e->dpair.keys[i], {0}, 0};
			n++;
		}
	for (uint32_t i = 0; i <= e->drain.mask; i++)
		if (e->drain.vals[i] != NONE) {
			if (n < max)
				out[n] = (struct nk_drain_info){(uint8_t)(e->drain.keys[i] >> 32),
								(uint8_t)e->drain.vals[i], {0},
								(uint32_t)e->drain.keys[i]};
			n++;
		}
	return n;
}

static int ledger_list(const struct nk_ledger *l, int part, struct nk_span_info *out,
		       uint32_t max);

int nk_engine_ledger(const struct nk_engine *e, uint8_t vm, int part, struct nk_span_info *out,
		     uint32_t max)
{
	const struct dev *t = dev_of(e, NK_KIND_TENANT, vm);
	if (!t)
		return -ENOENT;
	return ledger_list(t->ledger, part, out, max);
}

uint32_t nk_engine_next_sock(const struct nk_engine *e, uint8_t nsm)
{
	return e->next_sock[nsm];
}

/* -- the ledger on its own (reference bufpool.Ledger), for the bufpool role --------------------- */

struct nk_ledger *nk_ledger_new(const struct nk_geometry *g)
{
	uint32_t b = g->buf_size;
	if (b == 0 || (b & (b - 1)) || g->send_size > g->data_size)
		return NULL;
	return ledger_new(g);
}

void nk_ledger_free(struct nk_ledger *l)
{
	ledger_free(l);
}

struct nk_ledger *nk_ledger_clone(const struct nk_ledger *l)
{
	return ledger_clone(l);
}

/* TENANT_MAP (BUF-8): EFAULT outside the receive half; EINVAL off granules, for an NSM
 * that has a slice, or overlapping another NSM's. */
int nk_ledger_grant(struct nk_ledger *l, uint8_t nsm, uint64_t off, uint64_t size)
{
	const struct nk_geometry *g = &l->geo;
	if (size == 0 || !in_recv_half(g, off, size))
		return -EFAULT;
	if (off % g->buf_size || size % g->buf_size || l->slice_size[nsm])
		return -EINVAL;
	for (int k = 0; k < 256; k++)
		if (l->slice_size[k] && l->slice_off[k] < off + size &&
		    off < l->slice_off[k] + l->slice_size[k])
			return -EINVAL;
	l->slice_off[nsm] = off;
	l->slice_size[nsm] = size;
	return 0;
}

/* SEND lends its buffer (BUF-3): EFAULT outside the send half, EINVAL over a lent one. */
int nk_ledger_lend_send(struct nk_ledger *l, uint64_t off, uint64_t size)
{
	if (size == 0)
		return 0;
	if (!in_send_half(&l->geo, off, size))
		return -EFAULT;
	if (spanset_overlaps(&l->sent, off, size))
		return -EINVAL;
	spanset_add(&l->sent, off, size, 0);
	return 0;
}

/* The SEND's reply gives it back (BUF-3): EINVAL unless exactly that buffer is lent. */
int nk_ledger_settle_send(struct nk_ledger *l, uint64_t off, uint64_t size)
{
	if (size == 0)
		return 0;
	const struct span *s = spanset_at(&l->sent, off);
	if (!s || s->size != size)
		return -EINVAL;
	spanset_remove(&l->sent, off);
	return 0;
}

/* EV_DATA lends a receive buffer to the tenant (BUF-4, BUF-8). */
int nk_ledger_lend_receive(struct nk_ledger *l, uint8_t nsm, uint64_t off, uint64_t size)
{
	if (!l->slice_size[nsm] || !within(l->slice_off[nsm], l->slice_size[nsm], off, size))
		return -EFAULT;
	if (size == 0 || spanset_overlaps(&l->held, off, size))
		return -EINVAL;
	spanset_add(&l->held, off, size, nsm);
	return 0;
}

/* BUF_RETURN (BUF-5): the NSM to forward it to, or -EFAULT / -EINVAL. */
int nk_ledger_return_receive(struct nk_ledger *l, uint64_t off, uint64_t size)
{
	if (size && !in_recv_half(&l->geo, off, size))
		return -EFAULT;
	const struct span *s = spanset_at(&l->held, off);
	if (!s || s->size != size || size == 0)
		return -EINVAL;
	int nsm = s->nsm;
	spanset_remove(&l->held, off);
	return nsm;
}

static int ledger_list(const struct nk_ledger *l, int part, struct nk_span_info *out, uint32_t max)
{
	uint32_t n = 0;
	if (part == NK_LEDGER_SLICES) {
		for (int k = 0; k < 256; k++)
			if (l->slice_size[k]) {
				if (n < max)
					out[n] = (struct nk_span_info){l->slice_off[k], l->slice_size[k],
								       (uint8_t)k, {0}};
				n++;
			}
		return (int)n;
	}
	const struct spanset *ss = part == NK_LEDGER_SENT ? &l->sent : &l->held;
	for (uint32_t i = 0; i < ss->s.n; i++, n++)
		if (n < max)
			out[n] = (struct nk_span_info){ss->s.v[i].off, ss->s.v[i].size,
						       ss->s.v[i].nsm, {0}};
	return (int)n;
}

int nk_ledger_list(const struct nk_ledger *l, int part, struct nk_span_info *out, uint32_t max)
{
	return ledger_list(l, part, out, max);
}

/* -- the connection table on its own, for the conntable role (CE-1..CE-6) ------------------------ */

struct nk_table *nk_table_new(void)
{
	struct nk_table *t = malloc(sizeof(*t));
	if (!t)
		return NULL;
	table_init(t);
	return t;
}

void nk_table_free(struct nk_table *t)
{
	if (t) {
		table_free(t);
		free(t);
	}
}

struct nk_table *nk_table_clone(const struct nk_table *src)
{
	struct nk_table *t = xrealloc(NULL, sizeof(*t));
	table_clone(t, src);
	return t;
}

static inline int valid_key(uint32_t owner, uint32_t qset, uint64_t sock) /* CE-2 */
{
	return owner >= NK_ID_MIN && owner <= NK_ID_MAX && qset <= 254 && sock >= 1 && sock <= U32;
}

int nk_table_insert(struct nk_table *t, const struct nk_conn_info *c)
{
	if (!valid_key(c->vm, c->tqset, c->tsock) || !valid_key(c->nsm, c->nqset, c->nsock))
		return -EINVAL;
	struct conn k = {c->vm, c->tqset, c->nsm, c->nqset, c->tsock, c->nsock};
	return table_insert(t, &k);
}

int nk_table_remove_tenant(struct nk_table *t, uint8_t vm, uint8_t qset, uint32_t sock)
{
	uint32_t i = map_get(&t->fwd, skey(vm, qset, sock));
	if (i == NONE)
		return 0;
	table_remove_at(t, i);
	return 1;
}

int nk_table_lookup(const struct nk_table *t, int nsm_side, uint8_t owner, uint8_t qset,
		    uint32_t sock, struct nk_conn_info *out)
{
	uint32_t i = map_get(nsm_side ? &t->rev : &t->fwd, skey(owner, qset, sock));
	if (i == NONE)
		return 0;
	const struct conn *c = &t->conns.v[i];
	*out = (struct nk_conn_info){c->vm, c->tq, c->nsm, c->nq, c->tsock, c->nsock};
	return 1;
}

uint32_t nk_table_list(const struct nk_table *t, struct nk_conn_info *out, uint32_t max)
{
	for (uint32_t i = 0; i < t->conns.n && i < max; i++) {
		const struct conn *c = &t->conns.v[i];
		out[i] = (struct nk_conn_info){c->vm, c->tq, c->nsm, c->nq, c->tsock, c->nsock};
	}
	return t->conns.n;
}

/* CE-6: remove every entry of tenant `id` (nsm_side 0) or of NSM `id` (nsm_side 1). */
uint32_t nk_table_detach(struct nk_table *t, int nsm_side, uint8_t id)
{
	uint32_t gone = 0;
	for (uint32_t i = t->conns.n; i-- > 0;)
		if ((nsm_side ? t->conns.v[i].nsm : t->conns.v[i].vm) == id) {
			table_remove_at(t, i);
			gone++;
		}
	return gone;
}
