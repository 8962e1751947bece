/* The data-area buffer allocator (spec/device.md BUF-1, BUF-2, BUF-6, BUF-7, BUF-9);
 * reference/bufpool.py Allocator, SendAllocator and ReceiveAllocator.
 *
 * First fit over granules: the free granules are kept as runs (first granule,
 * count), sorted and never adjacent, exactly as the reference keeps them, so
 * every alloc returns the offset the reference returns. Live buffers are kept
 * sorted by their first granule, so free() finds one by binary search and
 * nk_bufpool_live() lists them by offset.
 *
 * Memory: free runs are separated by live buffers, so there are never more
 * than live + 1 of them. Both arrays grow together in alloc(); free() never
 * allocates, so giving a buffer back cannot fail for lack of memory.
 */
#include <stdlib.h>
#include <string.h>

#include "nk/bufpool.h"

struct nk_bufpool {
	uint64_t area_offset; /* counted from the start of the data area */
	uint64_t area_size;
	uint64_t granule;
	uint64_t free_granules;
	uint64_t *run_start; /* free runs: first granule, sorted, never adjacent */
	uint64_t *run_count;
	size_t nruns;
	uint64_t *live_first; /* live buffers: first granule, sorted */
	uint64_t *live_size;  /* and their size in bytes as asked */
	size_t nlive;
	size_t cap; /* live arrays hold cap, run arrays cap + 1 */
};

static uint64_t granules(const struct nk_bufpool *p, uint64_t size)
{
	/* ceil(size / granule) without forming size + granule - 1, which may wrap */
	return size / p->granule + (size % p->granule != 0);
}

