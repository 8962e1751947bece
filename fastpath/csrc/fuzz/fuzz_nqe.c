/* libFuzzer target: the NQE decoder (nqe.c) and the address decoder, with oracles.
 *
 *   make -C fastpath/csrc fuzz && fastpath/csrc/fuzz/run.sh 60
 *
 * Every input is read three ways: as one NQE (nk_nqe_decode), as a batch of
 * floor(len / 32) NQEs (nk_nqe_decode_batch, nk_nqe_encode_batch), and as an
 * address (nk_sockaddr_unpack). The oracles below abort on any disagreement;
 * they restate the spec (spec/nqe.md) rather than call the code under test:
 *
 *  - accepted  => len is 32, the op is in the spec's table, bytes 29-31 are
 *                 zero, and re-encoding gives back the same 32 bytes;
 *  - rejected  => the errno and field are the first failing check (NQE-12),
 *                 and error_reply answers exactly the answerable requests,
 *                 with a valid reply that echoes the matching fields;
 *  - batch     => status and bytes of every NQE equal the single decode's;
 *  - addresses => a decoded address re-packs to the same bytes (sin_zero
 *                 aside), and its text parses back to the same address.
 *
 * Built with -DNK_FUZZ_BROKEN, nqe.c ignores a reserved byte: the oracle must
 * catch that (tests/test_fastpath_fuzz.py).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nk/nqe.h"

#define ORACLE(cond)                                                                    \
	do {                                                                            \
		if (!(cond)) {                                                          \
			fprintf(stderr, "fuzz_nqe: oracle failed: %s (line %d)\n", #cond, \
				__LINE__);                                              \
			abort();                                                        \
		}                                                                       \
	} while (0)

/* spec/nqe.md section 2, typed again here: requests and control ops, then events */
static int spec_answered(unsigned op)
{
	return (op >= 0x01 && op <= 0x0C) || (op >= 0x60 && op <= 0x64);
}

static int spec_accepts(unsigned op)
{
	return op == 0xFF || spec_answered(op) || (op >= 0x40 && op <= 0x43) ||
	       ((op & 0x80) && spec_answered(op & 0x7F));
}

static void check_one(const uint8_t *data, size_t size)
{
	struct nk_nqe n, reply;
	uint8_t back[32];
	int field = -1;
	int err = nk_nqe_decode(data, size, &n, &field);
	int rc = nk_nqe_error_reply(data, size, &reply);

	if (size != 32) { /* NQE-1 */
		ORACLE(err == -EINVAL && field == NK_FIELD_LENGTH && rc == 0);
		return;
	}
	int reserved_zero = !data[29] && !data[30] && !data[31];
	if (err == 0) {
		ORACLE(field == NK_FIELD_NONE && spec_accepts(data[0]) && reserved_zero);
		ORACLE(nk_nqe_encode(&n, back) == 0 && memcmp(back, data, 32) == 0);
		ORACLE(rc == -EINVAL);
		return;
	}
	/* NQE-12: op (ENOSYS) before reserved (EINVAL) */
	if (!spec_accepts(data[0]))
		ORACLE(err == -ENOSYS && field == NK_FIELD_OP);
	else
		ORACLE(err == -EINVAL && field == NK_FIELD_RESERVED && !reserved_zero);
	ORACLE(nk_nqe_encode(&n, back) == err); /* an encoder refuses what a decoder rejects */
	/* NQE-10, NQE-11: answer requests only, never a reply or an event */
	int answer = !(data[0] & 0x80) && (!spec_accepts(data[0]) || spec_answered(data[0]));
	ORACLE(rc == answer);
	if (rc == 1) {
		ORACLE(reply.op == (spec_accepts(data[0]) ? (data[0] | 0x80) : 0xFF));
		ORACLE(nk_nqe_result(&reply) == err);
		ORACLE(reply.qset == n.qset && reply.vm_id == n.vm_id && reply.sock_id == n.sock_id);
		ORACLE(reply.tag == n.tag && reply.data_ptr == n.data_ptr && reply.size == n.size);
		ORACLE(!reply.reserved[0] && !reply.reserved[1] && !reply.reserved[2]);
		ORACLE(nk_nqe_encode(&reply, back) == 0); /* the reply itself is a valid NQE */
	}
}

static void check_batch(const uint8_t *data, size_t size)
{
	size_t n = size / 32, ok = 0;
	struct nk_nqe *out = malloc((n ? n : 1) * sizeof *out);
	uint8_t *enc = malloc((n ? n : 1) * 32);
	int32_t *status = malloc((n ? n : 1) * sizeof *status);
	int32_t *estatus = malloc((n ? n : 1) * sizeof *estatus);

	size_t accepted = nk_nqe_decode_batch(data, n, out, status);
	ORACLE(nk_nqe_encode_batch(out, n, enc, estatus) == accepted);
	for (size_t i = 0; i < n; i++) {
		struct nk_nqe one;
		ORACLE(status[i] == nk_nqe_decode(data + 32 * i, 32, &one, NULL));
		ORACLE(memcmp(&out[i], data + 32 * i, 32) == 0);
		ORACLE(estatus[i] == status[i]);
		ORACLE(status[i] ? enc[32 * i] == 0 : memcmp(enc + 32 * i, data + 32 * i, 32) == 0);
		ok += status[i] == 0;
	}
	ORACLE(ok == accepted);
	free(out);
	free(enc);
	free(status);
	free(estatus);
}

static void check_sockaddr(const uint8_t *data, size_t size)
{
	struct nk_sockaddr sa, again;
	uint8_t back[28], addr[16];
	char text[NK_HOST_MAX];
	int err = nk_sockaddr_unpack(data, size, &sa);

	if (size < 2) {
		ORACLE(err == -EINVAL);
		return;
	}
	unsigned family = data[0] | data[1] << 8;
	if (family != NK_AF_INET && family != NK_AF_INET6) {
		ORACLE(err == -EAFNOSUPPORT);
		return;
	}
	size_t want = family == NK_AF_INET ? 16 : 28;
	ORACLE((err == 0) == (size == want));
	if (err)
		return;
	ORACLE(nk_sockaddr_pack(&sa, back, sizeof back) == (int)want);
	ORACLE(memcmp(back, data, family == NK_AF_INET ? 8 : 28) == 0);
	int len = nk_inet_format(family, sa.addr, text, sizeof text);
	ORACLE(len > 0 && (size_t)len == strlen(text));
	ORACLE(nk_inet_parse(family, text, (size_t)len, addr) == 0);
	ORACLE(memcmp(addr, sa.addr, family == NK_AF_INET ? 4 : 16) == 0);
	ORACLE(nk_sockaddr_unpack(back, want, &again) == 0 && memcmp(&again, &sa, sizeof sa) == 0);
}

static void check_text(const uint8_t *data, size_t size)
{
	/* any text: a parse that succeeds formats to text that parses to the same address */
	uint8_t addr[16], again[16];
	char text[NK_HOST_MAX];

	for (int family = NK_AF_INET; family <= NK_AF_INET6; family += NK_AF_INET6 - NK_AF_INET) {
		if (nk_inet_parse(family, (const char *)data, size, addr))
			continue;
		int len = nk_inet_format(family, addr, text, sizeof text);
		ORACLE(len > 0 && nk_inet_parse(family, text, (size_t)len, again) == 0);
		ORACLE(memcmp(addr, again, family == NK_AF_INET ? 4 : 16) == 0);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	check_one(data, size);
	check_batch(data, size);
	check_sockaddr(data, size);
	check_text(data, size);
	return 0;
}
