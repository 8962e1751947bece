/* Buffers in a device's data area (spec/device.md BUF-*, DEV-11; spec/nqe.md NQE-6, NQE-14).
 *
 * Sans-IO like reference/bufpool.py: it hands out and takes back offsets into
 * the data area and never touches the bytes. Two pieces here:
 *
 *   - bounds checks every receiver of an NQE makes before it dereferences a
 *     buffer (static inline: the CoreEngine and the Ledger use them per NQE);
 *   - struct nk_bufpool, the first-fit allocator of granule-aligned buffers
 *     inside one span (BUF-2): the tenant's over its send half (BUF-1, BUF-3),
 *     an NSM's over the receive slice it was granted (BUF-4, BUF-8).
 *
 * Every offset is a u64 counted from the start of the data area; no sum
 * offset + size is ever formed where it could wrap (NQE-14).
 */
#ifndef NK_BUFPOOL_H
#define NK_BUFPOOL_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "device.h"

/* A buffer: size bytes at offset in the data area (NQE-6). */
struct nk_span {
	uint64_t offset;
	uint64_t size;
};

/* [off, off+size) lies in [outer_off, outer_off+outer_size), with no overflow
 * (NQE-14): never form off + size, compare size with the room left. */
static inline int nk_buf_within(uint64_t outer_off, uint64_t outer_size, uint64_t off,
				uint64_t size)
{
	if (off < outer_off)
		return 0;
	uint64_t into = off - outer_off;
	return into <= outer_size && size <= outer_size - into;
}

/* DEV-11: the send half [0, send_size), the receive half [send_size, data_size). */
static inline struct nk_span nk_buf_half(const struct nk_geometry *g, int receive)
{
	struct nk_span s = { 0, g->send_size };
	if (receive) {
		s.offset = g->send_size;
		s.size = g->data_size - g->send_size;
	}
	return s;
}

/* NQE-6, NQE-14: 0, or -EFAULT for a buffer outside the half. Size 0 names no buffer. */
static inline int nk_buf_check_span(const struct nk_geometry *g, int receive, uint64_t off,
				    uint64_t size)
{
	struct nk_span h = nk_buf_half(g, receive);
	if (size == 0)
		return 0;
	return nk_buf_within(h.offset, h.size, off, size) ? 0 : -EFAULT;
}

/* BUF-8: a receive slice lies in the receive half (-EFAULT) on whole granules (-EINVAL). */
static inline int nk_buf_check_slice(const struct nk_geometry *g, uint64_t off, uint64_t size)
{
	struct nk_span h = nk_buf_half(g, 1);
	if (size == 0 || !nk_buf_within(h.offset, h.size, off, size))
		return -EFAULT;
	if (off % g->buf_size || size % g->buf_size)
		return -EINVAL;
	return 0;
}

/* The allocator (bufpool.c); opaque, made by nk_bufpool_new and freed by nk_bufpool_delete. */
struct nk_bufpool;

/* An allocator over [area_offset, area_offset + area_size) in granules of
 * `granule` bytes. 0; -EINVAL if granule is not a power of two, or the area is
 * empty, off granules, or ends past 2^64; -ENOMEM. */
int nk_bufpool_new(struct nk_bufpool **out, uint64_t area_offset, uint64_t area_size,
		   uint64_t granule);
/* The tenant's allocator over its send half (BUF-1, BUF-3). */
int nk_bufpool_new_send(struct nk_bufpool **out, const struct nk_geometry *g);
/* An NSM's allocator over the slice a TENANT_MAP granted it (BUF-1, BUF-4, BUF-8):
 * nk_buf_check_slice's errors, then nk_bufpool_new's. */
int nk_bufpool_new_receive(struct nk_bufpool **out, const struct nk_geometry *g,
			   uint64_t slice_offset, uint64_t slice_size);
void nk_bufpool_delete(struct nk_bufpool *p);

/* A buffer of `size` bytes at the lowest free run that fits (first fit, BUF-2):
 * 0 and *offset; -ENOSPC if no free run is long enough now (BUF-7: the caller
 * stops reading, never drops); -EINVAL for 0 or more than the area (BUF-9); -ENOMEM. */
int nk_bufpool_alloc(struct nk_bufpool *p, uint64_t size, uint64_t *offset);

/* Give back the live buffer that starts at `offset` (BUF-6): 0 and *size (may be
 * NULL); -EFAULT outside the area; -EINVAL if no live buffer starts there.
 * Never allocates memory, so it cannot fail with -ENOMEM. */
int nk_bufpool_free(struct nk_bufpool *p, uint64_t offset, uint64_t *size);

uint64_t nk_bufpool_area_offset(const struct nk_bufpool *p);
uint64_t nk_bufpool_capacity(const struct nk_bufpool *p);    /* bytes of the area */
uint64_t nk_bufpool_granule(const struct nk_bufpool *p);
uint64_t nk_bufpool_free_bytes(const struct nk_bufpool *p);  /* bytes in free granules */
uint64_t nk_bufpool_largest_free(const struct nk_bufpool *p); /* largest alloc that fits now */
size_t nk_bufpool_live_count(const struct nk_bufpool *p);
/* Up to max live buffers, by offset, into out; returns how many were written. */
size_t nk_bufpool_live(const struct nk_bufpool *p, struct nk_span *out, size_t max);

#endif
