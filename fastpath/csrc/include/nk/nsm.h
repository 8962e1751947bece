/* ServiceLib and the kernel-stack NSM in C (spec/nsm.md NSM-*, spec/device.md DEV-8, BUF-*).
 *
 * A drop-in for netkernel.reference.servicelib + netkernel.reference.nsm_kernel:
 * Python attaches (engine.sock, RT-3) and maps the NSM device; everything per
 * NQE and per byte runs in nk_nsm_run(), with the GIL released.
 *
 *   struct nk_nsm *n = nk_nsm_new(base, len, "/dev/shm/netkernel/x", ctl_fd, stop_fd);
 *   int why = nk_nsm_run(n);   // NK_NSM_STOPPED or NK_NSM_LOST (or -errno)
 *   nk_nsm_free(n);            // closes every tenant socket, unmaps tenant areas
 *
 * Threads and sleeping: see the comment at the top of nsm.c.
 */
#ifndef NK_NSM_H
#define NK_NSM_H

#include <stdint.h>

struct nk_nsm;

enum nk_nsm_exit {
	NK_NSM_STOPPED = 0, /* stop_fd became readable, or nk_nsm_stop() */
	NK_NSM_LOST = 1,    /* the control connection ended: the CoreEngine is gone (NSM-2) */
};

struct nk_nsm_counters {
	uint64_t nqe_in;
	uint64_t nqe_out;
	uint64_t dropped;   /* replies and events read from the CoreEngine (NQE-10) */
	uint64_t malformed;
	uint64_t buf_return;
	uint64_t bell_wakeups;
	uint64_t sockets;   /* tenant sockets open now */
	uint64_t tenants;   /* tenant areas mapped now */
};

/* On-host pairing (spec/shm.md SHM-1..SHM-9): where a TCP connection between two
 * tenants of this NSM goes. KERNEL: always Linux TCP (the kernel NSM). AUTO: paired in
 * shared memory when the listener's accept queue has room, else Linux TCP. SHM: always
 * paired; a full accept queue refuses the connection. Connections with a peer that is
 * not a tenant of this NSM always use Linux TCP. */
enum nk_nsm_placement {
	NK_PLACE_KERNEL = 0,
	NK_PLACE_AUTO = 1,
	NK_PLACE_SHM = 2,
};

/* Per-tenant counters (multiplexing: one NSM serves many tenants). Readable from any
 * thread while nk_nsm_run() runs (relaxed atomics: each field is exact, the set is not
 * a snapshot). */
struct nk_nsm_tenant_counters {
	uint64_t sockets;       /* the tenant's sockets open now */
	uint64_t paired;        /* connections paired in shared memory, ever (both ends count) */
	uint64_t paired_now;    /* ends of paired connections open now */
	uint64_t shm_bytes_out; /* payload the tenant sent over paired connections */
	uint64_t shm_bytes_in;  /* payload the tenant received over paired connections */
	uint64_t stack_bytes_out; /* payload the tenant sent through the network stack */
	uint64_t stack_bytes_in;  /* payload the tenant received from the network stack */
};

/* base/len: the NSM device, already mapped and validated by the caller (it
 * stays the caller's). runtime: the instance directory holding vm-<V>.nk
 * (NSM-11). control_fd: the engine.sock connection, or -1. stop_fd: an fd
 * whose readability stops the loop (Python's signal wakeup fd), or -1.
 * NULL with errno set on failure (EINVAL: not an NSM device). */
struct nk_nsm *nk_nsm_new(void *base, uint64_t len, const char *runtime, int control_fd,
			  int stop_fd);
/* Receive tuning: the largest TCP EV_DATA (default 64 KiB) and the receive
 * bytes one socket may hold (0: half the tenant's slice, NSM-16 variation). */
void nk_nsm_set_rx(struct nk_nsm *n, uint32_t rx_chunk, uint64_t rx_cap);
/* Serve until stopped; returns enum nk_nsm_exit, or -errno (-EBADMSG: a ring of the
 * device has impossible indices, RING-10; the loop read or wrote no slot of it). */
int nk_nsm_run(struct nk_nsm *n);
/* From any thread: make nk_nsm_run() return NK_NSM_STOPPED soon. */
void nk_nsm_stop(struct nk_nsm *n);
void nk_nsm_get_counters(const struct nk_nsm *n, struct nk_nsm_counters *out);
/* Before nk_nsm_run(): enum nk_nsm_placement (default NK_PLACE_KERNEL). -EINVAL if unknown. */
int nk_nsm_set_placement(struct nk_nsm *n, int placement);
/* From any thread: tenant vm's counters; 0, or -ENOENT when vm is not mapped. */
int nk_nsm_get_tenant_counters(const struct nk_nsm *n, uint8_t vm,
			       struct nk_nsm_tenant_counters *out);
/* Close every socket (as close(2)), unmap every tenant area, free n. */
void nk_nsm_free(struct nk_nsm *n);

#endif
