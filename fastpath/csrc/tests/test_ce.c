/* The switching loop without Python (make test: ASan + UBSan).
 *
 * One tenant and no NSM: every SOCKET is answered -ENETDOWN by the engine
 * itself (CE-15), on the tenant's COMPLETION ring. With rings of 4, a second
 * batch of 4 finds that ring full: the answers wait in order and the JOB ring
 * is not read until they leave (RING-4). Then: a corrupt index is reported
 * (RING-10), nk_ce_interrupt ends a run, an idle run times out. A POLLED device
 * (spec/vm.md VM-2) whose producer bumps the bell without FUTEX_WAKE, as a guest does,
 * is answered within the bounded sleep, not at the end of the run.
 */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nk/bell.h"
#include "nk/ce.h"

#define ENTRIES 4

static struct nk_geometry tenant_geo(void)
{
	struct nk_geometry g = { .n_qsets = 1, .ring_entries = ENTRIES, .data_size = 64 << 10,
				 .send_size = 32 << 10, .buf_size = 4 << 10, .kind = NK_KIND_TENANT };
	return g;
}

static void ring_of(struct nk_ring *r, void *base, const struct nk_geometry *g, uint32_t id)
{
	int rc = nk_ring_init(r, (char *)base + nk_geo_ring_offset(g, 0, id), g->ring_entries);
	assert(rc == 0);
}

static void push_sockets(struct nk_ring *job, uint16_t first)
{
	struct nk_nqe n[ENTRIES];
	memset(n, 0, sizeof(n));
	for (int i = 0; i < ENTRIES; i++) {
		n[i].op = NK_OP_SOCKET;
		n[i].sock_id = (uint32_t)first + (uint32_t)i;
		n[i].op_data = 2 | 1 << 16;
		n[i].tag = (uint16_t)(first + i);
	}
	assert(nk_ring_push(job, n, ENTRIES) == ENTRIES);
}

static void expect_answers(struct nk_ring *comp, uint16_t first, int count)
{
	struct nk_nqe n[ENTRIES];
	assert(nk_ring_pop(comp, n, ENTRIES) == count);
	for (int i = 0; i < count; i++) {
		assert(n[i].op == (NK_OP_SOCKET | NK_REPLY_BIT));
		assert(nk_nqe_result(&n[i]) == -ENETDOWN);
		assert(n[i].tag == first + i); /* in order (RING-4) */
		assert(n[i].vm_id == 1);      /* stamped (CE-8) */
	}
}

/* The guest of VM-2: it publishes while the CoreEngine sleeps and only bumps the bell word
 * (its FUTEX_WAKE would stay in its own kernel); how long until the answers came. */
struct guest {
	struct nk_ring *job, *comp;
	uint32_t *bell;
	int64_t waited_ns;
};

static int64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *guest_main(void *arg)
{
	struct guest *g = arg;
	struct timespec nap = { 0, 30000000 }; /* the CoreEngine is asleep by then */
	nanosleep(&nap, NULL);
	int64_t t0 = mono_ns();
	push_sockets(g->job, 13);
	if (nk_ring_consumer_sleeping(g->job)) /* RING-6, then no wake-up crosses */
		nk_bell_bump(g->bell);
	while (nk_ring_count(g->comp) < ENTRIES)
		sched_yield();
	g->waited_ns = mono_ns() - t0;
	return NULL;
}

int main(void)
{
	struct nk_engine_config cfg = { .slices = 1 };
	struct nk_ce *ce = nk_ce_new(&cfg);
	assert(ce);
	struct nk_geometry g = tenant_geo();
	void *base = calloc(1, nk_geo_total_size(&g));
	assert(base);
	assert(nk_ce_add_device(ce, &g, 1, base) == 0);
	assert(nk_ce_add_device(ce, &g, 1, base) == -EEXIST);

	struct nk_ring job, comp;
	ring_of(&job, base, &g, NK_RING_JOB);
	ring_of(&comp, base, &g, NK_RING_COMPLETION);

	push_sockets(&job, 1);
	assert(nk_ce_poll(ce) == 2 * ENTRIES); /* 4 read, 4 written */
	push_sockets(&job, 5);
	assert(nk_ce_poll(ce) == ENTRIES); /* read; the answers wait */
	assert(nk_ce_pending(ce) == ENTRIES && nk_ce_blocked_sources(ce) == 1);
	push_sockets(&job, 9);
	assert(nk_ce_poll(ce) == 0);           /* the JOB ring is held */
	assert(nk_ring_count(&job) == ENTRIES); /* and not read */

	expect_answers(&comp, 1, ENTRIES);
	assert(nk_ce_poll(ce) > 0); /* the waiting answers go, then the JOB ring is read */
	expect_answers(&comp, 5, ENTRIES);
	assert(nk_ce_pending(ce) == ENTRIES && nk_ce_blocked_sources(ce) == 1);
	nk_ce_poll(ce);
	expect_answers(&comp, 9, ENTRIES);
	nk_ce_poll(ce);
	assert(nk_ce_pending(ce) == 0 && nk_ce_blocked_sources(ce) == 0);

	/* an idle run sleeps and times out; an interrupt ends the next one at once */
	assert(nk_ce_run(ce, 2000000) == NK_CE_TIMEOUT);
	nk_ce_interrupt(ce);
	assert(nk_ce_run(ce, 5000000000LL) == NK_CE_INTERRUPT);

	/* VM-2: a POLLED device is looked at after a bounded sleep, woken or not */
	assert(nk_ce_set_polled(ce, NK_KIND_TENANT, 9, 1) == -ENOENT);
	assert(nk_ce_set_polled(ce, NK_KIND_TENANT, 1, 1) == 0);
	struct guest guest = { &job, &comp,
			       (uint32_t *)((char *)base + nk_geo_bell_offset(&g, 0, NK_BELL_ENGINE)),
			       -1 };
	pthread_t th;
	assert(pthread_create(&th, NULL, guest_main, &guest) == 0);
	assert(nk_ce_run(ce, 1000000000LL) == NK_CE_TIMEOUT); /* 1 s: it sleeps most of it */
	nk_ce_poll(ce); /* unpolled, the NQEs would still wait: let the guest finish */
	pthread_join(th, NULL);
	expect_answers(&comp, 13, ENTRIES);
	printf("  polled: answered %.2f ms after a publish nobody woke us for\n",
	       (double)guest.waited_ns / 1e6);
	assert(guest.waited_ns >= 0 && guest.waited_ns < 100000000); /* not the run's 1 s */
	assert(nk_ce_set_polled(ce, NK_KIND_TENANT, 1, 0) == 0);

	/* RING-10: a tail far ahead of the head is reported, the device removed */
	*job.tail = *job.head + 3 * ENTRIES;
	assert(nk_ce_run(ce, 1000000000LL) == NK_CE_BROKEN);
	uint8_t kinds[4], idents[4];
	assert(nk_ce_broken(ce, kinds, idents, 4) == 1);
	assert(kinds[0] == NK_KIND_TENANT && idents[0] == 1);
	assert(nk_ce_remove_device(ce, NK_KIND_TENANT, 1) == 0);
	assert(nk_ce_remove_device(ce, NK_KIND_TENANT, 1) == -ENOENT);
	assert(nk_ce_broken(ce, kinds, idents, 4) == 0);

	nk_ce_free(ce);
	free(base);
	puts("test_ce: ok");
	return 0;
}
