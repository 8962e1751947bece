/* libFuzzer target: bytes -> a sequence of attaches, detaches and NQEs fed to the engine.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude fuzz/fuzz_engine.c engine.c
 *   ./a.out fuzz/corpus/engine
 *
 * Input: byte 0 configures (slices, max_inflight, assign); then commands:
 *   0x00-0x1F  attach: bit 0 kind (tenant/NSM), bits 1-2 geometry, ident = next byte % 6 - 1
 *   0x20-0x2F  detach (kind, ident) from the low bits
 *   0x30-0x3F  an NSM answers output #k of the last step (its reply, result from next byte)
 *   0x40-0xFF  switch: kind, ident, qset, ring from the command and next byte, then 32 bytes
 * Invariants checked after every step (abort on violation):
 *   - switch fails only for a ring the engine does not read or a queue set the device lacks;
 *   - every output goes to a device-bound ring (COMPLETION, RECEIVE) of a queue set the
 *     destination has, of an attached device (or the device a DETACH just removed);
 *   - every output has a known op and zero reserved bytes (NQE-4);
 *   - an output to a tenant carries that tenant's VM ID (CE-8, SEC-2);
 *   - an NQE counted as rejected or stale changes neither the connection table, nor the
 *     flights, grants or drains (SEC-8).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nk/engine.h"

#define FAIL(...)                                                                         \
	do {                                                                              \
		fprintf(stderr, "fuzz_engine: " __VA_ARGS__);                             \
		fprintf(stderr, "\n");                                                    \
		abort();                                                                  \
	} while (0)

static const struct nk_geometry GEOS[2][4] = {
	{{2, 4, 64 << 10, 32 << 10, 4096, NK_KIND_TENANT},
	 {1, 2, 64 << 10, 16 << 10, 4096, NK_KIND_TENANT},
	 {3, 8, 1 << 20, 512 << 10, 64, NK_KIND_TENANT},
	 {1, 2, 8192, 4096, 4096, NK_KIND_TENANT}},
	{{1, 8, 8 << 10, 4 << 10, 4096, NK_KIND_NSM},
	 {2, 8, 8 << 10, 4 << 10, 4096, NK_KIND_NSM},
	 {3, 2, 8 << 10, 4 << 10, 4096, NK_KIND_NSM},
	 {1, 2, 8 << 10, 4 << 10, 4096, NK_KIND_NSM}},
};

struct digest {
	uint32_t n;
	uint8_t *bytes;
};

static int cmp_bytes(const void *a, const void *b, size_t size)
{
	return memcmp(a, b, size);
}

static int cmp_conn(const void *a, const void *b) { return cmp_bytes(a, b, sizeof(struct nk_conn_info)); }
static int cmp_grant(const void *a, const void *b) { return cmp_bytes(a, b, sizeof(struct nk_grant_info)); }
static int cmp_flight(const void *a, const void *b) { return cmp_bytes(a, b, sizeof(struct nk_flight_info)); }
static int cmp_drain(const void *a, const void *b) { return cmp_bytes(a, b, sizeof(struct nk_drain_info)); }

/* The state SEC-8 protects, as sorted bytes: table, flights, grants, drains. */
static size_t state_of(const struct nk_engine *e, uint8_t **out)
{
	uint32_t nc = nk_engine_table(e, NULL, 0), nf = nk_engine_flights(e, NULL, 0);
	uint32_t ng = nk_engine_grants(e, NULL, 0), nd = nk_engine_draining(e, NULL, 0);
	size_t size = nc * sizeof(struct nk_conn_info) + nf * sizeof(struct nk_flight_info) +
		      ng * sizeof(struct nk_grant_info) + nd * sizeof(struct nk_drain_info) + 16;
	uint8_t *buf = calloc(1, size), *p = buf + 16;
	memcpy(buf, &nc, 4);
	memcpy(buf + 4, &nf, 4);
	memcpy(buf + 8, &ng, 4);
	memcpy(buf + 12, &nd, 4);
	struct nk_conn_info *c = (void *)p;
	nk_engine_table(e, c, nc);
	qsort(c, nc, sizeof(*c), cmp_conn);
	p += nc * sizeof(*c);
	struct nk_flight_info *f = malloc((nf ? nf : 1) * sizeof(*f));
	nk_engine_flights(e, f, nf);
	qsort(f, nf, sizeof(*f), cmp_flight);
	memcpy(p, f, nf * sizeof(*f));
	free(f);
	p += nf * sizeof(struct nk_flight_info);
	struct nk_grant_info *g = malloc((ng ? ng : 1) * sizeof(*g));
	nk_engine_grants(e, g, ng);
	qsort(g, ng, sizeof(*g), cmp_grant);
	memcpy(p, g, ng * sizeof(*g));
	free(g);
	p += ng * sizeof(struct nk_grant_info);
	struct nk_drain_info *d = malloc((nd ? nd : 1) * sizeof(*d));
	nk_engine_draining(e, d, nd);
	qsort(d, nd, sizeof(*d), cmp_drain);
	memcpy(p, d, nd * sizeof(*d));
	free(d);
	*out = buf;
	return size;
}

