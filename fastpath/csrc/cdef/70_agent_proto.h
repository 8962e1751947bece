// include/nk/agent_proto.h: the preloaded GuestLib's library <-> agent records, declared
// so tests/test_agent.py can hold its Python mirror to the C layout and numbers.
#define NK_AG_VERSION ...
#define NK_AG_DATA_MAX ...
#define NK_AG_KIND_STREAM ...
#define NK_AG_KIND_DGRAM ...
#define NK_AG_KIND_LISTEN ...
#define NK_AG_KIND_INET6 ...
enum nk_ag_op {
	NK_AG_HELLO = 1,
	NK_AG_SOCKET = 2,
	NK_AG_LOOKUP = 3,
	NK_AG_BIND = 4,
	NK_AG_LISTEN = 5,
	NK_AG_CONNECT = 6,
	NK_AG_SETSOCKOPT = 7,
	NK_AG_GETSOCKOPT = 8,
	NK_AG_GETSOCKNAME = 9,
	NK_AG_GETPEERNAME = 10,
	NK_AG_SHUTDOWN = 11,
	NK_AG_NREAD = 12,
};
struct nk_ag_req {
	uint32_t op;
	uint32_t len;
	uint64_t ino;
	int64_t arg[3];
	uint8_t data[256];
};
struct nk_ag_rep {
	int64_t result;
	int64_t arg0;
	uint32_t len;
	uint32_t pad;
	uint8_t data[256];
};
struct nk_ag_accept {
	uint32_t addrlen;
	uint8_t addr[28];
};
struct nk_ag_dgram {
	uint32_t addrlen;
	uint8_t addr[28];
};
