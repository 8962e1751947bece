/* Benchmark workers for bench/kernel_nsm.py: bulk sender/receiver and
 * request/response client/server, each over plain Linux sockets (t == NULL,
 * "direct") or over the C tenant ("netkernel"), with the same loop code.
 *
 * Every call runs to the end without Python (cffi releases the GIL) and
 * returns 0 or -errno; a handle is a descriptor (direct) or a socket ID. */
#ifndef NK_BENCH_H
#define NK_BENCH_H

#include <stdint.h>

#include "tenant.h"

struct nk_bench_result {
	uint64_t bytes;   /* bulk: bytes sent / received */
	uint64_t count;   /* rr: round trips (client), requests served (server) */
	double seconds;   /* bulk receiver: first byte to EOF; rr client: the loop */
	uint64_t checksum; /* FNV-1a of the bytes (bulk, when asked): a transfer check */
};

/* A listening TCP socket on 127.0.0.1, port chosen by the stack: the handle, *port. */
int nk_bench_listen(struct nk_tenant *t, uint16_t *port);
/* Accept one connection, read it to EOF in bufsize reads. */
int nk_bench_bulk_recv(struct nk_tenant *t, int listener, uint32_t bufsize, int checksum,
		       struct nk_bench_result *r);
/* Connect to port, write msg_size-byte messages for `seconds` (or `total` bytes if
 * non-zero), then close. */
int nk_bench_bulk_send(struct nk_tenant *t, uint16_t port, uint32_t msg_size, double seconds,
		       uint64_t total, int checksum, struct nk_bench_result *r);
/* Answer each size-byte request with size bytes until the client closes. */
int nk_bench_rr_server(struct nk_tenant *t, int listener, uint32_t size,
		       struct nk_bench_result *r);
/* size bytes out, size bytes back, for `seconds`. */
int nk_bench_rr_client(struct nk_tenant *t, uint16_t port, uint32_t size, double seconds,
		       struct nk_bench_result *r);

/* `calls` GETSOCKNAMEs in a row: one request's round trip through the CoreEngine and
 * the NSM and back (netkernel), or one getsockname(2) (direct). */
int nk_bench_call_rtt(struct nk_tenant *t, uint32_t calls, struct nk_bench_result *r);

#endif
