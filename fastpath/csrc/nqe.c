/* The NQE v1 codec (spec/nqe.md), byte for byte the reference's (reference/nqe.py).
 *
 * struct nk_nqe is the wire layout (include/nk/nqe.h), so decoding is a
 * 32-byte copy plus the receiver's checks in the order of spec/nqe.md
 * section 5: length (NQE-1), op (NQE-11), reserved bytes (NQE-10); encoding
 * is the sender's checks (NQE-4, NQE-5, NQE-11) plus the same copy. Nothing
 * here allocates, locks or knows about rings: the CoreEngine calls the batch
 * forms over whole ring segments.
 *
 * The second half is NQE-15: Linux sockaddr_in / sockaddr_in6 bytes, and
 * the text form of an address exactly as the reference writes and reads it
 * (Python's ipaddress), so that a decoded address compares equal.
 */
#include <string.h>

#include "nk/nqe.h"

/* ---- NQEs -------------------------------------------------------------------------- */

/* Bytes 29-31 as one integer: zero iff the reserved bytes are (NQE-4). */
static inline uint32_t nk_reserved_word(const uint8_t r[3])
{
	return (uint32_t)r[0] | (uint32_t)r[1] << 8 | (uint32_t)r[2] << 16;
}

/* The receiver's checks on 32 bytes already read (NQE-11 before NQE-10, NQE-12).
 * Branch-free on purpose: the batch loops below compile to straight-line code. */
static inline int32_t nk_status_of(const struct nk_nqe *n)
{
	int32_t unknown = !nk_op_is_known(n->op);
#ifdef NK_FUZZ_BROKEN
	/* Deliberately wrong, for tests/test_fastpath_fuzz.py only: reserved byte 31
	 * is ignored, so the fuzz oracle has something to find. */
	int32_t reserved = (n->reserved[0] | n->reserved[1]) != 0;
#else
	int32_t reserved = nk_reserved_word(n->reserved) != 0;
#endif
	return unknown ? -ENOSYS : reserved ? -EINVAL : 0;
}

/* The field a status names: -ENOSYS is the op, -EINVAL (after 32 bytes) the reserved bytes. */
static inline int nk_field_of(int32_t status)
{
	return status == -ENOSYS ? NK_FIELD_OP : status ? NK_FIELD_RESERVED : NK_FIELD_NONE;
}

int nk_nqe_decode(const void *raw, size_t len, struct nk_nqe *out, int *field)
{
	int32_t st;

	if (len != NK_NQE_SIZE) { /* NQE-1: never a prefix, never padded */
		if (field)
			*field = NK_FIELD_LENGTH;
		return -EINVAL;
	}
	memcpy(out, raw, NK_NQE_SIZE); /* NQE-2, NQE-3: the struct is the wire */
	st = nk_status_of(out);
	if (field)
		*field = nk_field_of(st);
	return st;
}

int nk_nqe_encode(const struct nk_nqe *n, void *raw32)
{
	int32_t st = nk_status_of(n); /* NQE-4, NQE-11: a sender never sends what a receiver rejects */

	if (st == 0)
		memcpy(raw32, n, NK_NQE_SIZE);
	return st;
}

size_t nk_nqe_decode_batch(const void *raw, size_t n, struct nk_nqe *out, int32_t *status)
{
	const struct nk_nqe *in = raw; /* packed: any alignment of raw is fine */
	size_t ok = 0;

	/* One pass over memory: copy and check each NQE while it is in a register.
	 * Two loops so that neither tests `out` per element. */
	if (out) {
		for (size_t i = 0; i < n; i++) {
			out[i] = in[i];
			status[i] = nk_status_of(&out[i]);
			ok += status[i] == 0;
		}
	} else {
		for (size_t i = 0; i < n; i++) {
			status[i] = nk_status_of(&in[i]);
			ok += status[i] == 0;
		}
	}
	return ok;
}

size_t nk_nqe_encode_batch(const struct nk_nqe *in, size_t n, void *raw, int32_t *status)
{
	static const struct nk_nqe zero;
	struct nk_nqe *out = raw;
	size_t ok = 0;

	for (size_t i = 0; i < n; i++) {
		status[i] = nk_status_of(&in[i]);
		/* NQE-4: a refused NQE leaves no sendable bytes behind (op 0 is unknown) */
		out[i] = status[i] ? zero : in[i];
		ok += status[i] == 0;
	}
	return ok;
}

