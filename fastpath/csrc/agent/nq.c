/* nk-agent: NQEs on the tenant device's queue set 0 (spec/nqe.md, spec/device.md).
 *
 * The same discipline as tenant.c: a request's tag is its slot in the table of calls
 * in flight (NQE-9), requests wait in an outbox until their ring has room (DEV-8),
 * the ENGINE bell is rung when the CoreEngine's consumer sleeps (RING-6), EV_DATA
 * spans go back with BUF_RETURN once the kernel took them (BUF-4). Unlike tenant.c
 * nothing here blocks: replies complete calls through callbacks into sock.c/ctl.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "nk/bell.h"

#define POLL_BATCH 64
#define MAX_TAGS 65536u /* a tag is 16 bits (NQE-5) */

int64_t ag_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Queue set 0 of a READY tenant device, as nk_tenant_init sets it up (DEV-2, DEV-12..14). */
int ag_dev_init(struct ag *a, void *base, uint64_t len)
{
	int rc = nk_tqueue_open(&a->q, base, len, AG_QSET);
	if (rc < 0)
		return rc;
	const struct nk_geometry g = a->q.geo;
	/* SEC-5: no more than one ring's worth in flight, so every reply finds room */
	uint64_t n = g.ring_entries;
	a->ncalls = n < MAX_TAGS ? (uint32_t)n : MAX_TAGS;
	a->calls = calloc(a->ncalls, sizeof(*a->calls));
	a->free_tags = calloc(a->ncalls, sizeof(*a->free_tags));
	if ((rc = nk_bufpool_new_send(&a->pool, &g)) < 0)
		return rc;
	/* VM-2: a POLLED device (its CoreEngine is in another kernel): our rings of its bell
	 * only bump the word; the guest's PCI mapper sets polled whatever the header says */
	const struct nk_dev_header *h = base;
	if (h->features & NK_FEATURE_POLLED)
		a->polled = true;
	a->q.job.polled = a->q.send.polled = a->polled;
	if (!a->calls || !a->free_tags)
		return -ENOMEM;
	for (uint32_t i = 0; i < a->ncalls; i++)
		a->free_tags[i] = a->ncalls - 1 - i;
	a->nfree = a->ncalls;
	return 0;
}

/* ---- calls in flight (NQE-9: the tag is the slot) ---------------------------------- */

int ag_call_new(struct ag *a, uint8_t op, uint32_t sock_id, bool data)
{
	if (a->ce_dead)
		return -ENETDOWN; /* GL-9: nothing is sent to a CoreEngine that is gone */
	if (a->nfree <= (data ? AG_CALL_HEADROOM : 0))
		return -EAGAIN;
	uint32_t tag = a->free_tags[--a->nfree];
	a->calls[tag] = (struct ag_call){ .used = true, .op = op, .sock_id = sock_id };
	if (op != NK_OP_SEND)
		a->ctl_calls++;
	ag_sock_call_ref(a, sock_id, +1);
	return (int)tag;
}

void ag_call_free(struct ag *a, uint32_t tag)
{
	struct ag_call *c = &a->calls[tag];
	if (c->size)
		nk_bufpool_free(a->pool, c->buf, NULL);
	c->used = false;
	c->size = 0;
	if (c->op != NK_OP_SEND)
		a->ctl_calls--;
	a->free_tags[a->nfree++] = tag;
	ag_sock_call_ref(a, c->sock_id, -1);
	if (a->starved)
		ag_sock_unstarve(a); /* a slot and maybe a buffer are free again (BUF-7) */
}

uint32_t ag_calls_in_flight(const struct ag *a)
{
	return a->ncalls - a->nfree;
}

/* A send-half buffer for data (a SEND's payload): as nk_bufpool_alloc, but it leaves one
 * granule per call slot of AG_CALL_HEADROOM to control calls, so a bulk transfer that
 * fills the send half never makes a getsockopt fail with ENOBUFS (BUF-7: data waits). */
int ag_data_alloc(struct ag *a, uint64_t size, uint64_t *off)
{
	uint64_t reserve = (uint64_t)AG_CALL_HEADROOM * nk_bufpool_granule(a->pool);
#ifdef NK_BROKEN_NO_RESERVE
	reserve = 0; /* tests/test_agent.py: the backpressure test must catch this */
#endif
	if (nk_bufpool_free_bytes(a->pool) < size + reserve)
		return -ENOSPC;
	return nk_bufpool_alloc(a->pool, size, off);
}

