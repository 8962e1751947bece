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

/* ---- the codec (nqe.c) ------------------------------------------------------------
 *
 * Everything below is plain C with no Python dependency: libnetkernel.so, the
 * CoreEngine, the LD_PRELOAD GuestLib and the cffi binding (fastpath/nqe.py)
 * all call the same functions. Errors are 0 or -errno, with the reference's
 * errnos (reference/nqe.py): a rejected NQE's errno is what a receiver
 * reports for it (NQE-13). */

/* NQE-1, NQE-10, NQE-11, NQE-12: decode `len` bytes into *out. Returns 0, or
 * -EINVAL (len != 32: field LENGTH; non-zero reserved bytes: field RESERVED)
 * or -ENOSYS (unknown op: field OP), the first failing check in the order of
 * spec/nqe.md section 5. *field (may be NULL) names the field. *out is written
 * only when len == 32, and then holds the raw fields even on failure. */
int nk_nqe_decode(const void *raw, size_t len, struct nk_nqe *out, int *field);

/* NQE-1, NQE-4, NQE-11: the 32 bytes of *n into raw32. Refuses (nothing is
 * written) with -ENOSYS for an unknown op, -EINVAL for non-zero reserved
 * (every field fits its width by type: NQE-5 is nk_nqe_encode_wide's). */
int nk_nqe_encode(const struct nk_nqe *n, void *raw32);

/* Batch forms for the CoreEngine and the benchmark: `n` NQEs, 32 bytes each.
 * status[i] is what nk_nqe_decode / nk_nqe_encode return for NQE i (the field
 * follows from it: -ENOSYS is OP, -EINVAL is RESERVED). decode_batch copies
 * every NQE to out[i] (out may be NULL: check only); encode_batch writes 32
 * zero bytes for a refused NQE, so a refused slot can never pass as valid
 * (a zero op is unknown, NQE-7). Both return the number of NQEs accepted.
 * raw and out/in must not overlap. */
size_t nk_nqe_decode_batch(const void *raw, size_t n, struct nk_nqe *out, int32_t *status);
size_t nk_nqe_encode_batch(const struct nk_nqe *in, size_t n, void *raw, int32_t *status);

/* NQE-10, NQE-11, NQE-12: what a receiver answers to `len` bytes that
 * nk_nqe_decode rejected. Returns 1 with the reply in *reply, 0 when the NQE
 * is dropped without answer (not 32 bytes, a reply, an event), or -EINVAL if
 * the bytes are a valid NQE: there is nothing to reject. */
int nk_nqe_error_reply(const void *raw, size_t len, struct nk_nqe *reply);

/* An NQE whose values are not yet known to fit their fields: every integer
 * widened to 64 bits, as a binding (the Python NQE) holds them. `overflow` bit
 * i (i = 0 op .. 7 tag) marks a value that does not even fit 64 bits or is no
 * unsigned integer; `reserved` is bytes 29-31 little-endian, and any value
 * above 0xFFFFFF stands for "not three zero bytes". */
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

/* Field codes after NK_FIELD_RESERVED, for the width checks of NQE-5. */
enum nk_nqe_wide_field {
	NK_FIELD_QSET = 4,
	NK_FIELD_VM_ID = 5,
	NK_FIELD_SOCK_ID = 6,
	NK_FIELD_OP_DATA = 7,
	NK_FIELD_DATA_PTR = 8,
	NK_FIELD_SIZE = 9,
	NK_FIELD_TAG = 10,
};

/* NQE-5 then NQE-11, NQE-4: the reference's pack() checks in its order (every
 * width, op .. tag, then the op, then the reserved bytes) and the 32 bytes.
 * Returns 0 or -errno with *field set; nothing is written on failure. */
int nk_nqe_encode_wide(const struct nk_nqe_wide *w, void *raw32, int *field);
/* nk_nqe_decode, with the fields widened into *out (written only if accepted). */
int nk_nqe_decode_wide(const void *raw, size_t len, struct nk_nqe_wide *out, int *field);
/* Batch forms of the two above; status[i] = 0 or -errno; return the number accepted.
 * decode_wide_batch fills out[i] for every NQE (reserved as read). */
size_t nk_nqe_decode_wide_batch(const void *raw, size_t n, struct nk_nqe_wide *out,
				int32_t *status);
size_t nk_nqe_encode_wide_batch(const struct nk_nqe_wide *in, size_t n, void *raw,
				int32_t *status);

/* The same two for bindings that hold an NQE as eight integers (op .. tag, in
 * declaration order): decode_fields fills fields[8] (only if accepted);
 * encode_fields takes them as arguments, with `reserved` and `overflow` as
 * in struct nk_nqe_wide. Same returns and *field as the wide forms. */
int nk_nqe_decode_fields(const void *raw, size_t len, uint64_t *fields, int *field);
int nk_nqe_encode_fields(void *raw32, int *field, uint64_t op, uint64_t qset, uint64_t vm_id,
			 uint64_t sock_id, uint64_t op_data, uint64_t data_ptr, uint64_t size,
			 uint64_t tag, uint32_t reserved, uint32_t overflow);

/* ---- addresses in data buffers (NQE-15) ---------------------------------------- */

#define NK_AF_INET 2
#define NK_AF_INET6 10
#define NK_SOCKADDR_IN_SIZE 16
#define NK_SOCKADDR_IN6_SIZE 28
#define NK_HOST_MAX 46 /* INET6_ADDRSTRLEN: the longest text nk_inet_format writes, + NUL */

/* An INET address, fields in host order, the address in network order
 * (AF_INET: addr[0..3]). */
struct nk_sockaddr {
	uint16_t family;
	uint16_t port;
	uint32_t flowinfo;
	uint32_t scope_id;
	uint8_t addr[16];
};

/* The Linux sockaddr_in / sockaddr_in6 bytes of *a into out (cap bytes of room).
 * Returns the length written (16 or 28), -EAFNOSUPPORT for another family,
 * -EINVAL for flow info or scope ID on AF_INET or too little room. */
int nk_sockaddr_pack(const struct nk_sockaddr *a, void *out, size_t cap);
/* Decode `len` bytes (sin_zero ignored). Returns 0, -EINVAL (fewer than 2
 * bytes, a length other than the family's) or -EAFNOSUPPORT. */
int nk_sockaddr_unpack(const void *raw, size_t len, struct nk_sockaddr *out);
/* The reference's pack_sockaddr() from text and unchecked widths: family
 * (-EAFNOSUPPORT first), then port/flowinfo/scope_id widths and the host text
 * (len bytes, not NUL-terminated) parsed as Python's ipaddress does (-EINVAL). */
int nk_sockaddr_pack_text(uint64_t family, const char *host, size_t host_len, uint64_t port,
			  uint64_t flowinfo, uint64_t scope_id, void *out, size_t cap);
/* Text <-> address in the reference's notation (Python ipaddress: dotted quad
 * without leading zeros; IPv6 with the first longest run of >= 2 zero groups
 * as "::", lower-case hex). parse returns 0 or -EINVAL (addr: 4 or 16 bytes);
 * format returns the text length (NUL-terminated) or -EINVAL if cap is short. */
int nk_inet_parse(int family, const char *s, size_t len, uint8_t *addr);
int nk_inet_format(int family, const uint8_t *addr, char *buf, size_t cap);

#endif