/* The first index i with v[i] >= key (bisect_left). */
static size_t bisect(const uint64_t *v, size_t n, uint64_t key)
{
	size_t lo = 0, hi = n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (v[mid] < key)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static int grow_one(uint64_t **v, size_t n)
{
	uint64_t *nv = realloc(*v, n * sizeof(**v));
	if (!nv)
		return -ENOMEM; /* *v is unchanged and still valid */
	*v = nv;
	return 0;
}

/* Room for one more live buffer (and so one more free run). Changes no content. */
static int reserve(struct nk_bufpool *p)
{
	if (p->nlive < p->cap)
		return 0;
	size_t cap = p->cap * 2;
	if (grow_one(&p->live_first, cap) || grow_one(&p->live_size, cap) ||
	    grow_one(&p->run_start, cap + 1) || grow_one(&p->run_count, cap + 1))
		return -ENOMEM; /* arrays that grew are only larger than cap says */
	p->cap = cap;
	return 0;
}

static void del_at(uint64_t *v, size_t n, size_t i)
{
	memmove(&v[i], &v[i + 1], (n - i - 1) * sizeof(*v));
}

static void ins_at(uint64_t *v, size_t n, size_t i, uint64_t x)
{
	memmove(&v[i + 1], &v[i], (n - i) * sizeof(*v));
	v[i] = x;
}

void nk_bufpool_delete(struct nk_bufpool *p)
{
	if (!p)
		return;
	free(p->run_start);
	free(p->run_count);
	free(p->live_first);
	free(p->live_size);
	free(p);
}

int nk_bufpool_new(struct nk_bufpool **out, uint64_t area_offset, uint64_t area_size,
		   uint64_t granule)
{
	if (granule == 0 || (granule & (granule - 1)))
		return -EINVAL;
	if (area_offset % granule || area_size % granule || area_size == 0)
		return -EINVAL;
	if (area_size - 1 > UINT64_MAX - area_offset)
		return -EINVAL; /* offsets are u64: the area must end by 2^64 */
	struct nk_bufpool *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->area_offset = area_offset;
	p->area_size = area_size;
	p->granule = granule;
	p->free_granules = area_size / granule;
	p->cap = 16;
	p->live_first = malloc(p->cap * sizeof(uint64_t));
	p->live_size = malloc(p->cap * sizeof(uint64_t));
	p->run_start = malloc((p->cap + 1) * sizeof(uint64_t));
	p->run_count = malloc((p->cap + 1) * sizeof(uint64_t));
	if (!p->live_first || !p->live_size || !p->run_start || !p->run_count) {
		nk_bufpool_delete(p);
		return -ENOMEM;
	}
	p->run_start[0] = 0; /* one free run: the whole area */
	p->run_count[0] = p->free_granules;
	p->nruns = 1;
	*out = p;
	return 0;
}

int nk_bufpool_new_send(struct nk_bufpool **out, const struct nk_geometry *g)
{
	if (nk_geometry_check(g))
		return -EINVAL;
	return nk_bufpool_new(out, 0, g->send_size, g->buf_size); /* BUF-1, DEV-11 */
}

int nk_bufpool_new_receive(struct nk_bufpool **out, const struct nk_geometry *g,
			   uint64_t slice_offset, uint64_t slice_size)
{
	if (nk_geometry_check(g))
		return -EINVAL;
	int rc = nk_buf_check_slice(g, slice_offset, slice_size); /* BUF-8 */
	return rc ? rc : nk_bufpool_new(out, slice_offset, slice_size, g->buf_size);
}

int nk_bufpool_alloc(struct nk_bufpool *p, uint64_t size, uint64_t *offset)
{
	if (size == 0 || size > p->area_size)
		return -EINVAL; /* BUF-9: can never fit */
	uint64_t need = granules(p, size);
	size_t i = 0;
	while (i < p->nruns && p->run_count[i] < need)
		i++; /* first fit: the lowest run that is long enough */
	if (i == p->nruns)
		return -ENOSPC; /* BUF-7: only when no run fits */
	if (reserve(p))
		return -ENOMEM;
	uint64_t first = p->run_start[i];
	if (p->run_count[i] == need) {
		del_at(p->run_start, p->nruns, i);
		del_at(p->run_count, p->nruns, i);
		p->nruns--;
	} else {
		p->run_start[i] += need;
		p->run_count[i] -= need;
	}
	size_t j = bisect(p->live_first, p->nlive, first);
	ins_at(p->live_first, p->nlive, j, first);
	ins_at(p->live_size, p->nlive, j, size);
	p->nlive++;
	p->free_granules -= need;
	*offset = p->area_offset + first * p->granule; /* BUF-2: on a granule */
	return 0;
}

int nk_bufpool_free(struct nk_bufpool *p, uint64_t offset, uint64_t *size)
{
	if (!nk_buf_within(p->area_offset, p->area_size, offset, 1))
		return -EFAULT; /* BUF-6 */
	uint64_t rel = offset - p->area_offset;
	uint64_t first = rel / p->granule;
	size_t j = bisect(p->live_first, p->nlive, first);
	if (rel % p->granule || j == p->nlive || p->live_first[j] != first)
		return -EINVAL; /* BUF-6: double free, or never handed out */
	uint64_t bytes = p->live_size[j];
	uint64_t count = granules(p, bytes);
	del_at(p->live_first, p->nlive, j);
	del_at(p->live_size, p->nlive, j);
	p->nlive--;
	p->free_granules += count;
	/* put [first, first + count) back, coalescing with its neighbours */
	size_t i = bisect(p->run_start, p->nruns, first);
	int prev = i > 0 && p->run_start[i - 1] + p->run_count[i - 1] == first;
	int next = i < p->nruns && first + count == p->run_start[i];
	if (prev && next) {
		p->run_count[i - 1] += count + p->run_count[i];
		del_at(p->run_start, p->nruns, i);
		del_at(p->run_count, p->nruns, i);
		p->nruns--;
	} else if (prev) {
		p->run_count[i - 1] += count;
	} else if (next) {
		p->run_start[i] = first;
		p->run_count[i] += count;
	} else {
		/* nruns <= nlive + 1 <= cap + 1 holds after this insert: no growth needed */
		ins_at(p->run_start, p->nruns, i, first);
		ins_at(p->run_count, p->nruns, i, count);
		p->nruns++;
	}
	if (size)
		*size = bytes;
	return 0;
}

uint64_t nk_bufpool_area_offset(const struct nk_bufpool *p)
{
	return p->area_offset;
}

uint64_t nk_bufpool_capacity(const struct nk_bufpool *p)
{
	return p->area_size;
}

uint64_t nk_bufpool_granule(const struct nk_bufpool *p)
{
	return p->granule;
}

uint64_t nk_bufpool_free_bytes(const struct nk_bufpool *p)
{
	return p->free_granules * p->granule;
}

uint64_t nk_bufpool_largest_free(const struct nk_bufpool *p)
{
	uint64_t best = 0;
	for (size_t i = 0; i < p->nruns; i++)
		if (p->run_count[i] > best)
			best = p->run_count[i];
	return best * p->granule;
}

size_t nk_bufpool_live_count(const struct nk_bufpool *p)
{
	return p->nlive;
}

size_t nk_bufpool_live(const struct nk_bufpool *p, struct nk_span *out, size_t max)
{
	size_t n = p->nlive < max ? p->nlive : max;
	for (size_t i = 0; i < n; i++) {
		out[i].offset = p->area_offset + p->live_first[i] * p->granule;
		out[i].size = p->live_size[i];
	}
	return n;
}
