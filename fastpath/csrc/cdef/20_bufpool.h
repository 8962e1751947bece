// include/nk/bufpool.h
struct nk_span {
	uint64_t offset;
	uint64_t size;
};
int nk_buf_within(uint64_t outer_off, uint64_t outer_size, uint64_t off, uint64_t size);
struct nk_span nk_buf_half(const struct nk_geometry *g, int receive);
int nk_buf_check_span(const struct nk_geometry *g, int receive, uint64_t off, uint64_t size);
int nk_buf_check_slice(const struct nk_geometry *g, uint64_t off, uint64_t size);
struct nk_bufpool;
int nk_bufpool_new(struct nk_bufpool **out, uint64_t area_offset, uint64_t area_size,
		   uint64_t granule);
int nk_bufpool_new_send(struct nk_bufpool **out, const struct nk_geometry *g);
int nk_bufpool_new_receive(struct nk_bufpool **out, const struct nk_geometry *g,
			   uint64_t slice_offset, uint64_t slice_size);
void nk_bufpool_delete(struct nk_bufpool *p);
int nk_bufpool_alloc(struct nk_bufpool *p, uint64_t size, uint64_t *offset);
int nk_bufpool_free(struct nk_bufpool *p, uint64_t offset, uint64_t *size);
uint64_t nk_bufpool_area_offset(const struct nk_bufpool *p);
uint64_t nk_bufpool_capacity(const struct nk_bufpool *p);
uint64_t nk_bufpool_granule(const struct nk_bufpool *p);
uint64_t nk_bufpool_free_bytes(const struct nk_bufpool *p);
uint64_t nk_bufpool_largest_free(const struct nk_bufpool *p);
size_t nk_bufpool_live_count(const struct nk_bufpool *p);
size_t nk_bufpool_live(const struct nk_bufpool *p, struct nk_span *out, size_t max);
