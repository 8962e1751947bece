/* NQE v1: the 32-byte NetKernel Queue Element (spec/nqe.md).
 *
 * struct nk_nqe *is* the wire layout: packed, little-endian, 32 bytes, the
 * field offsets of reference/nqe.py's NQE_STRUCT (NQE-1, NQE-2). A test
 * (tests/test_fastpath_layout.py) checks sizeof/offsetof against the construct
 * declaration. Decoding is therefore a 32-byte copy plus the checks of
 * nk_nqe_check(); there is no separate "decoded" form.
 */
#ifndef NK_NQE_H
#define NK_NQE_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the fast path reads NQE fields in place: it needs a little-endian host (NQE-2)"
#endif

#define NK_NQE_SIZE 32
#define NK_REPLY_BIT 0x80
#define NK_OP_UNKNOWN_REPLY 0xFF
#define NK_SOCK_NONE 0
#define NK_CLOSE_ABORT 1

enum nk_op {
	/* socket calls */
	NK_OP_SOCKET = 0x01,
	NK_OP_BIND = 0x02,
	NK_OP_LISTEN = 0x03,
	NK_OP_CONNECT = 0x04,
	NK_OP_ACCEPT = 0x05,
	NK_OP_SEND = 0x06,
	NK_OP_SHUTDOWN = 0x07,
	NK_OP_CLOSE = 0x08,
	NK_OP_SETSOCKOPT = 0x09,
	NK_OP_GETSOCKOPT = 0x0A,
	NK_OP_GETSOCKNAME = 0x0B,
	NK_OP_GETPEERNAME = 0x0C,
	/* events */
	NK_OP_EV_DATA = 0x40,
	NK_OP_EV_FIN = 0x41,
	NK_OP_EV_ERROR = 0x42,
	NK_OP_EV_ACCEPTABLE = 0x43,
	/* control */
	NK_OP_ATTACH = 0x60,
	NK_OP_DETACH = 0x61,
	NK_OP_BUF_RETURN = 0x62,
	NK_OP_TENANT_MAP = 0x63,
	NK_OP_TENANT_UNMAP = 0x64,
};

struct __attribute__((packed)) nk_nqe {
	uint8_t op;          /*  0 */
	uint8_t qset;        /*  1 */
	uint8_t vm_id;       /*  2 */
	uint32_t sock_id;    /*  3 */
	uint64_t op_data;    /*  7: request argument, or signed result in a reply (NQE-13) */
	uint64_t data_ptr;   /* 15: offset into the tenant's data area, never a pointer */
	uint32_t size;       /* 23 */
	uint16_t tag;        /* 27: echoed in the reply (NQE-9) */
	uint8_t reserved[3]; /* 29: MUST be zero (NQE-4) */
};

_Static_assert(sizeof(struct nk_nqe) == NK_NQE_SIZE, "NQE-1: an NQE is 32 bytes");
_Static_assert(offsetof(struct nk_nqe, tag) == 27, "NQE-2: tag at byte 27");

/* Which field a rejected NQE was rejected for (NQEError.field in the reference). */
enum nk_nqe_field {
	NK_FIELD_NONE = 0,
	NK_FIELD_LENGTH = 1,
	NK_FIELD_OP = 2,
	NK_FIELD_RESERVED = 3,
};

/* NQE-7, NQE-8: is `op` a defined request, event, control op, or reply? Replies
 * exist for every op that is answered (all socket calls and control ops but
 * none of the events; BUF_RETURN only for rejections) and OP_UNKNOWN_REPLY. */
static inline int nk_op_is_answerable(uint8_t op)
{
	return (op >= NK_OP_SOCKET && op <= NK_OP_GETPEERNAME) ||
	       (op >= NK_OP_ATTACH && op <= NK_OP_TENANT_UNMAP);
}

static inline int nk_op_is_known(uint8_t op)
{
	if (op == NK_OP_UNKNOWN_REPLY)
		return 1;
	if (op & NK_REPLY_BIT)
		return nk_op_is_answerable(op & (uint8_t)~NK_REPLY_BIT);
	return nk_op_is_answerable(op) || (op >= NK_OP_EV_DATA && op <= NK_OP_EV_ACCEPTABLE);
}

/* The checks an NQE must pass once its 32 bytes are read (NQE-4, NQE-10, NQE-11),
 * in the reference's order: op first (-ENOSYS), then reserved (-EINVAL).
 * Returns 0 or -errno; *field (may be NULL) names the offending field. */
static inline int nk_nqe_check(const struct nk_nqe *n, int *field)
{
	int bad = NK_FIELD_NONE, err = 0;
	if (!nk_op_is_known(n->op)) {
		bad = NK_FIELD_OP;
		err = -ENOSYS;
	} else if (n->reserved[0] | n->reserved[1] | n->reserved[2]) {
		bad = NK_FIELD_RESERVED;
		err = -EINVAL;
	}
	if (field)
		*field = bad;
	return err;
}

/* op_data read as the signed result of a reply (NQE-13). */
static inline int64_t nk_nqe_result(const struct nk_nqe *n)
{
	return (int64_t)n->op_data;
}

#endif
