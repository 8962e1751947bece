/* The running CoreEngine's switching loop (spec/coreengine.md, spec/device.md RING-*).
 *
 * struct nk_ce holds a switching core (struct nk_engine, engine.h) and the
 * mappings of the attached devices. nk_ce_poll() makes one pass over every
 * device: it pops a batch from each to-engine ring (JOB, SEND; DEV-8),
 * switches every NQE, queues the engine's outputs behind anything already
 * waiting for the same destination ring (RING-4: nothing overtakes, nothing is
 * dropped) and pushes them in batches (RING-8), ringing a device's bell only
 * when its consumer asked for it (RING-6). nk_ce_run() loops poll and sleeps
 * on every ENGINE bell plus a control word when idle.
 *
 * Threads: one thread runs nk_ce_poll/nk_ce_run; every other call (add,
 * remove, status) is made by whoever holds the right to it between runs (the
 * Python control plane takes that right by ringing nk_ce_interrupt and
 * waiting for nk_ce_run to return). Only nk_ce_interrupt may be called
 * concurrently with a run.
 *
 * This mirrors reference/coreengine.py: the same batch size, the same
 * "source held while its outputs wait" rule, the same TENANT_BACKLOG
 * exception for NSM-to-tenant outputs, the same detach of a device whose
 * ring indices are impossible (RING-10).
 */
#ifndef NK_CE_H
#define NK_CE_H

#include <stdint.h>

#include "device.h"
#include "engine.h"
#include "nqe.h"
#include "ring.h"

#define NK_CE_BATCH 64                 /* NQEs taken from one ring per visit (RING-8) */
#define NK_CE_SPIN 16                  /* empty passes before the loop sleeps */
#define NK_CE_TENANT_BACKLOG (1u << 16) /* NSM outputs a slow tenant may hold (SEC-5) */
#define NK_CE_BLOCKED_SLEEP_NS 1000000LL /* while outputs wait for room */
#define NK_CE_MAX_DEVICES 508          /* 254 tenants + 254 NSMs (CE-22) */

/* Why nk_ce_run returned. */
enum nk_ce_why {
	NK_CE_TIMEOUT = 0,   /* its time was up */
	NK_CE_INTERRUPT = 1, /* nk_ce_interrupt was called */
	NK_CE_BROKEN = 2,    /* a device broke its ring: detach it (nk_ce_broken) */
};

/* The loop's own counters, the reference's CoreEngine.loop. */
struct nk_ce_stats {
	uint64_t busy_passes; /* passes that moved NQEs */
	uint64_t sleeps;      /* futex_waitv calls */
	uint64_t wakeups;     /* ... that a bell ended */
	uint64_t timeouts;    /* ... that their time ended */
	uint64_t switched;    /* NQEs read and handed to the engine */
	uint64_t delivered;   /* NQEs written to destination rings */
	uint64_t bells;       /* device bells rung */
};

struct nk_ce;

struct nk_ce *nk_ce_new(const struct nk_engine_config *cfg);
void nk_ce_free(struct nk_ce *ce);
struct nk_engine *nk_ce_engine(struct nk_ce *ce);

/* Attach a device to the engine (CE-22) and start polling it. `base` is the
 * device's mapping, geo its geometry (geo->kind says tenant or NSM). Returns
 * 0, -EEXIST (ID in use or draining), -EINVAL, -ENOMEM. */
int nk_ce_add_device(struct nk_ce *ce, const struct nk_geometry *geo, int ident, void *base);
/* VM-2: the device's bells wake nobody here (a guest's BAR): while it is attached every
 * sleep of nk_ce_run is bounded, 50 us after work doubling to 1 ms. Our own flag, set by
 * whoever attached it, never read from the device (VM-5). 0 or -ENOENT. */
int nk_ce_set_polled(struct nk_ce *ce, int kind, int ident, int polled);
/* Detach a device: the engine's cleanup (CE-18, CE-19) is routed to the
 * other devices; its queued outputs are dropped, and sources held for it are
 * released. The caller unmaps it afterwards. Returns 0 or -ENOENT. */
int nk_ce_remove_device(struct nk_ce *ce, int kind, int ident);

/* One pass over every device. Returns NQEs moved (read + written). */
int64_t nk_ce_poll(struct nk_ce *ce);
/* Poll until timeout_ns has passed (sleeping when idle), nk_ce_interrupt, or a
 * broken device. Returns an nk_ce_why. */
int nk_ce_run(struct nk_ce *ce, int64_t timeout_ns);
/* From any thread: make the current (or next) nk_ce_run return NK_CE_INTERRUPT. */
void nk_ce_interrupt(struct nk_ce *ce);

/* Devices whose rings are broken, as (kind, ident) pairs; returns how many. */
int nk_ce_broken(struct nk_ce *ce, uint8_t *kinds, uint8_t *idents, int max);
/* NQEs waiting in backlogs, and sources stopped until they leave. */
uint64_t nk_ce_pending(const struct nk_ce *ce);
uint32_t nk_ce_blocked_sources(const struct nk_ce *ce);
void nk_ce_get_stats(const struct nk_ce *ce, struct nk_ce_stats *out);

/* Benchmark harness (ce_bench.c, bench/coreengine.py): one thread plays the
 * tenant and the NSM of one open socket around nk_ce_poll. */
struct nk_ce_bench {
	void *tenant_base;
	struct nk_geometry tenant_geo;
	void *nsm_base;
	struct nk_geometry nsm_geo;
	uint32_t sock_id; /* the tenant's, already open */
	uint32_t window;  /* SENDs in flight, each with its own tag and buffer */
	uint64_t sends;   /* round trips to make */
	int64_t elapsed_ns; /* out: the whole run */
	int64_t polling_ns; /* out: inside nk_ce_poll */
};
/* NQEs switched (2 per SEND), or -errno if a side saw something unexpected. */
int64_t nk_ce_bench_sends(struct nk_ce *ce, struct nk_ce_bench *b);

#endif
