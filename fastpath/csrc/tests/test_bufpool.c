/* The buffer allocator and bounds checks in C (include/nk/bufpool.h, bufpool.c).
 *
 * Random alloc/free sequences against a model written from the spec: a bitmap
 * of granules with first fit by address (BUF-2), a table of live buffers
 * (BUF-6), -ENOSPC only when no run of free granules is long enough (BUF-7),
 * -EINVAL for sizes that can never fit (BUF-9). Bounds checks at the edges of
 * the u64 range (NQE-14). Built with ASan + UBSan by `make test`.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nk/bufpool.h"

#define CHECK(c)                                                                   \
	do {                                                                       \
		if (!(c)) {                                                        \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #c); \
			exit(1);                                                   \
		}                                                                  \
	} while (0)

static uint64_t rng = 88172645463325252ull;

static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

/* -- the model ------------------------------------------------------------------- */

enum { MAXG = 512 };

struct model {
	uint64_t off, granule, n;  /* area offset, granule, granules */
	unsigned char used[MAXG];  /* granule taken */
	uint64_t size_at[MAXG];    /* size of the live buffer starting at a granule, 0 if none */
};

static uint64_t need(const struct model *m, uint64_t size)
{
	return (size + m->granule - 1) / m->granule;
}

static int model_alloc(struct model *m, uint64_t size, uint64_t *off)
{
	if (size == 0 || size > m->n * m->granule)
		return -EINVAL;
	uint64_t k = need(m, size);
	for (uint64_t g = 0; g + k <= m->n; g++) { /* the lowest start with k free granules */
		uint64_t j = 0;
		while (j < k && !m->used[g + j])
			j++;
		if (j == k) {
			memset(&m->used[g], 1, k);
			m->size_at[g] = size;
			*off = m->off + g * m->granule;
			return 0;
		}
	}
	return -ENOSPC;
}

static int model_free(struct model *m, uint64_t off, uint64_t *size)
{
	if (off < m->off || off - m->off >= m->n * m->granule)
		return -EFAULT;
	uint64_t rel = off - m->off;
	if (rel % m->granule || !m->size_at[rel / m->granule])
		return -EINVAL;
	uint64_t g = rel / m->granule;
	*size = m->size_at[g];
	memset(&m->used[g], 0, need(m, *size));
	m->size_at[g] = 0;
	return 0;
}

static void compare(const struct nk_bufpool *p, const struct model *m)
{
	uint64_t free_g = 0, run = 0, best = 0;
	size_t live = 0;
	for (uint64_t g = 0; g < m->n; g++) {
		free_g += !m->used[g];
		run = m->used[g] ? 0 : run + 1;
		best = run > best ? run : best;
		live += m->size_at[g] != 0;
	}
	CHECK(nk_bufpool_free_bytes(p) == free_g * m->granule);
	CHECK(nk_bufpool_largest_free(p) == best * m->granule);
	CHECK(nk_bufpool_live_count(p) == live);
	struct nk_span spans[MAXG];
	CHECK(nk_bufpool_live(p, spans, MAXG) == live);
	size_t i = 0;
	for (uint64_t g = 0; g < m->n; g++) {
		if (m->size_at[g]) { /* by offset, as the reference lists them */
			CHECK(spans[i].offset == m->off + g * m->granule);
			CHECK(spans[i].size == m->size_at[g]);
			i++;
		}
	}
}

static void random_program(uint64_t off, uint64_t n, uint64_t granule, int steps)
{
	struct nk_bufpool *p;
	struct model m = { .off = off, .granule = granule, .n = n };
	CHECK(nk_bufpool_new(&p, off, n * granule, granule) == 0);
	uint64_t given[4 * MAXG];
	size_t ngiven = 0;
	for (int s = 0; s < steps; s++) {
		uint64_t a, b, sa = 0, sb = 0;
		int ra, rb;
		switch (next() % 5) {
		case 0:
		case 1: { /* alloc: small, large, 0, too big */
			uint64_t sz = next() % 4 == 0 ? next() % (n * granule + 2)
						      : 1 + next() % (4 * granule);
			ra = nk_bufpool_alloc(p, sz, &a);
			rb = model_alloc(&m, sz, &b);
			CHECK(ra == rb);
			if (ra == 0) {
				CHECK(a == b && a % granule == 0); /* BUF-2 */
				if (ngiven < sizeof(given) / sizeof(given[0]))
					given[ngiven++] = a;
			}
			break;
		}
		case 2:
		case 3: { /* free something handed out: live, or already freed (BUF-6) */
			if (!ngiven)
				break;
			uint64_t at = given[next() % ngiven];
			ra = nk_bufpool_free(p, at, &sa);
			rb = model_free(&m, at, &sb);
			CHECK(ra == rb && sa == sb);
			break;
		}
		default: { /* free anywhere, including off granules and outside */
			uint64_t at = off + next() % ((n + 2) * granule) - (next() % 2) * granule;
			if (next() % 8 == 0)
				at = UINT64_MAX - next() % 3;
			ra = nk_bufpool_free(p, at, &sa);
			rb = model_free(&m, at, &sb);
			CHECK(ra == rb && sa == sb);
			break;
		}
		}
		compare(p, &m);
	}
	nk_bufpool_delete(p);
}

