/* Rings and bells in C (include/nk/ring.h, bell.h): unit checks, then a
 * two-thread producer/consumer stress over the wake-up handshake (RING-5,
 * RING-6, RING-9, RING-10, DEV-9).
 *
 * The stress consumer sleeps on its bell with NO timeout: a lost wake-up is a
 * hang, which the alarm below turns into a failure; `make test-broken` builds
 * a producer that forgets one bell in a thousand and expects exactly that.
 * Built with ASan + UBSan by `make test`; NK_STRESS_N sets the number of NQEs
 * (default 4M), NK_ALARM the limit in seconds (default 300).
 */
#include <assert.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nk/bell.h"
#include "nk/device.h"
#include "nk/ring.h"

#define CHECK(c)                                                                   \
	do {                                                                       \
		if (!(c)) {                                                        \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #c); \
			exit(1);                                                   \
		}                                                                  \
	} while (0)

static struct nk_nqe nqe(uint64_t seq)
{
	struct nk_nqe n;
	memset(&n, 0, sizeof(n));
	n.op = NK_OP_SEND;
	n.sock_id = (uint32_t)(seq * 2654435761u);
	n.op_data = seq;
	n.data_ptr = ~seq;
	n.size = (uint32_t)seq;
	n.tag = (uint16_t)seq;
	return n;
}

static int same(const struct nk_nqe *a, uint64_t seq)
{
	struct nk_nqe b = nqe(seq);
	return memcmp(a, &b, sizeof(b)) == 0;
}

static uint32_t load32(const void *base, size_t off)
{
	uint32_t v;
	memcpy(&v, (const char *)base + off, 4);
	return v;
}

static void store32(void *base, size_t off, uint32_t v)
{
	memcpy((char *)base + off, &v, 4);
}

/* RING-1, RING-3, RING-4, RING-8, RING-9: FIFO across index wrap, full and empty. */
static void test_fifo_and_wrap(void)
{
	enum { E = 8 };
	static _Alignas(64) unsigned char mem[NK_RING_SLOTS + 32 * E];
	struct nk_ring r;
	CHECK(nk_ring_init(&r, mem, 3) == -EINVAL);
	CHECK(nk_ring_init(&r, mem, E) == 0);
	for (uint32_t k = 0, start = UINT32_MAX - 20; k < 6; k++, start += 13) {
		memset(mem, 0, sizeof(mem));
		store32(mem, NK_RING_TAIL, start);
		store32(mem, NK_RING_HEAD, start);
		uint64_t in = 0, out = 0;
		struct nk_nqe batch[E + 3], got[E + 3];
		for (int round = 0; round < 50; round++) {
			uint32_t want = (uint32_t)(round % (E + 3));
			for (uint32_t i = 0; i < want; i++)
				batch[i] = nqe(in + i);
			int64_t room = E - nk_ring_count(&r);
			int64_t n = nk_ring_push(&r, batch, want);
			CHECK(n == (want < room ? want : room)); /* RING-8: what fits, no more */
			for (int64_t i = 0; i < n; i++) /* RING-1: slot i mod entries */
				CHECK(same(&r.slots[(start + in + i) & (E - 1)], in + i));
			in += n;
			CHECK(load32(mem, NK_RING_TAIL) == (uint32_t)(start + in)); /* RING-3 */
			int64_t m = nk_ring_pop(&r, got, (uint32_t)(round * 7 % (E + 3)));
			for (int64_t i = 0; i < m; i++)
				CHECK(same(&got[i], out + i)); /* RING-9 */
			out += m;
			CHECK(nk_ring_count(&r) == (int64_t)(in - out));
		}
		CHECK(nk_ring_pop(&r, got, E + 3) == (int64_t)(in - out));
		CHECK(nk_ring_pop(&r, got, 1) == 0);
	}
}

