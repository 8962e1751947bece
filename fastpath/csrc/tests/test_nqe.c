/* C unit test of the NQE codec (nqe.c), without Python: `make test` runs it
 * under ASan + UBSan. The op table below is typed from spec/nqe.md section 2,
 * not taken from nqe.h, so the codec is checked against the spec's table. The
 * byte-for-byte comparison with the reference is tests/test_fastpath_codec.py.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nk/nqe.h"

static int failures;

#define CHECK(cond)                                                             \
	do {                                                                    \
		if (!(cond)) {                                                  \
			fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__,  \
				__LINE__, #cond);                               \
			failures++;                                             \
		}                                                               \
	} while (0)

/* spec/nqe.md section 2: requests and control ops (answered), events (not). */
static const uint8_t answered[] = { 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09,
				    0x0A, 0x0B, 0x0C, 0x60, 0x61, 0x62, 0x63, 0x64 };
static const uint8_t events[] = { 0x40, 0x41, 0x42, 0x43 };

static int spec_accepts(int op)
{
	if (op == 0xFF)
		return 1;
	for (size_t i = 0; i < sizeof answered; i++)
		if (op == answered[i] || op == (answered[i] | 0x80))
			return 1;
	for (size_t i = 0; i < sizeof events; i++)
		if (op == events[i])
			return 1;
	return 0;
}