static void test_bounds(void)
{
	const uint64_t M = UINT64_MAX;
	CHECK(nk_buf_within(0, 10, 0, 10) && !nk_buf_within(0, 10, 0, 11));
	CHECK(nk_buf_within(0, 10, 10, 0) && !nk_buf_within(0, 10, 11, 0));
	CHECK(!nk_buf_within(5, 10, 4, 1) && nk_buf_within(5, 10, 14, 1));
	CHECK(!nk_buf_within(0, 10, M, 2));  /* offset + size wraps to 1: still outside */
	CHECK(!nk_buf_within(0, 10, 2, M));
	CHECK(nk_buf_within(M - 10, 10, M - 10, 10) && !nk_buf_within(M - 10, 10, M - 10, 11));
	struct nk_geometry g = { .n_qsets = 1, .ring_entries = 2, .data_size = 1 << 16,
				 .send_size = 1 << 14, .buf_size = 1 << 12, .kind = 1 };
	CHECK(nk_buf_check_span(&g, 0, M, 0) == 0); /* size 0 names no buffer */
	CHECK(nk_buf_check_span(&g, 0, 0, 1 << 14) == 0);
	CHECK(nk_buf_check_span(&g, 0, 1, 1 << 14) == -EFAULT);
	CHECK(nk_buf_check_span(&g, 1, (1 << 14) - 1, 1) == -EFAULT);
	CHECK(nk_buf_check_span(&g, 1, 1 << 14, 3 << 14) == 0);
	CHECK(nk_buf_check_span(&g, 1, M, 2) == -EFAULT);
	CHECK(nk_buf_check_slice(&g, 1 << 14, 0) == -EFAULT);
	CHECK(nk_buf_check_slice(&g, 1 << 13, 1 << 12) == -EFAULT);
	CHECK(nk_buf_check_slice(&g, (1 << 14) + 64, 1 << 12) == -EINVAL);
	CHECK(nk_buf_check_slice(&g, 1 << 14, 1 << 12) == 0);
}

static void test_constructors(void)
{
	struct nk_bufpool *p = NULL;
	CHECK(nk_bufpool_new(&p, 0, 4096, 0) == -EINVAL);
	CHECK(nk_bufpool_new(&p, 0, 4096, 48) == -EINVAL);
	CHECK(nk_bufpool_new(&p, 64, 4096, 4096) == -EINVAL);
	CHECK(nk_bufpool_new(&p, 0, 0, 64) == -EINVAL);
	CHECK(nk_bufpool_new(&p, UINT64_MAX - 4095, 8192, 4096) == -EINVAL); /* past 2^64 */
	CHECK(nk_bufpool_new(&p, UINT64_MAX - 4095, 4096, 4096) == 0);
	uint64_t off, size;
	CHECK(nk_bufpool_alloc(p, 4096, &off) == 0 && off == UINT64_MAX - 4095);
	CHECK(nk_bufpool_alloc(p, 1, &off) == -ENOSPC);
	CHECK(nk_bufpool_alloc(p, 4097, &off) == -EINVAL);
	CHECK(nk_bufpool_free(p, UINT64_MAX - 4095, &size) == 0 && size == 4096);
	nk_bufpool_delete(p);
	struct nk_geometry g = { .n_qsets = 1, .ring_entries = 2, .data_size = 1 << 16,
				 .send_size = 1 << 14, .buf_size = 1 << 12, .kind = 1 };
	CHECK(nk_bufpool_new_send(&p, &g) == 0);
	CHECK(nk_bufpool_capacity(p) == 1 << 14 && nk_bufpool_area_offset(p) == 0);
	nk_bufpool_delete(p);
	CHECK(nk_bufpool_new_receive(&p, &g, 1 << 13, 1 << 12) == -EFAULT);
	CHECK(nk_bufpool_new_receive(&p, &g, (1 << 14) + 1, 1 << 12) == -EINVAL);
	CHECK(nk_bufpool_new_receive(&p, &g, 1 << 15, 1 << 14) == 0);
	CHECK(nk_bufpool_alloc(p, 1, &off) == 0 && off == 1 << 15);
	CHECK(nk_bufpool_free(p, 1 << 14, NULL) == -EFAULT);
	CHECK(nk_bufpool_free(p, 1 << 15, NULL) == 0);
	CHECK(nk_bufpool_free(p, 1 << 15, NULL) == -EINVAL); /* double free */
	nk_bufpool_delete(p);
}

int main(void)
{
	test_bounds();
	test_constructors();
	for (int k = 0; k < 200; k++) {
		uint64_t n = 1 + next() % 64, granule = 1ull << (next() % 13);
		uint64_t off = (next() % 4 == 0 ? UINT64_MAX / granule - n : next() % 100) * granule;
		random_program(off, n, granule, 2000);
	}
	random_program(4096, MAXG, 64, 50000); /* many runs and many live buffers: growth */
	printf("test_bufpool: ok\n");
	return 0;
}