int nk_nqe_error_reply(const void *raw, size_t len, struct nk_nqe *reply)
{
	struct nk_nqe in;
	int32_t st;

	if (len != NK_NQE_SIZE) /* NQE-1: no field of it can be trusted */
		return 0;
	memcpy(&in, raw, NK_NQE_SIZE);
	st = nk_status_of(&in);
	if (st == 0)
		return -EINVAL; /* a valid NQE: nothing to reject */
	/* NQE-10, NQE-11: a reply (bit 7: answering it could loop) or an event is dropped */
	if ((in.op & NK_REPLY_BIT) || (nk_op_is_known(in.op) && !nk_op_is_answerable(in.op)))
		return 0;
	/* NQE-8, NQE-9: echo what the requester matches on; NQE-4: reserved zero. A
	 * known op here failed the reserved check (NQE-10), an unknown one NQE-11. */
	*reply = in;
	reply->op = nk_op_is_answerable(in.op) ? (uint8_t)(in.op | NK_REPLY_BIT)
					       : NK_OP_UNKNOWN_REPLY;
	reply->op_data = (uint64_t)(int64_t)st; /* NQE-13: -errno, two's complement */
	memset(reply->reserved, 0, sizeof reply->reserved);
	return 1;
}

/* ---- widened NQEs (NQE-5) ---------------------------------------------------------- */

/* The largest value of each integer field, in the reference's check order. */
static const uint64_t nk_width_max[8] = {
	UINT8_MAX, UINT8_MAX, UINT8_MAX, UINT32_MAX, UINT64_MAX, UINT64_MAX, UINT32_MAX, UINT16_MAX,
};
static const int nk_width_field[8] = {
	NK_FIELD_OP, NK_FIELD_QSET, NK_FIELD_VM_ID, NK_FIELD_SOCK_ID,
	NK_FIELD_OP_DATA, NK_FIELD_DATA_PTR, NK_FIELD_SIZE, NK_FIELD_TAG,
};

static inline uint64_t nk_wide_value(const struct nk_nqe_wide *w, int i)
{
	const uint64_t v[8] = { w->op, w->qset, w->vm_id, w->sock_id,
				w->op_data, w->data_ptr, w->size, w->tag };
	return v[i];
}

/* The reference pack()'s checks: widths first, field by field (NQE-5), then the
 * op (NQE-11) and the reserved bytes (NQE-4). Returns 0 or -errno, sets *field. */
static int nk_wide_check(const struct nk_nqe_wide *w, int *field)
{
	for (int i = 0; i < 8; i++) {
		if ((w->overflow >> i & 1) || nk_wide_value(w, i) > nk_width_max[i]) {
			*field = nk_width_field[i];
			return -EINVAL;
		}
	}
	if (!nk_op_is_known((uint8_t)w->op)) {
		*field = NK_FIELD_OP;
		return -ENOSYS;
	}
	if (w->reserved) {
		*field = NK_FIELD_RESERVED;
		return -EINVAL;
	}
	*field = NK_FIELD_NONE;
	return 0;
}

/* Narrow a checked wide NQE into the wire struct (the casts cannot truncate now). */
static inline void nk_narrow(const struct nk_nqe_wide *w, struct nk_nqe *n)
{
	n->op = (uint8_t)w->op;
	n->qset = (uint8_t)w->qset;
	n->vm_id = (uint8_t)w->vm_id;
	n->sock_id = (uint32_t)w->sock_id;
	n->op_data = w->op_data;
	n->data_ptr = w->data_ptr;
	n->size = (uint32_t)w->size;
	n->tag = (uint16_t)w->tag;
	memset(n->reserved, 0, sizeof n->reserved);
}

static inline void nk_widen(const struct nk_nqe *n, struct nk_nqe_wide *w)
{
	w->op = n->op;
	w->qset = n->qset;
	w->vm_id = n->vm_id;
	w->sock_id = n->sock_id;
	w->op_data = n->op_data;
	w->data_ptr = n->data_ptr;
	w->size = n->size;
	w->tag = n->tag;
	w->reserved = nk_reserved_word(n->reserved);
	w->overflow = 0;
}

int nk_nqe_encode_wide(const struct nk_nqe_wide *w, void *raw32, int *field)
{
	struct nk_nqe n;
	int f, err = nk_wide_check(w, &f);

	if (field)
		*field = f;
	if (err)
		return err;
	nk_narrow(w, &n);
	memcpy(raw32, &n, NK_NQE_SIZE);
	return 0;
}

