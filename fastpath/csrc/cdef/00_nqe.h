// cffi: packed
// The NQE as cffi sees it (include/nk/nqe.h); packed like the wire.
struct nk_nqe {
	uint8_t op;
	uint8_t qset;
	uint8_t vm_id;
	uint32_t sock_id;
	uint64_t op_data;
	uint64_t data_ptr;
	uint32_t size;
	uint16_t tag;
	uint8_t reserved[3];
};
int nk_op_is_answerable(uint8_t op);
int nk_op_is_known(uint8_t op);
int nk_nqe_check(const struct nk_nqe *n, int *field);
int64_t nk_nqe_result(const struct nk_nqe *n);
