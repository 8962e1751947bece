// include/nk/ce.h: the running CoreEngine's switching loop
struct nk_ce_stats {
	uint64_t busy_passes;
	uint64_t sleeps;
	uint64_t wakeups;
	uint64_t timeouts;
	uint64_t switched;
	uint64_t delivered;
	uint64_t bells;
};
struct nk_ce;
struct nk_ce *nk_ce_new(const struct nk_engine_config *cfg);
void nk_ce_free(struct nk_ce *ce);
struct nk_engine *nk_ce_engine(struct nk_ce *ce);
int nk_ce_add_device(struct nk_ce *ce, const struct nk_geometry *geo, int ident, void *base);
int nk_ce_set_polled(struct nk_ce *ce, int kind, int ident, int polled);
int nk_ce_remove_device(struct nk_ce *ce, int kind, int ident);
int64_t nk_ce_poll(struct nk_ce *ce);
int nk_ce_run(struct nk_ce *ce, int64_t timeout_ns);
void nk_ce_interrupt(struct nk_ce *ce);
int nk_ce_broken(struct nk_ce *ce, uint8_t *kinds, uint8_t *idents, int max);
uint64_t nk_ce_pending(const struct nk_ce *ce);
uint32_t nk_ce_blocked_sources(const struct nk_ce *ce);
void nk_ce_get_stats(const struct nk_ce *ce, struct nk_ce_stats *out);
struct nk_ce_bench {
	void *tenant_base;
	struct nk_geometry tenant_geo;
	void *nsm_base;
	struct nk_geometry nsm_geo;
	uint32_t sock_id;
	uint32_t window;
	uint64_t sends;
	int64_t elapsed_ns;
	int64_t polling_ns;
};
int64_t nk_ce_bench_sends(struct nk_ce *ce, struct nk_ce_bench *b);