static void check_outputs(const struct nk_engine *e, int n, uint8_t gone_kind, uint8_t gone_id)
{
	uint32_t count;
	const struct nk_out *o = nk_engine_outputs(e, &count);
	if (n < 0 || (uint32_t)n != count)
		FAIL("returned %d, %u outputs", n, count);
	for (uint32_t i = 0; i < count; i++) {
		struct nk_geometry g;
		int attached = nk_engine_geometry(e, o[i].kind, o[i].ident, &g) == 0;
		if (!attached && !(o[i].kind == gone_kind && o[i].ident == gone_id))
			FAIL("output %u to unattached device %u/%u", i, o[i].kind, o[i].ident);
		if (o[i].ring != NK_RING_COMPLETION && o[i].ring != NK_RING_RECEIVE)
			FAIL("output %u to ring %u", i, o[i].ring);
		if (attached && o[i].qset >= g.n_qsets)
			FAIL("output %u to queue set %u of %u", i, o[i].qset, g.n_qsets);
		if (nk_nqe_check(&o[i].nqe, NULL))
			FAIL("output %u is malformed (op %#x)", i, o[i].nqe.op);
		if (o[i].kind == NK_KIND_TENANT && o[i].nqe.vm_id != o[i].ident)
			FAIL("output %u to tenant %u carries VM ID %u", i, o[i].ident, o[i].nqe.vm_id);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	struct nk_engine_config cfg = {.slices = 1 + (data[0] & 3),
				       .max_inflight = (data[0] >> 2) & 3};
	if (data[0] & 0x10)
		cfg.assign[1] = 2;
	struct nk_engine *e = nk_engine_new(&cfg);
	struct nk_out last[8];
	uint32_t nlast = 0;
	size_t i = 1;
	while (i < size) {
		uint8_t cmd = data[i++];
		uint8_t arg = i < size ? data[i++] : 0;
		if (cmd < 0x20) {
			int ident = arg % 6 - 1;
			int r = nk_engine_attach(e, &GEOS[cmd & 1][(cmd >> 1) & 3], ident);
			if (r < 0 && r != -EEXIST && r != -ENOSPC && r != -EINVAL)
				FAIL("attach returned %d", r);
			nlast = 0;
			continue;
		}
		uint8_t kind = NK_KIND_TENANT, ident = 1, qset = 0, ring = NK_RING_JOB;
		struct nk_nqe n;
		if (cmd < 0x30) {
			kind = (cmd & 1) ? NK_KIND_NSM : NK_KIND_TENANT;
			int r = nk_engine_detach(e, kind, (uint8_t)(1 + (cmd >> 1) % 4));
			check_outputs(e, r, 0, 0);
		} else {
			if (cmd < 0x40) {
				if (!nlast)
					continue;
				const struct nk_out *o = &last[(cmd & 0xF) % nlast];
				if (o->kind != NK_KIND_NSM)
					continue;
				n = o->nqe;
				n.op |= NK_REPLY_BIT;
				n.op_data = (uint64_t)(int64_t)(int8_t)arg;
				kind = NK_KIND_NSM;
				ident = o->ident;
				qset = o->qset;
			} else {
				if (i + sizeof(n) > size)
					break;
				memcpy(&n, data + i, sizeof(n));
				i += sizeof(n);
				kind = (cmd & 1) ? NK_KIND_NSM : NK_KIND_TENANT;
				ident = (uint8_t)(1 + ((cmd >> 1) & 3));
				qset = (uint8_t)((cmd >> 3) & 3);
				ring = (arg & 1) ? NK_RING_SEND : NK_RING_JOB;
				if (arg & 0x80)
					ring = NK_RING_COMPLETION;
			}
			struct nk_geometry g;
			int attached = nk_engine_geometry(e, kind, ident, &g) == 0;
			struct nk_counters before = {0}, after = {0};
			nk_engine_counters(e, kind, ident, &before);
			uint8_t *s0;
			size_t l0 = state_of(e, &s0);
			int r = nk_engine_switch(e, kind, ident, qset, ring, &n);
			int caller_bug = attached && (ring == NK_RING_COMPLETION || qset >= g.n_qsets);
			if ((r == -EINVAL) != caller_bug || (r < 0 && r != -EINVAL))
				FAIL("switch returned %d (caller bug: %d)", r, caller_bug);
			if (r >= 0) {
				check_outputs(e, r, kind, ident);
				if (nk_engine_counters(e, kind, ident, &after) == 0 &&
				    after.rejected + after.stale > before.rejected + before.stale) {
					uint8_t *s1;
					size_t l1 = state_of(e, &s1);
					if (l0 != l1 || memcmp(s0, s1, l0))
						FAIL("a refused NQE (op %#x) changed the state", n.op);
					free(s1);
				}
			}
			free(s0);
		}
		uint32_t count;
		const struct nk_out *o = nk_engine_outputs(e, &count);
		nlast = count < 8 ? count : 8;
		if (nlast)
			memcpy(last, o, nlast * sizeof(*o));
	}
	nk_engine_free(e);
	return 0;
}