int nk_nqe_decode_wide(const void *raw, size_t len, struct nk_nqe_wide *out, int *field)
{
	struct nk_nqe n;
	int err = nk_nqe_decode(raw, len, &n, field);

	if (err == 0)
		nk_widen(&n, out);
	return err;
}

int nk_nqe_decode_fields(const void *raw, size_t len, uint64_t *fields, int *field)
{
	struct nk_nqe_wide w;
	int err = nk_nqe_decode_wide(raw, len, &w, field);

	if (err == 0) {
		fields[0] = w.op;
		fields[1] = w.qset;
		fields[2] = w.vm_id;
		fields[3] = w.sock_id;
		fields[4] = w.op_data;
		fields[5] = w.data_ptr;
		fields[6] = w.size;
		fields[7] = w.tag;
	}
	return err;
}

int nk_nqe_encode_fields(void *raw32, int *field, uint64_t op, uint64_t qset, uint64_t vm_id,
			 uint64_t sock_id, uint64_t op_data, uint64_t data_ptr, uint64_t size,
			 uint64_t tag, uint32_t reserved, uint32_t overflow)
{
	const struct nk_nqe_wide w = {
		.op = op, .qset = qset, .vm_id = vm_id, .sock_id = sock_id, .op_data = op_data,
		.data_ptr = data_ptr, .size = size, .tag = tag, .reserved = reserved,
		.overflow = overflow,
	};

	return nk_nqe_encode_wide(&w, raw32, field);
}

size_t nk_nqe_decode_wide_batch(const void *raw, size_t n, struct nk_nqe_wide *out,
				int32_t *status)
{
	const struct nk_nqe *in = raw;
	size_t ok = 0;

	for (size_t i = 0; i < n; i++) {
		status[i] = nk_status_of(&in[i]);
		nk_widen(&in[i], &out[i]);
		ok += status[i] == 0;
	}
	return ok;
}

size_t nk_nqe_encode_wide_batch(const struct nk_nqe_wide *in, size_t n, void *raw,
				int32_t *status)
{
	uint8_t *out = raw;
	size_t ok = 0;
	int field;

	for (size_t i = 0; i < n; i++) {
		status[i] = nk_nqe_encode_wide(&in[i], out + i * NK_NQE_SIZE, &field);
		if (status[i])
			memset(out + i * NK_NQE_SIZE, 0, NK_NQE_SIZE); /* NQE-4, as encode_batch */
		ok += status[i] == 0;
	}
	return ok;
}

/* ---- addresses (NQE-15) ------------------------------------------------------------ */

static inline void nk_put_be16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static inline void nk_put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static inline uint16_t nk_get_be16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t nk_get_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint32_t nk_get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int nk_sockaddr_pack(const struct nk_sockaddr *a, void *out, size_t cap)
{
	uint8_t *p = out;

	if (a->family != NK_AF_INET && a->family != NK_AF_INET6)
		return -EAFNOSUPPORT;
	if (a->family == NK_AF_INET) {
		if (a->flowinfo || a->scope_id || cap < NK_SOCKADDR_IN_SIZE)
			return -EINVAL; /* AF_INET has no flow info or scope ID */
		memset(p, 0, NK_SOCKADDR_IN_SIZE); /* sin_zero written as zero */
		p[0] = NK_AF_INET;              /* sin_family, little-endian */
		nk_put_be16(p + 2, a->port);
		memcpy(p + 4, a->addr, 4);
		return NK_SOCKADDR_IN_SIZE;
	}
	if (cap < NK_SOCKADDR_IN6_SIZE)
		return -EINVAL;
	p[0] = NK_AF_INET6;
	p[1] = 0;
	nk_put_be16(p + 2, a->port);
	nk_put_be32(p + 4, a->flowinfo);
	memcpy(p + 8, a->addr, 16);
	p[24] = (uint8_t)a->scope_id; /* sin6_scope_id is host order: little-endian */
	p[25] = (uint8_t)(a->scope_id >> 8);
	p[26] = (uint8_t)(a->scope_id >> 16);
	p[27] = (uint8_t)(a->scope_id >> 24);
	return NK_SOCKADDR_IN6_SIZE;
}

