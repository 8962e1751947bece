/* The CoreEngine's switching core (spec/coreengine.md CE-*, spec/security.md SEC-*).
 *
 * A C port of reference/engine.py: the connection table, VM ID stamping, the
 * outcome of every malformed input, buffer ownership (the ledger), NSM
 * selection, detach cleanup and the counters. It does no I/O: the caller
 * (the CoreEngine process, fastpath/csrc/ce.c) reads an NQE from a ring,
 * calls nk_engine_switch() and writes nk_engine_outputs() to the rings they
 * name, in order.
 *
 * The engine is not thread safe: one engine, one thread. Everything a call
 * produces is valid until the next call on the same engine.
 */
#ifndef NK_ENGINE_H
#define NK_ENGINE_H

#include <stdint.h>

#include "device.h"
#include "nqe.h"

#define NK_ENGINE_NQE_VERSION 1 /* CE-20: the version an ATTACH must speak */
#define NK_ID_MIN 1             /* CE-2: VM IDs and NSM IDs are 1..254 */
#define NK_ID_MAX 254

struct nk_engine;

struct nk_engine_config {
	uint32_t slices;       /* CE-17: NSMs that may share one tenant's receive half (0: 1) */
	uint32_t max_inflight; /* SEC-5: 0: the tenant's n_qsets * ring_entries */
	uint8_t assign[256];   /* CE-15: vm -> nsm; 0: none (first_nsm) */
};

/* One NQE to write: ring `ring` of queue set `qset` of device (kind, ident) (DEV-8). */
struct nk_out {
	uint8_t kind, ident, qset, ring;
	struct nk_nqe nqe;
};
_Static_assert(sizeof(struct nk_out) == 36, "nk_out is 36 bytes, no padding");

/* What one device did (CE-23); ops[] counts NQEs read from it by op byte. */
struct nk_counters {
	uint64_t nqes_in, nqes_out, bytes_in, bytes_out, rejected, stale;
	uint64_t ops[256];
};

/* Listings (status, tests): one connection-table entry (CE-1). */
struct nk_conn_info {
	uint8_t vm, tqset, nsm, nqset;
	uint32_t tsock, nsock;
};

/* A grant: NSM `nsm` serves tenant `vm` from its receive slice (CE-16, CE-17). */
struct nk_grant_info {
	uint8_t vm, nsm, ready, pad;
	uint32_t held; /* SOCKET requests waiting for the TENANT_MAP reply */
	uint64_t offset, size;
};

/* A request in flight (CE-11). */
struct nk_flight_info {
	uint8_t nsm, nqset, vm, tqset;
	uint32_t nsock, tsock;
	uint16_t tag;
	uint8_t opens, held;
	uint8_t open_vm, open_tqset, open_nsm, open_nqset;
	uint32_t open_tsock, open_nsock;
	struct nk_nqe request; /* as the tenant sent it, stamped */
	struct nk_nqe fwd;     /* what the NSM gets (or will get) */
	uint8_t fwd_qset, fwd_ring, pad[2];
};

/* A buffer span of a ledger (BUF-3..BUF-8); `nsm` is the owner (slices, held). */
struct nk_span_info {
	uint64_t offset, size;
	uint8_t nsm, pad[7];
};

/* A draining socket ID: NSM socket `sock` of tenant `vm`, until TENANT_UNMAP (CE-18);
 * sock 0 lists the (nsm, vm) pair itself. */
struct nk_drain_info {
	uint8_t nsm, vm, pad[2];
	uint32_t sock;
};

enum nk_ledger_part { NK_LEDGER_SLICES = 0, NK_LEDGER_SENT = 1, NK_LEDGER_HELD = 2 };

struct nk_engine *nk_engine_new(const struct nk_engine_config *cfg);
void nk_engine_free(struct nk_engine *e);
struct nk_engine *nk_engine_clone(const struct nk_engine *e);

/* CE-22: ident, or -EEXIST (taken or draining) / -ENOSPC (none free) / -EINVAL. */
int nk_engine_attach(struct nk_engine *e, const struct nk_geometry *geo, int ident);
/* CE-18, CE-19: number of outputs (0 if not attached). */
int nk_engine_detach(struct nk_engine *e, uint8_t kind, uint8_t ident);
/* CE-8: number of outputs, or -EINVAL for a caller bug (a ring the engine does not read,
 * a queue set the device lacks). An NQE of an unattached device is discarded (CE-24). */
