// include/nk/device.h
struct nk_dev_header {
	char magic[8];
	uint16_t version;
	uint16_t header_size;
	uint32_t features;
	uint64_t total_size;
	uint8_t kind;
	uint8_t state;
	uint16_t n_qsets;
	uint32_t ring_entries;
	uint64_t qset_offset;
	uint64_t qset_stride;
	uint64_t data_offset;
	uint64_t data_size;
	uint64_t send_size;
	uint32_t buf_size;
	uint32_t owner_pid;
	uint32_t dev_id;
	uint8_t pad[172];
};
struct nk_geometry {
	uint32_t n_qsets;
	uint32_t ring_entries;
	uint64_t data_size;
	uint64_t send_size;
	uint32_t buf_size;
	uint32_t kind;
};
uint64_t nk_geo_ring_size(const struct nk_geometry *g);
uint64_t nk_geo_qset_stride(const struct nk_geometry *g);
uint64_t nk_geo_data_offset(const struct nk_geometry *g);
uint64_t nk_geo_total_size(const struct nk_geometry *g);
uint64_t nk_geo_bell_offset(const struct nk_geometry *g, uint32_t qset, uint32_t bell);
uint64_t nk_geo_ring_offset(const struct nk_geometry *g, uint32_t qset, uint32_t ring);