int nk_sockaddr_unpack(const void *raw, size_t len, struct nk_sockaddr *out)
{
	const uint8_t *p = raw;
	uint16_t family;

	if (len < 2)
		return -EINVAL;
	family = (uint16_t)(p[0] | p[1] << 8);
	if (family != NK_AF_INET && family != NK_AF_INET6)
		return -EAFNOSUPPORT;
	if (len != (family == NK_AF_INET ? NK_SOCKADDR_IN_SIZE : NK_SOCKADDR_IN6_SIZE))
		return -EINVAL;
	memset(out, 0, sizeof *out);
	out->family = family;
	out->port = nk_get_be16(p + 2);
	if (family == NK_AF_INET) {
		memcpy(out->addr, p + 4, 4); /* sin_zero is ignored, as Linux does */
	} else {
		out->flowinfo = nk_get_be32(p + 4);
		memcpy(out->addr, p + 8, 16);
		out->scope_id = nk_get_le32(p + 24);
	}
	return 0;
}

int nk_sockaddr_pack_text(uint64_t family, const char *host, size_t host_len, uint64_t port,
			  uint64_t flowinfo, uint64_t scope_id, void *out, size_t cap)
{
	struct nk_sockaddr a;

	if (family != NK_AF_INET && family != NK_AF_INET6)
		return -EAFNOSUPPORT; /* checked first, as the reference does */
	if (port > UINT16_MAX || flowinfo > UINT32_MAX || scope_id > UINT32_MAX)
		return -EINVAL;
	memset(&a, 0, sizeof a);
	if (nk_inet_parse((int)family, host, host_len, a.addr))
		return -EINVAL;
	a.family = (uint16_t)family;
	a.port = (uint16_t)port;
	a.flowinfo = (uint32_t)flowinfo;
	a.scope_id = (uint32_t)scope_id;
	return nk_sockaddr_pack(&a, out, cap);
}

/* -- text, as Python's ipaddress reads and writes it --------------------------------- */

static inline int nk_is_digit(char c)
{
	return c >= '0' && c <= '9';
}

static inline int nk_hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* One decimal octet: 1-3 ASCII digits, no leading zero but "0", at most 255. */
static int nk_parse_octet(const char *s, size_t len)
{
	int v = 0;

	if (len == 0 || len > 3 || (len > 1 && s[0] == '0'))
		return -1;
	for (size_t i = 0; i < len; i++) {
		if (!nk_is_digit(s[i]))
			return -1;
		v = v * 10 + (s[i] - '0');
	}
	return v > 255 ? -1 : v;
}

/* Exactly four octets separated by '.'. */
static int nk_parse_ipv4(const char *s, size_t len, uint8_t addr[4])
{
	size_t start = 0;
	int n = 0;

	for (size_t i = 0; i <= len; i++) {
		if (i < len && s[i] != '.')
			continue;
		if (n == 4)
			return -EINVAL;
		int v = nk_parse_octet(s + start, i - start);
		if (v < 0)
			return -EINVAL;
		addr[n++] = (uint8_t)v;
		start = i + 1;
	}
	return n == 4 ? 0 : -EINVAL;
}

/* One hextet: 1-4 hex digits. */
static int nk_parse_hextet(const char *s, size_t len)
{
	int v = 0;

	if (len == 0 || len > 4)
		return -1;
	for (size_t i = 0; i < len; i++) {
		int d = nk_hex_value(s[i]);
		if (d < 0)
			return -1;
		v = v << 4 | d;
	}
	return v;
}

#define NK_V6_MAX_PARTS 9 /* 8 hextets, plus one empty part for a leading or trailing "::" */

