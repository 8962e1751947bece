// include/nk/nsm.h: ServiceLib + the kernel-stack NSM
struct nk_nsm;
struct nk_nsm_counters {
	uint64_t nqe_in;
	uint64_t nqe_out;
	uint64_t dropped;
	uint64_t malformed;
	uint64_t buf_return;
	uint64_t bell_wakeups;
	uint64_t sockets;
	uint64_t tenants;
};
enum nk_nsm_placement { NK_PLACE_KERNEL = 0, NK_PLACE_AUTO = 1, NK_PLACE_SHM = 2 };
struct nk_nsm_tenant_counters {
	uint64_t sockets;
	uint64_t paired;
	uint64_t paired_now;
	uint64_t shm_bytes_out;
	uint64_t shm_bytes_in;
	uint64_t stack_bytes_out;
	uint64_t stack_bytes_in;
};
int nk_nsm_set_placement(struct nk_nsm *n, int placement);
int nk_nsm_get_tenant_counters(const struct nk_nsm *n, uint8_t vm,
			       struct nk_nsm_tenant_counters *out);
struct nk_nsm *nk_nsm_new(void *base, uint64_t len, const char *runtime, int control_fd,
			  int stop_fd);
void nk_nsm_set_rx(struct nk_nsm *n, uint32_t rx_chunk, uint64_t rx_cap);
int nk_nsm_run(struct nk_nsm *n);
void nk_nsm_stop(struct nk_nsm *n);
void nk_nsm_get_counters(const struct nk_nsm *n, struct nk_nsm_counters *out);
void nk_nsm_free(struct nk_nsm *n);
