// include/nk/engine.h (the CoreEngine's switching core)
struct nk_engine;
struct nk_engine_config {
	uint32_t slices;       
	uint32_t max_inflight; 
	uint8_t assign[256];   
};
struct nk_out {
	uint8_t kind, ident, qset, ring;
	struct nk_nqe nqe;
};
struct nk_counters {
	uint64_t nqes_in, nqes_out, bytes_in, bytes_out, rejected, stale;
	uint64_t ops[256];
};
struct nk_conn_info {
	uint8_t vm, tqset, nsm, nqset;
	uint32_t tsock, nsock;
};
struct nk_grant_info {
	uint8_t vm, nsm, ready, pad;
	uint32_t held; 
	uint64_t offset, size;
};
struct nk_flight_info {
	uint8_t nsm, nqset, vm, tqset;
	uint32_t nsock, tsock;
	uint16_t tag;
	uint8_t opens, held;
	uint8_t open_vm, open_tqset, open_nsm, open_nqset;
	uint32_t open_tsock, open_nsock;
	struct nk_nqe request; 
	struct nk_nqe fwd;     
	uint8_t fwd_qset, fwd_ring, pad[2];
};
struct nk_span_info {
	uint64_t offset, size;
	uint8_t nsm, pad[7];
};
struct nk_drain_info {
	uint8_t nsm, vm, pad[2];
	uint32_t sock;
};
enum nk_ledger_part { NK_LEDGER_SLICES = 0, NK_LEDGER_SENT = 1, NK_LEDGER_HELD = 2 };
struct nk_engine *nk_engine_new(const struct nk_engine_config *cfg);
void nk_engine_free(struct nk_engine *e);
struct nk_engine *nk_engine_clone(const struct nk_engine *e);
int nk_engine_attach(struct nk_engine *e, const struct nk_geometry *geo, int ident);
int nk_engine_detach(struct nk_engine *e, uint8_t kind, uint8_t ident);
int nk_engine_switch(struct nk_engine *e, uint8_t kind, uint8_t ident, uint8_t qset,
		     uint8_t ring, const struct nk_nqe *in);
const struct nk_out *nk_engine_outputs(const struct nk_engine *e, uint32_t *n);
int nk_engine_counters(const struct nk_engine *e, uint8_t kind, uint8_t ident,
		       struct nk_counters *out);
int nk_engine_open_sockets(const struct nk_engine *e, uint8_t kind, uint8_t ident);
void nk_engine_set_max_inflight(struct nk_engine *e, int64_t limit); 
void nk_engine_set_policy_choice(struct nk_engine *e, int nsm);
int nk_engine_geometry(const struct nk_engine *e, uint8_t kind, uint8_t ident,
		       struct nk_geometry *out); 
uint32_t nk_engine_in_flight(const struct nk_engine *e);
uint32_t nk_engine_sockets(const struct nk_engine *e);
uint32_t nk_engine_table(const struct nk_engine *e, struct nk_conn_info *out, uint32_t max);
uint32_t nk_engine_grants(const struct nk_engine *e, struct nk_grant_info *out, uint32_t max);
int nk_engine_grant_held(const struct nk_engine *e, uint8_t vm, uint8_t nsm, uint64_t *out,
			 uint32_t max);
uint32_t nk_engine_flights(const struct nk_engine *e, struct nk_flight_info *out, uint32_t max);
uint32_t nk_engine_draining(const struct nk_engine *e, struct nk_drain_info *out, uint32_t max);
int nk_engine_ledger(const struct nk_engine *e, uint8_t vm, int part, struct nk_span_info *out,
		     uint32_t max); 
uint32_t nk_engine_next_sock(const struct nk_engine *e, uint8_t nsm); 
struct nk_ledger;
struct nk_ledger *nk_ledger_new(const struct nk_geometry *g); 
void nk_ledger_free(struct nk_ledger *l);
struct nk_ledger *nk_ledger_clone(const struct nk_ledger *l);
int nk_ledger_grant(struct nk_ledger *l, uint8_t nsm, uint64_t off, uint64_t size);
int nk_ledger_lend_send(struct nk_ledger *l, uint64_t off, uint64_t size);
int nk_ledger_settle_send(struct nk_ledger *l, uint64_t off, uint64_t size);
int nk_ledger_lend_receive(struct nk_ledger *l, uint8_t nsm, uint64_t off, uint64_t size);
int nk_ledger_return_receive(struct nk_ledger *l, uint64_t off, uint64_t size); 
int nk_ledger_list(const struct nk_ledger *l, int part, struct nk_span_info *out, uint32_t max);
struct nk_table;
struct nk_table *nk_table_new(void);
void nk_table_free(struct nk_table *t);
struct nk_table *nk_table_clone(const struct nk_table *t);
int nk_table_insert(struct nk_table *t, const struct nk_conn_info *c);
int nk_table_remove_tenant(struct nk_table *t, uint8_t vm, uint8_t qset, uint32_t sock);
int nk_table_lookup(const struct nk_table *t, int nsm_side, uint8_t owner, uint8_t qset,
		    uint32_t sock, struct nk_conn_info *out); 
uint32_t nk_table_list(const struct nk_table *t, struct nk_conn_info *out, uint32_t max);
uint32_t nk_table_detach(struct nk_table *t, int nsm_side, uint8_t id);
