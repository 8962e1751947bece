/* The NK device layout (spec/device.md DEV-*): header, queue sets, data area.
 *
 * struct nk_dev_header is the 256-byte header of reference/device.py's
 * HEADER_STRUCT, field for field (every field is naturally aligned, so no
 * packing is needed); tests/test_fastpath_layout.py checks the offsets.
 */
#ifndef NK_DEVICE_H
#define NK_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#define NK_DEV_MAGIC "NKDEVICE"
#define NK_DEV_VERSION 1
#define NK_CACHE_LINE 64
#define NK_DEV_HEADER_SIZE 256
#define NK_RING_HEADER_SIZE (3 * NK_CACHE_LINE)
#define NK_BELL_SIZE NK_CACHE_LINE
#define NK_PAGE 4096
#define NK_MAX_QSETS 255
#define NK_MIN_RING_ENTRIES 2
#define NK_MAX_RING_ENTRIES (1u << 16)

enum nk_kind { NK_KIND_TENANT = 1, NK_KIND_NSM = 2 };
enum nk_state { NK_STATE_INIT = 0, NK_STATE_READY = 1, NK_STATE_DETACHED = 2 };
enum nk_feature { NK_FEATURE_FUTEX_BELLS = 1, NK_FEATURE_HUGE_PAGES = 2, NK_FEATURE_POLLED = 4 };
enum nk_ring_id { NK_RING_JOB = 0, NK_RING_COMPLETION = 1, NK_RING_SEND = 2, NK_RING_RECEIVE = 3 };
enum nk_bell_id { NK_BELL_DEVICE = 0, NK_BELL_ENGINE = 1 };

struct nk_dev_header {
	char magic[8];          /*   0 */
	uint16_t version;       /*   8 */
	uint16_t header_size;   /*  10 */
	uint32_t features;      /*  12 */
	uint64_t total_size;    /*  16 */
	uint8_t kind;           /*  24 */
	uint8_t state;          /*  25 */
	uint16_t n_qsets;       /*  26 */
	uint32_t ring_entries;  /*  28 */
	uint64_t qset_offset;   /*  32 */
	uint64_t qset_stride;   /*  40 */
	uint64_t data_offset;   /*  48 */
	uint64_t data_size;     /*  56 */
	uint64_t send_size;     /*  64 */
	uint32_t buf_size;      /*  72 */
	uint32_t owner_pid;     /*  76 */
	uint32_t dev_id;        /*  80 */
	uint8_t pad[NK_DEV_HEADER_SIZE - 84];
};

_Static_assert(sizeof(struct nk_dev_header) == NK_DEV_HEADER_SIZE, "DEV-3: 256-byte header");

/* The sizes a device's creator chooses (reference Geometry); all else follows. */
struct nk_geometry {
	uint32_t n_qsets;
	uint32_t ring_entries;
	uint64_t data_size;
	uint64_t send_size;
	uint32_t buf_size;
	uint32_t kind;
};

static inline uint64_t nk_geo_ring_size(const struct nk_geometry *g)
{
	return NK_RING_HEADER_SIZE + (uint64_t)g->ring_entries * 32;
}

/* A queue set: two bells, then the four rings (DEV-7). */
static inline uint64_t nk_geo_qset_stride(const struct nk_geometry *g)
{
	return 2 * NK_BELL_SIZE + 4 * nk_geo_ring_size(g);
}

static inline uint64_t nk_geo_qset_offset(const struct nk_geometry *g)
{
	(void)g;
	return NK_DEV_HEADER_SIZE;
}

static inline uint64_t nk_geo_data_offset(const struct nk_geometry *g)
{
	uint64_t end = nk_geo_qset_offset(g) + g->n_qsets * nk_geo_qset_stride(g);
	return (end + NK_PAGE - 1) / NK_PAGE * NK_PAGE;
}

static inline uint64_t nk_geo_total_size(const struct nk_geometry *g)
{
	return nk_geo_data_offset(g) + g->data_size;
}

/* Offsets of a queue set's bell word and ring header; qset < n_qsets is the caller's to check. */
static inline uint64_t nk_geo_bell_offset(const struct nk_geometry *g, uint32_t qset, uint32_t bell)
{
	return nk_geo_qset_offset(g) + qset * nk_geo_qset_stride(g) + bell * NK_BELL_SIZE;
}

static inline uint64_t nk_geo_ring_offset(const struct nk_geometry *g, uint32_t qset, uint32_t ring)
{
	return nk_geo_qset_offset(g) + qset * nk_geo_qset_stride(g) + 2 * NK_BELL_SIZE +
	       ring * nk_geo_ring_size(g);
}

/* Why a header was refused, in the order the checks run (reference/device.py
 * read_header): the Python layer turns each into the reference's message. */
enum nk_dev_fault {
	NK_DEV_OK = 0,
	NK_DEV_SHORT_HEADER = 1,    /* DEV-14: region shorter than 256 bytes */
	NK_DEV_BAD_MAGIC = 2,       /* DEV-2 */
	NK_DEV_BAD_VERSION = 3,     /* DEV-2 */
	NK_DEV_BAD_KIND = 4,        /* DEV-2: neither tenant nor NSM */
	NK_DEV_BAD_N_QSETS = 5,     /* DEV-12: the limits, in Geometry's order */
	NK_DEV_BAD_RING_ENTRIES = 6,
	NK_DEV_BAD_BUF_SIZE = 7,
	NK_DEV_BAD_SIZES = 8,       /* data_size / send_size */
	NK_DEV_BAD_HEADER_SIZE = 9, /* DEV-13: derived fields, in the reference's order */
	NK_DEV_BAD_QSET_OFFSET = 10,
	NK_DEV_BAD_QSET_STRIDE = 11,
	NK_DEV_BAD_DATA_OFFSET = 12,
	NK_DEV_BAD_TOTAL_SIZE = 13,
	NK_DEV_SHORT_REGION = 14,   /* DEV-14: region shorter than total_size */
};

/* device.c */

/* DEV-12 limits of a geometry (and DEV-2's kind): NK_DEV_OK or the first fault. */
int nk_geometry_check(const struct nk_geometry *g);

/* The errno a fault is reported with: -EMSGSIZE (short), -EBADMSG (magic),
 * -EPROTONOSUPPORT (version), -EINVAL (kind, limits, derived fields); 0 for OK. */
int nk_dev_fault_errno(int fault);

/* Validate the header of the region [buf, buf+len) and fill *out (may be NULL)
 * (DEV-2, DEV-12..DEV-14, SEC-1): NK_DEV_OK or the first fault, in the order
 * of reference/device.py read_header. No offset of the region is followed. */
int nk_dev_check_header(const void *buf, uint64_t len, struct nk_geometry *out);

/* The same, as 0 or -errno (nk_dev_fault_errno). */
int nk_dev_read_header(const void *buf, uint64_t len, struct nk_geometry *out);

/* Write a fresh header (state INIT) and zero every bell, ring and slot (DEV-4).
 * 0, -EINVAL for a geometry outside DEV-12, -EMSGSIZE if len < total size (DEV-14). */
int nk_dev_init_header(void *buf, uint64_t len, const struct nk_geometry *geo,
		       uint32_t owner_pid, uint32_t dev_id, uint32_t features);

#endif
