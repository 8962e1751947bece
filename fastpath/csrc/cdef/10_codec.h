// include/nk/nqe.h, the codec half (nqe.c)
int nk_nqe_decode(const void *raw, size_t len, struct nk_nqe *out, int *field);
int nk_nqe_encode(const struct nk_nqe *n, void *raw32);
size_t nk_nqe_decode_batch(const void *raw, size_t n, struct nk_nqe *out, int32_t *status);
size_t nk_nqe_encode_batch(const struct nk_nqe *in, size_t n, void *raw, int32_t *status);
int nk_nqe_error_reply(const void *raw, size_t len, struct nk_nqe *reply);
struct nk_nqe_wide {
	uint64_t op;
	uint64_t qset;
	uint64_t vm_id;
	uint64_t sock_id;
	uint64_t op_data;
	uint64_t data_ptr;
	uint64_t size;
	uint64_t tag;
	uint32_t reserved;
	uint32_t overflow;
};
enum nk_nqe_field {
	NK_FIELD_NONE = 0,
	NK_FIELD_LENGTH = 1,
	NK_FIELD_OP = 2,
	NK_FIELD_RESERVED = 3,
};
enum nk_nqe_wide_field {
	NK_FIELD_QSET = 4,
	NK_FIELD_VM_ID = 5,
	NK_FIELD_SOCK_ID = 6,
	NK_FIELD_OP_DATA = 7,
	NK_FIELD_DATA_PTR = 8,
	NK_FIELD_SIZE = 9,
	NK_FIELD_TAG = 10,
};
int nk_nqe_encode_wide(const struct nk_nqe_wide *w, void *raw32, int *field);
int nk_nqe_decode_wide(const void *raw, size_t len, struct nk_nqe_wide *out, int *field);
size_t nk_nqe_decode_wide_batch(const void *raw, size_t n, struct nk_nqe_wide *out,
				int32_t *status);
size_t nk_nqe_encode_wide_batch(const struct nk_nqe_wide *in, size_t n, void *raw,
				int32_t *status);
int nk_nqe_decode_fields(const void *raw, size_t len, uint64_t *fields, int *field);
int nk_nqe_encode_fields(void *raw32, int *field, uint64_t op, uint64_t qset, uint64_t vm_id,
			 uint64_t sock_id, uint64_t op_data, uint64_t data_ptr, uint64_t size,
			 uint64_t tag, uint32_t reserved, uint32_t overflow);
struct nk_sockaddr {
	uint16_t family;
	uint16_t port;
	uint32_t flowinfo;
	uint32_t scope_id;
	uint8_t addr[16];
};
int nk_sockaddr_pack(const struct nk_sockaddr *a, void *out, size_t cap);
int nk_sockaddr_unpack(const void *raw, size_t len, struct nk_sockaddr *out);
int nk_sockaddr_pack_text(uint64_t family, const char *host, size_t host_len, uint64_t port,
			  uint64_t flowinfo, uint64_t scope_id, void *out, size_t cap);
int nk_inet_parse(int family, const char *s, size_t len, uint8_t *addr);
int nk_inet_format(int family, const uint8_t *addr, char *buf, size_t cap);
#define NK_HOST_MAX 46