/* The algorithm of ipaddress.IPv6Address._ip_int_from_string, step by step. */
static int nk_parse_ipv6(const char *s, size_t len, uint8_t addr[16])
{
	size_t start[NK_V6_MAX_PARTS + 1], plen[NK_V6_MAX_PARTS + 1];
	uint16_t value[NK_V6_MAX_PARTS + 1];
	int parts = 0, skip = -1, hi, lo, skipped, has_v4 = 0;
	uint8_t v4[4];

	if (len == 0)
		return -EINVAL;
	/* split on ':'; more than 9 parts fail below whatever they hold */
	for (size_t i = 0, b = 0; i <= len; i++) {
		if (i < len && s[i] != ':')
			continue;
		if (parts == NK_V6_MAX_PARTS)
			return -EINVAL;
		start[parts] = b;
		plen[parts++] = i - b;
		b = i + 1;
	}
	if (parts < 3)
		return -EINVAL;
	/* an IPv4-style last part becomes two hextets */
	if (memchr(s + start[parts - 1], '.', plen[parts - 1])) {
		if (nk_parse_ipv4(s + start[parts - 1], plen[parts - 1], v4))
			return -EINVAL;
		if (parts == NK_V6_MAX_PARTS)
			return -EINVAL; /* 10 parts once expanded */
		has_v4 = 1;
		parts++;
	}
	/* "::" in the middle: exactly one empty part between the ends */
	for (int i = 1; i < parts - 1; i++) {
		int empty = (has_v4 && i >= parts - 2) ? 0 : plen[i] == 0;
		if (!empty)
			continue;
		if (skip >= 0)
			return -EINVAL;
		skip = i;
	}
	if (skip >= 0) {
		hi = skip;
		lo = parts - skip - 1;
		if (plen[0] == 0 && --hi)
			return -EINVAL; /* a leading ':' only as part of "::" */
		if (!has_v4 && plen[parts - 1] == 0 && --lo)
			return -EINVAL; /* a trailing ':' only as part of "::" */
		skipped = 8 - (hi + lo);
		if (skipped < 1)
			return -EINVAL;
	} else {
		if (parts != 8)
			return -EINVAL;
		hi = parts;
		lo = 0;
		skipped = 0;
	}
	/* the hextets, then the IPv4 pair; an empty part left here is an error */
	for (int i = 0; i < parts; i++) {
		int v;
		if (has_v4 && i == parts - 2)
			v = v4[0] << 8 | v4[1];
		else if (has_v4 && i == parts - 1)
			v = v4[2] << 8 | v4[3];
		else if ((i < hi || i >= parts - lo))
			v = nk_parse_hextet(s + start[i], plen[i]);
		else
			v = 0; /* the "::" part or an empty end it covers: not parsed */
		if (v < 0)
			return -EINVAL;
		value[i] = (uint16_t)v;
	}
	memset(addr, 0, 16);
	for (int i = 0; i < hi; i++)
		nk_put_be16(addr + 2 * i, value[i]);
	for (int i = 0; i < lo; i++)
		nk_put_be16(addr + 2 * (8 - lo + i), value[parts - lo + i]);
	return 0;
}

int nk_inet_parse(int family, const char *s, size_t len, uint8_t *addr)
{
	if (family == NK_AF_INET)
		return nk_parse_ipv4(s, len, addr);
	if (family == NK_AF_INET6)
		return nk_parse_ipv6(s, len, addr);
	return -EAFNOSUPPORT;
}

/* Append to buf[*at..cap); returns -1 once there is no room. */
static int nk_emit(char *buf, size_t cap, size_t *at, const char *text, size_t n)
{
	if (*at + n >= cap)
		return -1;
	memcpy(buf + *at, text, n);
	*at += n;
	buf[*at] = '\0';
	return 0;
}

static int nk_emit_uint(char *buf, size_t cap, size_t *at, unsigned v, unsigned base)
{
	char tmp[8];
	size_t n = 0;

	do {
		tmp[sizeof tmp - 1 - n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	return nk_emit(buf, cap, at, tmp + sizeof tmp - n, n);
}

int nk_inet_format(int family, const uint8_t *addr, char *buf, size_t cap)
{
	size_t at = 0;
	int best = -1, best_len = 0, run = -1, run_len = 0;
	uint16_t h[8];

	if (cap == 0)
		return -EINVAL;
	buf[0] = '\0';
	if (family == NK_AF_INET) {
		for (int i = 0; i < 4; i++)
			if ((i && nk_emit(buf, cap, &at, ".", 1)) ||
			    nk_emit_uint(buf, cap, &at, addr[i], 10))
				return -EINVAL;
		return (int)at;
	}
	if (family != NK_AF_INET6)
		return -EAFNOSUPPORT;
	/* _compress_hextets: the first longest run of zero groups, if it is >= 2 long */
	for (int i = 0; i < 8; i++) {
		h[i] = nk_get_be16(addr + 2 * i);
		if (h[i]) {
			run = -1;
			run_len = 0;
			continue;
		}
		if (run < 0)
			run = i;
		if (++run_len > best_len) {
			best_len = run_len;
			best = run;
		}
	}
	if (best_len < 2)
		best = -1;
	for (int i = 0; i < 8; i++) {
		if (i == best) {
			if (nk_emit(buf, cap, &at, "::", 2))
				return -EINVAL;
			i += best_len - 1;
			continue;
		}
		if (i > 0 && !(best >= 0 && i == best + best_len) && nk_emit(buf, cap, &at, ":", 1))
			return -EINVAL;
		if (nk_emit_uint(buf, cap, &at, h[i], 16))
			return -EINVAL;
	}
	return (int)at;
}