int nk_engine_switch(struct nk_engine *e, uint8_t kind, uint8_t ident, uint8_t qset,
		     uint8_t ring, const struct nk_nqe *in);
const struct nk_out *nk_engine_outputs(const struct nk_engine *e, uint32_t *n);

int nk_engine_counters(const struct nk_engine *e, uint8_t kind, uint8_t ident,
		       struct nk_counters *out);
int nk_engine_open_sockets(const struct nk_engine *e, uint8_t kind, uint8_t ident);

/* Configuration beyond nk_engine_config, for the Python role. */
void nk_engine_set_max_inflight(struct nk_engine *e, int64_t limit); /* < 0: the default */
/* The policy's answer for the next SOCKET: -1 the configured policy; 0 no NSM; else that NSM. */
void nk_engine_set_policy_choice(struct nk_engine *e, int nsm);

/* Status and listings; each returns the count and fills at most `max` entries. */
int nk_engine_geometry(const struct nk_engine *e, uint8_t kind, uint8_t ident,
		       struct nk_geometry *out); /* 0, or -ENOENT */
uint32_t nk_engine_in_flight(const struct nk_engine *e);
uint32_t nk_engine_sockets(const struct nk_engine *e);
uint32_t nk_engine_table(const struct nk_engine *e, struct nk_conn_info *out, uint32_t max);
uint32_t nk_engine_grants(const struct nk_engine *e, struct nk_grant_info *out, uint32_t max);
/* The flight keys a grant holds, in order: nsm<<56 | qset<<48 | sock<<16 | tag. */
int nk_engine_grant_held(const struct nk_engine *e, uint8_t vm, uint8_t nsm, uint64_t *out,
			 uint32_t max); /* count, or -ENOENT */
uint32_t nk_engine_flights(const struct nk_engine *e, struct nk_flight_info *out, uint32_t max);
uint32_t nk_engine_draining(const struct nk_engine *e, struct nk_drain_info *out, uint32_t max);
int nk_engine_ledger(const struct nk_engine *e, uint8_t vm, int part, struct nk_span_info *out,
		     uint32_t max); /* count, or -ENOENT */
uint32_t nk_engine_next_sock(const struct nk_engine *e, uint8_t nsm); /* 0: never allocated */

/* The ledger on its own (reference bufpool.Ledger: BUF-3..BUF-5, BUF-8); 0 or -errno. */
struct nk_ledger;
struct nk_ledger *nk_ledger_new(const struct nk_geometry *g); /* NULL: bad geometry */
void nk_ledger_free(struct nk_ledger *l);
struct nk_ledger *nk_ledger_clone(const struct nk_ledger *l);
int nk_ledger_grant(struct nk_ledger *l, uint8_t nsm, uint64_t off, uint64_t size);
int nk_ledger_lend_send(struct nk_ledger *l, uint64_t off, uint64_t size);
int nk_ledger_settle_send(struct nk_ledger *l, uint64_t off, uint64_t size);
int nk_ledger_lend_receive(struct nk_ledger *l, uint8_t nsm, uint64_t off, uint64_t size);
int nk_ledger_return_receive(struct nk_ledger *l, uint64_t off, uint64_t size); /* nsm */
int nk_ledger_list(const struct nk_ledger *l, int part, struct nk_span_info *out, uint32_t max);

/* The connection table on its own (reference conntable: CE-1..CE-6). insert: 0, -EINVAL for
 * a malformed key (CE-2), -EEXIST for a tenant key in use, -EADDRINUSE for an NSM key in use. */
struct nk_table;
struct nk_table *nk_table_new(void);
void nk_table_free(struct nk_table *t);
struct nk_table *nk_table_clone(const struct nk_table *t);
int nk_table_insert(struct nk_table *t, const struct nk_conn_info *c);
int nk_table_remove_tenant(struct nk_table *t, uint8_t vm, uint8_t qset, uint32_t sock);
int nk_table_lookup(const struct nk_table *t, int nsm_side, uint8_t owner, uint8_t qset,
		    uint32_t sock, struct nk_conn_info *out); /* 1 found, 0 not */
uint32_t nk_table_list(const struct nk_table *t, struct nk_conn_info *out, uint32_t max);
uint32_t nk_table_detach(struct nk_table *t, int nsm_side, uint8_t id); /* entries removed */

#endif
