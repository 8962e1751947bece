// include/nk/ring.h and include/nk/bell.h (static inline there; cffi wraps them)
struct nk_ring {
	uint32_t *tail;
	uint32_t *head;
	uint32_t *flags;
	struct nk_nqe *slots;
	uint32_t entries;
	uint32_t mask;
};
int nk_ring_init(struct nk_ring *r, void *base, uint32_t entries);
int64_t nk_ring_count(const struct nk_ring *r);
int64_t nk_ring_push(struct nk_ring *r, const struct nk_nqe *src, uint32_t n);
int nk_ring_consumer_sleeping(const struct nk_ring *r);
int64_t nk_ring_pop(struct nk_ring *r, struct nk_nqe *dst, uint32_t n);
int nk_ring_prepare_sleep(struct nk_ring *r);
void nk_ring_finish_sleep(struct nk_ring *r);
uint32_t nk_bell_value(uint32_t *bell);
int nk_bell_ring(uint32_t *bell);
int nk_bell_wait(uint32_t *bell, uint32_t expected, int64_t timeout_ns);