/* Lend the call a send-half buffer holding `in` or room for `room` bytes (BUF-3). */
int ag_call_buffer(struct ag *a, uint32_t tag, const void *in, uint32_t in_len, uint32_t room)
{
	struct ag_call *c = &a->calls[tag];
	uint32_t size = in_len > room ? in_len : room;
	if (size == 0)
		return 0;
	int rc = nk_bufpool_alloc(a->pool, size, &c->buf);
	if (rc < 0)
		return rc == -ENOSPC ? -ENOBUFS : rc;
	c->size = size;
	c->room = room;
	if (in_len)
		memcpy(a->q.data + c->buf, in, in_len);
	return 0;
}

/* ---- submission ---------------------------------------------------------------------- */

/* Publish the outbox in order (nk/outbox.h); ring the ENGINE bell if its consumer sleeps. */
static int outbox_flush(struct ag *a, struct nk_outbox *b)
{
	int64_t n = nk_outbox_flush(b, a->q.engine_bell, &a->n_bells);
	return n < 0 ? (int)n : 0; /* RING-10 */
}

/* Does the SEND outbox go out now? A SEND does at once (the latency of a request is this
 * hop). BUF_RETURNs alone may wait a little while the CoreEngine sleeps: ringing its bell
 * for them alone wakes the CoreEngine and then the NSM only to take a buffer back, and in
 * a request/response exchange the app's next write brings a SEND they can go out with.
 * They wait at most AG_RET_HOLD_NS, and never for more than AG_RET_HOLD_MAX of them or
 * AG_RET_HOLD_BYTES (the NSM stops reading when its receive buffers run out, NSM-16); a
 * CoreEngine that is awake gets them at once (no bell is needed then). */
static bool send_outbox_due(struct ag *a)
{
	if (!a->q.send.len)
		return false;
	if (a->send_due || a->exiting || a->ret_held >= AG_RET_HOLD_MAX ||
	    a->ret_held_bytes >= AG_RET_HOLD_BYTES)
		return true;
	/* a stale answer costs at most one bell: nk_outbox_flush does the RING-6 check */
	if (!nk_ring_consumer_sleeping(&a->q.send.ring))
		return true;
	return ag_now_ns() - a->ret_held_since >= AG_RET_HOLD_NS;
}

int ag_flush(struct ag *a)
{
	if (a->ce_dead)
		return 0;
	int rc = outbox_flush(a, &a->q.job);
	if (rc < 0 || !send_outbox_due(a))
		return rc;
	rc = outbox_flush(a, &a->q.send);
	if (!a->q.send.len) {
		a->send_due = false;
		a->ret_held = 0;
		a->ret_held_bytes = 0;
	}
	return rc;
}

/* Queue call `tag` on its ring's outbox (DEV-8: SEND on SEND, the rest on JOB); it is
 * published by the loop's next flush, so a burst costs one tail store. */
int ag_publish(struct ag *a, uint32_t tag, uint64_t op_data)
{
	struct ag_call *c = &a->calls[tag];
	struct nk_nqe n = { .op = c->op, .qset = AG_QSET, .sock_id = c->sock_id,
			    .op_data = op_data, .data_ptr = c->size ? c->buf : 0,
			    .size = c->size, .tag = (uint16_t)tag };
	if (c->op == NK_OP_SEND) {
		a->n_sends++;
		a->send_due = true;
	}
	return nk_outbox_add(c->op == NK_OP_SEND ? &a->q.send : &a->q.job, &n);
}

/* BUF-4: an EV_DATA span goes back exactly as it came, once. */
void ag_buf_return(struct ag *a, uint64_t off, uint32_t size)
{
	if (a->ce_dead)
		return; /* the area is gone with the CoreEngine */
	struct nk_nqe n = { .op = NK_OP_BUF_RETURN, .qset = AG_QSET, .data_ptr = off, .size = size };
	if (nk_outbox_add(&a->q.send, &n) < 0)
		return;
	if (!a->ret_held++)
		a->ret_held_since = ag_now_ns();
	a->ret_held_bytes += size; /* see send_outbox_due */
}

/* ---- the dispatcher ------------------------------------------------------------------ */