static int spec_answered(int op)
{
	for (size_t i = 0; i < sizeof answered; i++)
		if (op == answered[i])
			return 1;
	return 0;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t next_random(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void make_nqe(uint8_t raw[32], uint8_t op)
{
	for (int i = 0; i < 32; i++)
		raw[i] = (uint8_t)next_random();
	raw[0] = op;
	raw[29] = raw[30] = raw[31] = 0;
}

static void test_every_op_byte(void)
{
	uint8_t raw[32], back[32];
	struct nk_nqe n;
	int field;

	for (int op = 0; op < 256; op++) {
		make_nqe(raw, (uint8_t)op);
		int err = nk_nqe_decode(raw, 32, &n, &field);
		if (spec_accepts(op)) {
			CHECK(err == 0 && field == NK_FIELD_NONE);
			CHECK(memcmp(&n, raw, 32) == 0);
			CHECK(nk_nqe_encode(&n, back) == 0 && memcmp(back, raw, 32) == 0);
		} else {
			CHECK(err == -ENOSYS && field == NK_FIELD_OP);
			CHECK(nk_nqe_encode(&n, back) == -ENOSYS);
		}
		CHECK(!!nk_op_is_known((uint8_t)op) == spec_accepts(op));
		CHECK(!!nk_op_is_answerable((uint8_t)op) == spec_answered(op));
	}
}

static void test_fields_are_little_endian_at_their_offsets(void)
{
	/* the vector of conformance/test_nqe.py */
	static const uint8_t wire[32] = { 0x06, 0x11, 0x22, 0x36, 0x35, 0x34, 0x33, 0x48, 0x47,
					  0x46, 0x45, 0x44, 0x43, 0x42, 0x41, 0x58, 0x57, 0x56,
					  0x55, 0x54, 0x53, 0x52, 0x51, 0x64, 0x63, 0x62, 0x61,
					  0x72, 0x71, 0, 0, 0 };
	struct nk_nqe n;

	CHECK(nk_nqe_decode(wire, 32, &n, NULL) == 0);
	CHECK(n.op == 0x06 && n.qset == 0x11 && n.vm_id == 0x22 && n.sock_id == 0x33343536);
	CHECK(n.op_data == 0x4142434445464748ull && n.data_ptr == 0x5152535455565758ull);
	CHECK(n.size == 0x61626364 && n.tag == 0x7172);
}

static void test_length_then_op_then_reserved(void)
{
	uint8_t raw[64] = { 0 };
	struct nk_nqe n;
	int field;

	make_nqe(raw, NK_OP_SEND);
	for (size_t len = 0; len < sizeof raw; len++) {
		if (len == 32)
			continue;
		CHECK(nk_nqe_decode(raw, len, &n, &field) == -EINVAL && field == NK_FIELD_LENGTH);
		CHECK(nk_nqe_error_reply(raw, len, &n) == 0); /* NQE-1: never answered */
	}
	raw[31] = 1;
	CHECK(nk_nqe_decode(raw, 32, &n, &field) == -EINVAL && field == NK_FIELD_RESERVED);
	raw[0] = 0x7F; /* NQE-12: unknown op wins over reserved */
	CHECK(nk_nqe_decode(raw, 32, &n, &field) == -ENOSYS && field == NK_FIELD_OP);
}

static void test_error_reply(void)
{
	uint8_t raw[32];
	struct nk_nqe in, reply;

	for (int op = 0; op < 256; op++) {
		for (int bad_reserved = 0; bad_reserved < 2; bad_reserved++) {
			make_nqe(raw, (uint8_t)op);
			raw[29] = (uint8_t)bad_reserved;
			memcpy(&in, raw, 32);
			int rc = nk_nqe_error_reply(raw, 32, &reply);
			if (spec_accepts(op) && !bad_reserved) {
				CHECK(rc == -EINVAL); /* valid: nothing to reject */
				continue;
			}
			int dropped = (op & 0x80) || (spec_accepts(op) && !spec_answered(op));
			CHECK(rc == !dropped);
			if (rc != 1)
				continue;
			CHECK(reply.op == (spec_accepts(op) ? (op | 0x80) : 0xFF));
			CHECK(nk_nqe_result(&reply) == (spec_accepts(op) ? -EINVAL : -ENOSYS));
			CHECK(reply.qset == in.qset && reply.vm_id == in.vm_id);
			CHECK(reply.sock_id == in.sock_id && reply.tag == in.tag);
			CHECK(reply.data_ptr == in.data_ptr && reply.size == in.size);
			CHECK(nk_nqe_check(&reply, NULL) == 0); /* NQE-4: the reply is valid */
		}
	}
}

static void test_batch_is_single_in_a_loop(void)
{
	enum { N = 4096 };
	uint8_t *raw = malloc(N * 32), *enc = malloc(N * 32);
	struct nk_nqe *out = malloc(N * sizeof *out);
	int32_t *status = malloc(N * sizeof *status), *estatus = malloc(N * sizeof *estatus);
	size_t want = 0;

	for (size_t i = 0; i < N; i++) {
		make_nqe(raw + 32 * i, (uint8_t)next_random());
		if (next_random() % 4 == 0)
			raw[32 * i + 29 + next_random() % 3] = (uint8_t)(1 + next_random() % 255);
	}
	for (size_t i = 0; i < N; i++) {
		struct nk_nqe one;
		want += nk_nqe_decode(raw + 32 * i, 32, &one, NULL) == 0;
	}
	CHECK(nk_nqe_decode_batch(raw, N, out, status) == want);
	CHECK(nk_nqe_encode_batch(out, N, enc, estatus) == want);
	for (size_t i = 0; i < N; i++) {
		struct nk_nqe one;
		CHECK(status[i] == nk_nqe_decode(raw + 32 * i, 32, &one, NULL));
		CHECK(estatus[i] == status[i]);
		CHECK(memcmp(&out[i], raw + 32 * i, 32) == 0);
		if (status[i] == 0)
			CHECK(memcmp(enc + 32 * i, raw + 32 * i, 32) == 0);
		else
			CHECK(enc[32 * i] == 0 && enc[32 * i + 31] == 0);
	}
	CHECK(nk_nqe_decode_batch(raw + 1, N - 1, NULL, status) <= N); /* unaligned, check only */
	free(raw);
	free(enc);
	free(out);
	free(status);
	free(estatus);
}

static void test_wide_checks_widths_in_order(void)
{
	struct nk_nqe_wide w = { .op = NK_OP_SEND, .sock_id = 1 };
	uint8_t raw[32];
	int field;

	CHECK(nk_nqe_encode_wide(&w, raw, &field) == 0 && field == NK_FIELD_NONE);
	w.tag = 0x10000;
	w.size = 1ull << 32;
	CHECK(nk_nqe_encode_wide(&w, raw, &field) == -EINVAL && field == NK_FIELD_SIZE);
	w.overflow = 1u << 5; /* data_ptr does not fit 64 bits: before size */
	CHECK(nk_nqe_encode_wide(&w, raw, &field) == -EINVAL && field == NK_FIELD_DATA_PTR);
	w = (struct nk_nqe_wide){ .op = 0x7F, .reserved = 1 };
	CHECK(nk_nqe_encode_wide(&w, raw, &field) == -ENOSYS && field == NK_FIELD_OP);
	w.op = 0x100;
	CHECK(nk_nqe_encode_wide(&w, raw, &field) == -EINVAL && field == NK_FIELD_OP);
	w = (struct nk_nqe_wide){ .op = NK_OP_CLOSE, .reserved = 1u << 24 };
	CHECK(nk_nqe_encode_wide(&w, raw, &field) == -EINVAL && field == NK_FIELD_RESERVED);
}

static void check_v6_text(const char *in, const char *want, const char *hex)
{
	uint8_t addr[16];
	char text[NK_HOST_MAX], bytes[33];

	CHECK(nk_inet_parse(NK_AF_INET6, in, strlen(in), addr) == 0);
	for (int i = 0; i < 16; i++)
		snprintf(bytes + 2 * i, 3, "%02x", addr[i]);
	CHECK(strcmp(bytes, hex) == 0);
	CHECK(nk_inet_format(NK_AF_INET6, addr, text, sizeof text) == (int)strlen(want));
	CHECK(strcmp(text, want) == 0);
}

static void test_addresses(void)
{
	static const uint8_t v4[16] = { 2, 0, 0x1F, 0x90, 127, 0, 0, 1 };
	uint8_t out[28], addr[16];
	struct nk_sockaddr sa;
	char text[NK_HOST_MAX];

	/* NQE-15: sockaddr_in of 127.0.0.1:8080 */
	CHECK(nk_sockaddr_pack_text(NK_AF_INET, "127.0.0.1", 9, 8080, 0, 0, out, 28) == 16);
	CHECK(memcmp(out, v4, 16) == 0);
	CHECK(nk_sockaddr_unpack(out, 16, &sa) == 0 && sa.port == 8080 && sa.addr[0] == 127);
	CHECK(nk_sockaddr_unpack(out, 15, &sa) == -EINVAL);
	CHECK(nk_sockaddr_unpack(out, 1, &sa) == -EINVAL);
	out[0] = 3;
	CHECK(nk_sockaddr_unpack(out, 16, &sa) == -EAFNOSUPPORT);
	CHECK(nk_sockaddr_pack_text(3, "1.2.3.4", 7, 1, 0, 0, out, 28) == -EAFNOSUPPORT);
	CHECK(nk_sockaddr_pack_text(NK_AF_INET, "1.2.3.4", 7, 65536, 0, 0, out, 28) == -EINVAL);
	CHECK(nk_sockaddr_pack_text(NK_AF_INET, "1.2.3.4", 7, 1, 1, 0, out, 28) == -EINVAL);
	CHECK(nk_sockaddr_pack_text(NK_AF_INET6, "::1", 3, 1, 7, 9, out, 28) == 28);
	CHECK(out[0] == 10 && out[7] == 7 && out[23] == 1 && out[24] == 9);
	/* the host grammar of Python's ipaddress */
	CHECK(nk_inet_parse(NK_AF_INET, "01.2.3.4", 8, addr) == -EINVAL);
	CHECK(nk_inet_parse(NK_AF_INET, "1.2.3.4\0", 8, addr) == -EINVAL); /* NUL is text */
	CHECK(nk_inet_parse(NK_AF_INET, "256.1.1.1", 9, addr) == -EINVAL);
	CHECK(nk_inet_parse(NK_AF_INET, "1.2.3", 5, addr) == -EINVAL);
	CHECK(nk_inet_parse(NK_AF_INET6, "1:2:3:4:5:6:7:8:9", 17, addr) == -EINVAL);
	CHECK(nk_inet_parse(NK_AF_INET6, "1::2::3", 7, addr) == -EINVAL);
	CHECK(nk_inet_parse(NK_AF_INET6, ":1::", 4, addr) == -EINVAL);
	CHECK(nk_inet_parse(NK_AF_INET6, "1:2:3:4:5:6:7:8::", 17, addr) == -EINVAL);
	CHECK(nk_inet_parse(NK_AF_INET6, "::12345", 7, addr) == -EINVAL);
	CHECK(nk_inet_format(NK_AF_INET, v4 + 4, text, sizeof text) == 9);
	CHECK(strcmp(text, "127.0.0.1") == 0);
	CHECK(nk_inet_format(NK_AF_INET, v4 + 4, text, 9) == -EINVAL); /* no room for the NUL */
	/* text written as Python's str(IPv6Address) writes it */
	check_v6_text("1:0:0:2::3", "1:0:0:2::3", "00010000000000020000000000000003");
	check_v6_text("0:0:1:0:0:1:0:0", "::1:0:0:1:0:0", "00000000000100000000000100000000");
	check_v6_text("::", "::", "00000000000000000000000000000000");
	check_v6_text("1::", "1::", "00010000000000000000000000000000");
	check_v6_text("FE80::1:0:0:0", "fe80::1:0:0:0", "fe800000000000000001000000000000");
	check_v6_text("1:0:2:0:3:0:4:0", "1:0:2:0:3:0:4:0", "00010000000200000003000000040000");
	check_v6_text("::ffff:1.2.3.4", "::ffff:102:304", "00000000000000000000ffff01020304");
	check_v6_text("1:2:3:4:5:6:7::", "1:2:3:4:5:6:7:0", "00010002000300040005000600070000");
}

int main(void)
{
	test_every_op_byte();
	test_fields_are_little_endian_at_their_offsets();
	test_length_then_op_then_reserved();
	test_error_reply();
	test_batch_is_single_in_a_loop();
	test_wide_checks_widths_in_order();
	test_addresses();
	if (failures) {
		fprintf(stderr, "test_nqe: %d checks failed\n", failures);
		return 1;
	}
	printf("test_nqe: ok\n");
	return 0;
}