/* RING-10: impossible indices are refused and nothing is read or written. */
static void test_impossible_indices(void)
{
	enum { E = 4 };
	static _Alignas(64) unsigned char mem[NK_RING_SLOTS + 32 * E], snap[sizeof(mem)];
	struct nk_ring r;
	struct nk_nqe n[2] = { nqe(1), nqe(2) }, got[2];
	nk_ring_init(&r, mem, E);
	const uint32_t used[] = { E + 1, 1000, UINT32_MAX, 1u << 31 };
	for (unsigned k = 0; k < sizeof(used) / sizeof(used[0]); k++) {
		memset(mem, 0xAB, sizeof(mem));
		store32(mem, NK_RING_HEAD, 77);
		store32(mem, NK_RING_TAIL, 77 + used[k]);
		store32(mem, NK_RING_FLAGS, 0);
		memcpy(snap, mem, sizeof(mem));
		CHECK(nk_ring_count(&r) == -EBADMSG);
		CHECK(nk_ring_push(&r, n, 2) == -EBADMSG);
		CHECK(nk_ring_push(&r, n, 0) == -EBADMSG);
		CHECK(nk_ring_pop(&r, got, 2) == -EBADMSG);
		CHECK(nk_ring_pop(&r, got, 0) == -EBADMSG);
		CHECK(nk_ring_peek(&r, 0) == NULL);
		CHECK(memcmp(mem, snap, sizeof(mem)) == 0);
		CHECK(nk_ring_prepare_sleep(&r) == -EBADMSG);
	}
}

/* RING-6, RING-11: the handshake in both orders. */
static void test_handshake(void)
{
	enum { E = 2 };
	static _Alignas(64) unsigned char mem[NK_RING_SLOTS + 32 * E];
	struct nk_ring r;
	struct nk_nqe a = nqe(5), got;
	memset(mem, 0, sizeof(mem));
	nk_ring_init(&r, mem, E);
	CHECK(nk_ring_push(&r, &a, 1) == 1);
	CHECK(nk_ring_prepare_sleep(&r) == 0); /* work slipped in: no sleep, flag clear */
	CHECK(load32(mem, NK_RING_FLAGS) == 0 && !nk_ring_consumer_sleeping(&r));
	CHECK(nk_ring_pop(&r, &got, 1) == 1 && same(&got, 5));
	CHECK(nk_ring_prepare_sleep(&r) == 1);
	CHECK(nk_ring_push(&r, &a, 1) == 1 && nk_ring_consumer_sleeping(&r));
	nk_ring_finish_sleep(&r);
	CHECK(!nk_ring_consumer_sleeping(&r));
	const struct nk_nqe *p = nk_ring_peek(&r, 0);
	CHECK(p && same(p, 5) && nk_ring_peek(&r, 1) == NULL);
	nk_ring_advance(&r, 1);
	CHECK(nk_ring_count(&r) == 0);
}

/* DEV-9: a bell wait returns at once when the word already changed, times out
 * when nobody rings, and futex_waitv names the bell. */
static void test_bells(void)
{
	static _Alignas(64) uint32_t words[32];
	uint32_t *bells[2] = { &words[0], &words[16] };
	uint32_t v = nk_bell_value(bells[0]);
	CHECK(nk_bell_wait(bells[0], v + 1, -1) == 0); /* word differs: no sleep */
	CHECK(nk_bell_wait(bells[0], v, 1000000) == -ETIMEDOUT);
	CHECK(nk_bell_ring(bells[0]) == 0 && nk_bell_value(bells[0]) == v + 1);
	uint32_t expect[2] = { nk_bell_value(bells[0]), nk_bell_value(bells[1]) };
	int rc = nk_bell_waitv_ns(bells, expect, 2, 1000000);
	CHECK(rc == -ETIMEDOUT || rc == -ENOSYS);
	if (rc == -ENOSYS)
		return;
	expect[1]++;
	CHECK(nk_bell_waitv_ns(bells, expect, 2, 1000000) == -EAGAIN);
	CHECK(nk_bell_wait_any(bells, expect, 2, NULL) == 0); /* the old convention */
}

/* -- the stress ------------------------------------------------------------------ */

