// include/nk/tenant.h: the minimal synchronous C tenant; include/nk/bench.h: its benchmark
typedef int... socklen_t;
struct sockaddr;
struct nk_tenant;
struct nk_tenant_opts {
	int64_t spin_ns;
	uint32_t max_sends;
	int control_fd;
	uint32_t send_batch;
};
struct nk_tenant_stats {
	uint64_t requests;
	uint64_t replies;
	uint64_t unmatched;
	uint64_t events;
	uint64_t buf_returns;
	uint64_t bells;
	uint64_t sleeps;
	uint64_t spins;
	uint64_t waits;
};
int nk_tenant_init(struct nk_tenant **out, void *base, uint64_t len,
		   const struct nk_tenant_opts *opts);
int nk_tenant_exit(struct nk_tenant *t, int64_t timeout_ns);
int nk_tenant_socket(struct nk_tenant *t, int domain, int type, int protocol);
int nk_tenant_bind(struct nk_tenant *t, int s, const struct sockaddr *addr, socklen_t len);
int nk_tenant_listen(struct nk_tenant *t, int s, int backlog);
int nk_tenant_accept(struct nk_tenant *t, int s, struct sockaddr *addr, socklen_t *len);
int nk_tenant_connect(struct nk_tenant *t, int s, const struct sockaddr *addr, socklen_t len);
int nk_tenant_setsockopt(struct nk_tenant *t, int s, int level, int name, const void *val,
			 socklen_t len);
int nk_tenant_getsockname(struct nk_tenant *t, int s, struct sockaddr *addr, socklen_t *len);
ssize_t nk_tenant_send(struct nk_tenant *t, int s, const void *buf, size_t len, int flags);
ssize_t nk_tenant_recv(struct nk_tenant *t, int s, void *buf, size_t len, int flags);
int nk_tenant_shutdown(struct nk_tenant *t, int s, int how);
int nk_tenant_close(struct nk_tenant *t, int s);
int nk_tenant_wait(struct nk_tenant *t, int64_t timeout_ns);
int nk_tenant_poll(struct nk_tenant *t);
void nk_tenant_get_stats(const struct nk_tenant *t, struct nk_tenant_stats *out);
void nk_tenant_set_spin(struct nk_tenant *t, int64_t spin_ns);
struct nk_bench_result {
	uint64_t bytes;
	uint64_t count;
	double seconds;
	uint64_t checksum;
};
int nk_bench_listen(struct nk_tenant *t, uint16_t *port);
int nk_bench_bulk_recv(struct nk_tenant *t, int listener, uint32_t bufsize, int checksum,
		       struct nk_bench_result *r);
int nk_bench_bulk_send(struct nk_tenant *t, uint16_t port, uint32_t msg_size, double seconds,
		       uint64_t total, int checksum, struct nk_bench_result *r);
int nk_bench_rr_server(struct nk_tenant *t, int listener, uint32_t size,
		       struct nk_bench_result *r);
int nk_bench_rr_client(struct nk_tenant *t, uint16_t port, uint32_t size, double seconds,
		       struct nk_bench_result *r);
int nk_bench_call_rtt(struct nk_tenant *t, uint32_t calls, struct nk_bench_result *r);
