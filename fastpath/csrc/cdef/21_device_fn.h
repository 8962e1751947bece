// include/nk/device.h: header checks and creation (device.c)
enum nk_dev_fault {
	NK_DEV_OK = 0,
	NK_DEV_SHORT_HEADER = 1,
	NK_DEV_BAD_MAGIC = 2,
	NK_DEV_BAD_VERSION = 3,
	NK_DEV_BAD_KIND = 4,
	NK_DEV_BAD_N_QSETS = 5,
	NK_DEV_BAD_RING_ENTRIES = 6,
	NK_DEV_BAD_BUF_SIZE = 7,
	NK_DEV_BAD_SIZES = 8,
	NK_DEV_BAD_HEADER_SIZE = 9,
	NK_DEV_BAD_QSET_OFFSET = 10,
	NK_DEV_BAD_QSET_STRIDE = 11,
	NK_DEV_BAD_DATA_OFFSET = 12,
	NK_DEV_BAD_TOTAL_SIZE = 13,
	NK_DEV_SHORT_REGION = 14,
};
int nk_geometry_check(const struct nk_geometry *g);
int nk_dev_fault_errno(int fault);
int nk_dev_check_header(const void *buf, uint64_t len, struct nk_geometry *out);
int nk_dev_read_header(const void *buf, uint64_t len, struct nk_geometry *out);
int nk_dev_init_header(void *buf, uint64_t len, const struct nk_geometry *geo,
		       uint32_t owner_pid, uint32_t dev_id, uint32_t features);
// include/nk/bell.h: futex_waitv with a relative timeout (static inline there)
int nk_bell_waitv_ns(uint32_t *const *bells, const uint32_t *expected, unsigned n,
		     int64_t timeout_ns);
// include/nk/ring.h: push and pop on byte strings (static inline there)
int64_t nk_ring_push_bytes(struct nk_ring *r, const char *src, uint32_t n);
int64_t nk_ring_pop_bytes(struct nk_ring *r, char *dst, uint32_t n);