static void complete(struct ag *a, uint32_t tag, int64_t result)
{
	struct ag_call *c = &a->calls[tag];
	struct ag_sock *s = ag_sock_by_id(a, c->sock_id);
	switch (c->op) {
	case NK_OP_SEND: {
		uint32_t size = c->size;
		ag_call_free(a, tag); /* BUF-3: the buffer is ours again */
		if (s)
			ag_sock_send_done(a, s, result, size);
		return;
	}
	case NK_OP_CLOSE: /* the ID may be reused once the reply is read */
		ag_call_free(a, tag);
		if (s)
			ag_sock_closed(a, s);
		return;
	case NK_OP_ACCEPT: {
		char addr[AG_SOCKADDR_ROOM] = { 0 };
		if (result > 0 && c->size)
			memcpy(addr, a->q.data + c->buf,
			       result < (int64_t)sizeof(addr) ? (size_t)result : sizeof(addr));
		uint32_t new_id = (uint32_t)c->aux;
		ag_call_free(a, tag);
		if (s)
			ag_sock_accepted(a, s, new_id, result, addr);
		return;
	}
	case NK_OP_CONNECT:
		if (s && s->stream && !c->pend) {
			ag_call_free(a, tag);
			ag_sock_settle(a, s, result);
			return;
		}
		break;
	case NK_OP_SHUTDOWN:
		if (s && result == 0 && c->aux != SHUT_RD)
			s->wr_shut = true;
		break;
	default:
		break;
	}
	ag_reply_call(a, c, result); /* answers the control request waiting, if any */
	ag_call_free(a, tag);
}

static void event(struct ag *a, const struct nk_nqe *n)
{
	a->n_events++;
	struct ag_sock *s = ag_sock_by_id(a, n->sock_id);
	switch (n->op) {
	case NK_OP_EV_DATA:
		if (s && !s->close_sent && !s->broken) {
			ag_sock_data(a, s, n); /* held until written (BUF-4) */
			return;
		}
		if (s)
			s->unread = true;
		ag_buf_return(a, n->data_ptr, n->size); /* nobody will read it */
		return;
	case NK_OP_EV_FIN:
		if (s)
			ag_sock_fin(a, s);
		return;
	case NK_OP_EV_ERROR: {
		int64_t r = nk_nqe_result(n);
		int err = r < 0 && r >= -4095 ? (int)-r : EIO;
		if (n->sock_id == NK_SOCK_NONE) { /* the NSM is gone: every socket (CE-19, PRE-9) */
			a->nsm_dead = true;
			a->nsm_err = err;
			ag_all_broken(a, err);
		} else if (s) {
			ag_sock_error(a, s, err);
		}
		return;
	}
	case NK_OP_EV_ACCEPTABLE:
		if (s) {
			s->acceptable = true;
			ag_sock_accept_more(a, s);
		}
		return;
	default:
		return; /* not for a tenant */
	}
}

static void dispatch(struct ag *a, const struct nk_nqe *n)
{
	if (n->op & NK_REPLY_BIT) {
		struct ag_call *c = n->tag < a->ncalls ? &a->calls[n->tag] : NULL;
		if (c && c->used && c->sock_id == n->sock_id && (n->op & 0x7F) == c->op)
			complete(a, n->tag, nk_nqe_result(n));
		/* else BUF_RETURN|0x80 (BUF-5) or a stray reply: nothing waits for it */
		return;
	}
	event(a, n);
}

/* Everything on COMPLETION and RECEIVE now; the number of NQEs handled. */
int ag_poll_rings(struct ag *a)
{
	if (a->ce_dead)
		return 0;
	struct nk_nqe batch[POLL_BATCH];
	struct nk_ring *rings[2] = { &a->q.completion, &a->q.receive };
	int total = 0;
	for (int r = 0; r < 2; r++) {
		for (;;) {
			int64_t n = nk_ring_pop(rings[r], batch, POLL_BATCH);
			if (n < 0)
				return -EBADMSG; /* RING-10: the device is broken */
			for (int64_t i = 0; i < n; i++)
				dispatch(a, &batch[i]);
			total += (int)n;
			if (n < POLL_BATCH)
				break;
		}
	}
	return total;
}

/* Must a SEND's reply wake the loop? Only when something waits for one: a socket at
 * AG_MAX_SENDS, starved of buffers or call slots, or whose shutdown or close waits for its
 * SENDs, a control call (its reply is never a SEND's), or the exit (GL-10). Otherwise a
 * SEND's reply only frees its buffer, and it is read at the next wake-up: in a
 * request/response exchange the response's EV_DATA, a bell the loop sleeps for anyway. */
static bool completions_wanted(const struct ag *a)
{
	return a->ctl_calls || a->send_waiters || a->starved || a->exiting;
}

/* RING-6: NEED_WAKEUP on the incoming rings, then the re-check. True: they are empty, the
 * loop may sleep (a ring of the DEVICE bell then wakes the bell thread, ag_bell_main).
 * COMPLETION gets the flag only when completions_wanted(): *lazy says it did not, and
 * that SENDs are in flight whose replies the sleep must not outlast by much (RING-7). */