struct stress {
	struct nk_ring ring;
	uint32_t *bell;
	uint64_t total;
	uint64_t rings, sleeps, full;
};

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void *producer(void *arg)
{
	struct stress *st = arg;
	struct nk_nqe batch[48];
	uint64_t seq = 0, rng = 0x9E3779B97F4A7C15ull;
	while (seq < st->total) {
		uint64_t want = 1 + xorshift(&rng) % 48;
		if (want > st->total - seq)
			want = st->total - seq;
		for (uint64_t i = 0; i < want; i++)
			batch[i] = nqe(seq + i);
		int64_t n = nk_ring_push(&st->ring, batch, (uint32_t)want);
		CHECK(n >= 0);
		seq += (uint64_t)n;
#ifdef NK_BROKEN_SKIP_BELL
		/* the deliberately broken producer (make test-broken): it forgets one bell
		 * in a thousand; the consumer must hang and the alarm must fail the run */
		int forget = n && xorshift(&rng) % 1000 == 0;
#else
		int forget = 0;
#endif
		if (n && nk_ring_consumer_sleeping(&st->ring) && !forget) { /* RING-6, DEV-9 */
			CHECK(nk_bell_ring(st->bell) >= 0);
			st->rings++;
		}
		if (n == 0) {
			st->full++;
			sched_yield(); /* full: no wake-up for space (RING-4) */
		}
		if (xorshift(&rng) % 4096 == 0) { /* now and then let the consumer run dry */
			struct timespec ts = { 0, (long)(xorshift(&rng) % 200000) };
			nanosleep(&ts, NULL);
		}
	}
	return NULL;
}

static void *consumer(void *arg)
{
	struct stress *st = arg;
	struct nk_nqe got[48];
	uint64_t seq = 0, rng = 12345;
	unsigned idle = 0;
	while (seq < st->total) {
		int64_t n = nk_ring_pop(&st->ring, got, (uint32_t)(1 + xorshift(&rng) % 48));
		CHECK(n >= 0);
		for (int64_t i = 0; i < n; i++) {
			if (!same(&got[i], seq + (uint64_t)i)) { /* RING-9 */
				fprintf(stderr, "NQE %llu arrived wrong\n",
					(unsigned long long)(seq + (uint64_t)i));
				exit(1);
			}
		}
		seq += (uint64_t)n;
		if (n) {
			idle = 0;
			continue;
		}
		if (++idle < 64)
			continue; /* poll a little before sleeping (RING-7) */
		idle = 0;
		uint32_t v = nk_bell_value(st->bell); /* before the re-check (DEV-9) */
		int rc = nk_ring_prepare_sleep(&st->ring);
		CHECK(rc >= 0);
		if (rc == 1) {
			st->sleeps++;
			/* no timeout: a lost wake-up hangs here and the alarm fails the test */
			rc = nk_bell_wait(st->bell, v, -1);
			CHECK(rc == 0 || rc == -EINTR);
		}
		nk_ring_finish_sleep(&st->ring);
	}
	return NULL;
}

static void test_two_threads(uint64_t total, uint32_t entries)
{
	struct nk_geometry g = { .n_qsets = 1, .ring_entries = entries, .data_size = 8192,
				 .send_size = 4096, .buf_size = 4096, .kind = NK_KIND_TENANT };
	uint64_t size = nk_geo_total_size(&g);
	void *region = aligned_alloc(NK_PAGE, size);
	CHECK(region);
	CHECK(nk_dev_init_header(region, size, &g, (uint32_t)getpid(), 1, NK_FEATURE_FUTEX_BELLS) == 0);
	struct stress st = { .total = total };
	CHECK(nk_ring_init(&st.ring, (char *)region + nk_geo_ring_offset(&g, 0, NK_RING_JOB),
			   entries) == 0);
	st.bell = (uint32_t *)((char *)region + nk_geo_bell_offset(&g, 0, NK_BELL_ENGINE));
	pthread_t p, c;
	CHECK(pthread_create(&c, NULL, consumer, &st) == 0);
	CHECK(pthread_create(&p, NULL, producer, &st) == 0);
	pthread_join(p, NULL);
	pthread_join(c, NULL);
	CHECK(nk_ring_count(&st.ring) == 0);
	CHECK(st.sleeps > 0); /* the handshake was exercised */
	printf("  %llu NQEs through %u entries: %llu sleeps, %llu bells rung, %llu full\n",
	       (unsigned long long)total, entries, (unsigned long long)st.sleeps,
	       (unsigned long long)st.rings, (unsigned long long)st.full);
	free(region);
}

int main(void)
{
	const char *env = getenv("NK_STRESS_N");
	uint64_t total = env ? strtoull(env, NULL, 10) : 4000000;
	const char *limit = getenv("NK_ALARM");
	/* a hang (a lost wake-up) fails the test instead of blocking CI */
	alarm(limit ? (unsigned)atoi(limit) : 300);
	test_fifo_and_wrap();
	test_impossible_indices();
	test_handshake();
	test_bells();
	test_two_threads(total, 64);
	test_two_threads(total / 8, 2);
	printf("test_ring: ok\n");
	return 0;
}
