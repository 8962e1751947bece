/* Device header checks (spec/device.md DEV-2, DEV-4, DEV-12..DEV-14); see include/nk/device.h.
 *
 * The header comes from another process (SEC-1): it is copied out of the region
 * once, then every check runs on the copy, in the order of reference/device.py
 * read_header, so the first fault reported is the one the reference reports.
 */
#include <errno.h>
#include <string.h>

#include "nk/device.h"

static int is_pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

/* DEV-12, in the order of reference Geometry.__post_init__; DEV-2's kind first,
 * because the reference converts it (Kind(h.kind)) before building the geometry. */
int nk_geometry_check(const struct nk_geometry *g)
{
	if (g->kind != NK_KIND_TENANT && g->kind != NK_KIND_NSM)
		return NK_DEV_BAD_KIND;
	if (g->n_qsets < 1 || g->n_qsets > NK_MAX_QSETS)
		return NK_DEV_BAD_N_QSETS;
	if (g->ring_entries < NK_MIN_RING_ENTRIES || g->ring_entries > NK_MAX_RING_ENTRIES ||
	    !is_pow2(g->ring_entries))
		return NK_DEV_BAD_RING_ENTRIES;
	if (g->buf_size < 64 || !is_pow2(g->buf_size))
		return NK_DEV_BAD_BUF_SIZE;
	if (g->data_size % g->buf_size || g->send_size % g->buf_size || g->send_size == 0 ||
	    g->send_size >= g->data_size)
		return NK_DEV_BAD_SIZES;
	return NK_DEV_OK;
}

int nk_dev_fault_errno(int fault)
{
	switch (fault) {
	case NK_DEV_OK:
		return 0;
	case NK_DEV_SHORT_HEADER:
	case NK_DEV_SHORT_REGION:
		return -EMSGSIZE;
	case NK_DEV_BAD_MAGIC:
		return -EBADMSG;
	case NK_DEV_BAD_VERSION:
		return -EPROTONOSUPPORT;
	default:
		return -EINVAL;
	}
}

/* data_offset + data_size, or 0 if it does not fit a u64 (no header can then
 * agree with it: the reference's unbounded total exceeds every u64 field). */
static uint64_t total_or_zero(const struct nk_geometry *g)
{
	uint64_t d = nk_geo_data_offset(g); /* < 2^32 within the DEV-12 limits */
	return g->data_size > UINT64_MAX - d ? 0 : d + g->data_size;
}

int nk_dev_check_header(const void *buf, uint64_t len, struct nk_geometry *out)
{
	struct nk_dev_header h;
	if (len < NK_DEV_HEADER_SIZE)
		return NK_DEV_SHORT_HEADER; /* DEV-14 */
	memcpy(&h, buf, sizeof(h)); /* one snapshot: the other side may be writing (SEC-1) */
	if (memcmp(h.magic, NK_DEV_MAGIC, sizeof(h.magic)))
		return NK_DEV_BAD_MAGIC; /* DEV-2 */
	if (h.version != NK_DEV_VERSION)
		return NK_DEV_BAD_VERSION; /* DEV-2 */
	struct nk_geometry g = {
		.n_qsets = h.n_qsets, .ring_entries = h.ring_entries, .data_size = h.data_size,
		.send_size = h.send_size, .buf_size = h.buf_size, .kind = h.kind,
	};
	int fault = nk_geometry_check(&g); /* DEV-2 kind, DEV-12 */
	if (fault)
		return fault;
	/* DEV-13: every derived field recomputed and compared */
	uint64_t total = total_or_zero(&g);
	if (h.header_size != NK_DEV_HEADER_SIZE)
		return NK_DEV_BAD_HEADER_SIZE;
	if (h.qset_offset != nk_geo_qset_offset(&g))
		return NK_DEV_BAD_QSET_OFFSET;
	if (h.qset_stride != nk_geo_qset_stride(&g))
		return NK_DEV_BAD_QSET_STRIDE;
	if (h.data_offset != nk_geo_data_offset(&g))
		return NK_DEV_BAD_DATA_OFFSET;
	if (total == 0 || h.total_size != total)
		return NK_DEV_BAD_TOTAL_SIZE;
	if (total > len)
		return NK_DEV_SHORT_REGION; /* DEV-14 */
	if (out)
		*out = g;
	return NK_DEV_OK;
}

int nk_dev_read_header(const void *buf, uint64_t len, struct nk_geometry *out)
{
	return nk_dev_fault_errno(nk_dev_check_header(buf, len, out));
}

int nk_dev_init_header(void *buf, uint64_t len, const struct nk_geometry *geo,
		       uint32_t owner_pid, uint32_t dev_id, uint32_t features)
{
	if (nk_geometry_check(geo))
		return -EINVAL; /* DEV-12: a creator must not build it */
	uint64_t total = total_or_zero(geo);
	if (total == 0 || len < total)
		return -EMSGSIZE; /* DEV-14 */
	uint64_t data_offset = nk_geo_data_offset(geo);
	/* DEV-4: bells, ring indices, flags and slots start at zero */
	memset((char *)buf + NK_DEV_HEADER_SIZE, 0, data_offset - NK_DEV_HEADER_SIZE);
	struct nk_dev_header h;
	memset(&h, 0, sizeof(h)); /* DEV-3: the unused bytes are zero when created */
	memcpy(h.magic, NK_DEV_MAGIC, sizeof(h.magic));
	h.version = NK_DEV_VERSION;
	h.header_size = NK_DEV_HEADER_SIZE;
	h.features = features;
	h.total_size = total;
	h.kind = (uint8_t)geo->kind;
	h.state = NK_STATE_INIT;
	h.n_qsets = (uint16_t)geo->n_qsets;
	h.ring_entries = geo->ring_entries;
	h.qset_offset = nk_geo_qset_offset(geo);
	h.qset_stride = nk_geo_qset_stride(geo);
	h.data_offset = data_offset;
	h.data_size = geo->data_size;
	h.send_size = geo->send_size;
	h.buf_size = geo->buf_size;
	h.owner_pid = owner_pid;
	h.dev_id = dev_id;
	memcpy(buf, &h, sizeof(h));
	return 0;
}