bool ag_rings_prepare_sleep(struct ag *a, bool *lazy)
{
	*lazy = false;
	if (a->ce_dead)
		return true;
	if (!completions_wanted(a)) {
		/* the flag stays clear (finish_sleep cleared it): the CoreEngine does not ring
		 * for replies; RING-6 holds for RECEIVE, which alone may wake us now */
		*lazy = ag_calls_in_flight(a) != 0;
		return nk_ring_prepare_sleep(&a->q.receive) == 1;
	}
	return nk_ring_prepare_sleep(&a->q.completion) == 1 &&
	       nk_ring_prepare_sleep(&a->q.receive) == 1;
}

void ag_rings_finish_sleep(struct ag *a)
{
	if (a->ce_dead)
		return;
	nk_ring_finish_sleep(&a->q.completion);
	nk_ring_finish_sleep(&a->q.receive);
}

/* Did the last flush leave something the loop must retry or time: NQEs waiting for ring
 * room (RING-4: no bell says when), or a SEND outbox due that did not go out? BUF_RETURNs
 * held back (send_outbox_due) are not: whoever sleeps next bounds its sleep by them. */
bool ag_flush_waits(const struct ag *a)
{
	return a->q.job.len || (a->q.send.len && (a->send_due || a->exiting));
}

static void kick_loop(struct ag *a)
{
	uint64_t one = 1;
	if (write(a->wake_fd, &one, sizeof(one)) < 0) {
		/* EAGAIN: the counter is saturated, the loop is awake anyway */
	}
}

/* The bell thread (agent.h). While the loop sleeps it does the loop's ring work: the
 * rings, the pumps it starts, the flush, then the RING-6 handshake again before it
 * sleeps. While the loop is awake it only waits: the loop polls the rings every round
 * and sets NEED_WAKEUP again before it sleeps. The bell word is read before the last
 * check of the rings (DEV-9), under the lock, so a ring after that check wakes us. */
void *ag_bell_main(void *arg)
{
	struct ag *a = arg;
	pthread_mutex_lock(&a->lock); /* the mutex orders everything we touch with the loop */
	uint32_t seen = a->bell_seen;
	int64_t step = NK_POLL_MIN_NS; /* VM-2: the next polled sleep */
	uint64_t gen = a->work_gen;
	while (!atomic_load_explicit(&a->quit, memory_order_acquire)) {
		int64_t wait_ns = (int64_t)AG_SLEEP_MS * 1000000; /* RING-7 */
		seen = nk_bell_value(a->q.device_bell);
		if (gen != a->work_gen) { /* the loop found work since: short sleeps again */
			gen = a->work_gen;
			step = NK_POLL_MIN_NS;
		}
		if (a->loop_sleeping && !a->ce_dead) {
			int n = ag_poll_rings(a);
			ag_run_pumps(a);
			if (n < 0 || ag_flush(a) < 0) {
				kick_loop(a); /* RING-10: the loop's next poll finds it and gives up */
			} else if (n > 0) {
				step = NK_POLL_MIN_NS;
				continue; /* more may have come: the bell again, then the rings */
			} else {
				bool lazy;
				if (!ag_rings_prepare_sleep(a, &lazy))
					continue; /* work slipped in (RING-6) */
				if (a->pump || ag_flush_waits(a))
					kick_loop(a); /* the loop's timeout did not know of it */
				if (a->q.send.len)
					wait_ns = AG_RET_HOLD_NS; /* held BUF_RETURNs: ours to flush */
				else if (lazy)
					wait_ns = (int64_t)AG_TICK_MS * 1000000;
			}
		}
		pthread_mutex_unlock(&a->lock);
		if (a->polled) /* VM-2: no futex across the boundary; the step doubles to 1 ms */
			nk_bell_poll_wait(a->q.device_bell, seen, wait_ns, &step, NK_POLL_MAX_NS);
		else
			nk_bell_wait(a->q.device_bell, seen, wait_ns);
		pthread_mutex_lock(&a->lock);
	}
	pthread_mutex_unlock(&a->lock);
	return NULL;
}

/* The CoreEngine is gone (GL-9): no reply will ever come. Every call ends here with
 * ECONNRESET (ENETDOWN for a SOCKET): control requests get their answer, sockets whose
 * CLOSE was in flight are freed. */
void ag_fail_calls(struct ag *a)
{
	for (uint32_t tag = 0; tag < a->ncalls; tag++) {
		struct ag_call *c = &a->calls[tag];
		if (!c->used)
			continue;
		complete(a, tag, c->op == NK_OP_SOCKET ? -ENETDOWN : -ECONNRESET);
	}
}
