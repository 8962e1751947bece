/* One single-producer / single-consumer NQE ring over shared memory
 * (spec/device.md RING-*), as tiny inline operations.
 *
 * Layout from the ring's offset (RING-1): tail u32 at +0 (producer-owned),
 * head u32 at +64 (consumer-owned), flags u32 at +128 (consumer-owned, bit 0
 * NEED_WAKEUP), slots at +192. Indices are free-running u32 counters; the slot
 * of index i is i & (entries - 1) (RING-3); empty when head == tail, full when
 * tail - head == entries (RING-4).
 *
 * The other side of a ring is another process that may be buggy or hostile:
 * every index it writes is checked before use (RING-10), and we read only its
 * index, never trust our own view of it for anything but arithmetic.
 */
#ifndef NK_RING_H
#define NK_RING_H

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "ring indices need lock-free 32-bit atomics");

#include "nqe.h"

#define NK_RING_TAIL 0
#define NK_RING_HEAD 64
#define NK_RING_FLAGS 128
#define NK_RING_SLOTS 192
#define NK_RING_NEED_WAKEUP 1u

/* The index words are plain uint32_t* here (so cffi can declare the struct) and
 * are only ever accessed through NK_ATOMIC(): a C11 atomic of the same size and
 * representation, which on every target we build for is lock-free. */
#define NK_ATOMIC(p) ((_Atomic uint32_t *)(p))

struct nk_ring {
	uint32_t *tail;
	uint32_t *head;
	uint32_t *flags;
	struct nk_nqe *slots;
	uint32_t entries;
	uint32_t mask;
};

/* A view of the ring whose header starts at `base`; entries is a power of two. */
static inline int nk_ring_init(struct nk_ring *r, void *base, uint32_t entries)
{
	if (entries < 2 || (entries & (entries - 1)))
		return -EINVAL;
	r->tail = (uint32_t *)((char *)base + NK_RING_TAIL);
	r->head = (uint32_t *)((char *)base + NK_RING_HEAD);
	r->flags = (uint32_t *)((char *)base + NK_RING_FLAGS);
	r->slots = (struct nk_nqe *)((char *)base + NK_RING_SLOTS);
	r->entries = entries;
	r->mask = entries - 1;
	return 0;
}

/* NQEs published and not consumed, or -EBADMSG if the indices are impossible
 * (RING-10). Either side may call it. */
static inline int64_t nk_ring_count(const struct nk_ring *r)
{
	/* acquire on both: a consumer calling this then reads slots up to tail,
	 * a producer then writes slots up to head. */
	uint32_t tail = atomic_load_explicit(NK_ATOMIC(r->tail), memory_order_acquire);
	uint32_t head = atomic_load_explicit(NK_ATOMIC(r->head), memory_order_acquire);
	uint32_t used = tail - head;
	return used > r->entries ? -EBADMSG : (int64_t)used;
}

/* Producer: publish up to n NQEs in order with one tail store (RING-8).
 * Returns how many were published (0 when full), or -EBADMSG (RING-10). */
static inline int64_t nk_ring_push(struct nk_ring *r, const struct nk_nqe *src, uint32_t n)
{
	/* our own index: relaxed, only we write it */
	uint32_t tail = atomic_load_explicit(NK_ATOMIC(r->tail), memory_order_relaxed);
	/* acquire: the consumer's slot reads before its head store are complete,
	 * so the slots below head are ours to overwrite */
	uint32_t head = atomic_load_explicit(NK_ATOMIC(r->head), memory_order_acquire);
	uint32_t used = tail - head;
	if (used > r->entries)
		return -EBADMSG;
	uint32_t room = r->entries - used;
	if (n > room)
		n = room;
	for (uint32_t i = 0; i < n; i++)
		memcpy(&r->slots[(tail + i) & r->mask], &src[i], sizeof(struct nk_nqe));
	if (n)
		/* release: the slot writes above are visible before the new tail (RING-5) */
		atomic_store_explicit(NK_ATOMIC(r->tail), tail + n, memory_order_release);
	return n;
}

/* Producer, after a push: must the consumer's bell be rung? (RING-6) */
static inline int nk_ring_consumer_sleeping(const struct nk_ring *r)
{
	/* seq_cst fence: orders our tail store before the flags load; pairs with
	 * the consumer's fence between its flags store and tail re-load. Without
	 * it both sides could miss each other and the consumer sleeps on work. */
	atomic_thread_fence(memory_order_seq_cst);
	return (atomic_load_explicit(NK_ATOMIC(r->flags), memory_order_relaxed) & NK_RING_NEED_WAKEUP) != 0;
}

/* Consumer: take up to n NQEs in FIFO order with one head store (RING-8).
 * Returns how many were taken, or -EBADMSG (RING-10): no slot is read then. */
static inline int64_t nk_ring_pop(struct nk_ring *r, struct nk_nqe *dst, uint32_t n)
{
	uint32_t head = atomic_load_explicit(NK_ATOMIC(r->head), memory_order_relaxed); /* ours */
	/* acquire: pairs with the producer's release of tail (RING-5) */
	uint32_t tail = atomic_load_explicit(NK_ATOMIC(r->tail), memory_order_acquire);
	uint32_t used = tail - head;
	if (used > r->entries)
		return -EBADMSG;
	if (n > used)
		n = used;
	for (uint32_t i = 0; i < n; i++)
		memcpy(&dst[i], &r->slots[(head + i) & r->mask], sizeof(struct nk_nqe));
	if (n)
		/* release: our slot reads complete before the producer may reuse them */
		atomic_store_explicit(NK_ATOMIC(r->head), head + n, memory_order_release);
	return n;
}

/* Consumer: the NQE at head without taking it, or NULL when empty or the
 * indices are impossible (check nk_ring_count). Pair with nk_ring_advance. */
static inline const struct nk_nqe *nk_ring_peek(const struct nk_ring *r, uint32_t i)
{
	uint32_t head = atomic_load_explicit(NK_ATOMIC(r->head), memory_order_relaxed);
	uint32_t tail = atomic_load_explicit(NK_ATOMIC(r->tail), memory_order_acquire);
	uint32_t used = tail - head;
	if (used > r->entries || i >= used)
		return NULL;
	return &r->slots[(head + i) & r->mask];
}

/* Consumer: release n peeked slots. */
static inline void nk_ring_advance(struct nk_ring *r, uint32_t n)
{
	uint32_t head = atomic_load_explicit(NK_ATOMIC(r->head), memory_order_relaxed);
	/* release: the peeked slot reads complete before the producer reuses them */
	atomic_store_explicit(NK_ATOMIC(r->head), head + n, memory_order_release);
}

/* Consumer: set NEED_WAKEUP, then re-check (RING-6). Returns 1 if the ring is
 * still empty (the caller may sleep on its bell), 0 if work slipped in (the
 * flag is cleared again), -EBADMSG on impossible indices (the flag is left set,
 * byte for byte what reference/ring.py leaves; the ring is unusable anyway). */
static inline int nk_ring_prepare_sleep(struct nk_ring *r)
{
	atomic_store_explicit(NK_ATOMIC(r->flags), NK_RING_NEED_WAKEUP, memory_order_relaxed);
	/* seq_cst fence: the flag store is visible before we re-load tail; pairs
	 * with the producer's fence in nk_ring_consumer_sleeping (RING-6) */
	atomic_thread_fence(memory_order_seq_cst);
	int64_t used = nk_ring_count(r);
	if (used < 0)
		return (int)used; /* RING-10: stop here; the flag stays as the reference leaves it */
	if (used != 0) {
		atomic_store_explicit(NK_ATOMIC(r->flags), 0, memory_order_relaxed);
		return 0;
	}
	return 1;
}

/* Consumer: clear NEED_WAKEUP after waking (RING-6, RING-11). */
static inline void nk_ring_finish_sleep(struct nk_ring *r)
{
	atomic_store_explicit(NK_ATOMIC(r->flags), 0, memory_order_relaxed);
}

/* push and pop on untyped bytes, for bindings that hold NQEs as byte strings
 * (fastpath/ring.py passes a Python bytes object straight through cffi). An
 * NQE is packed, so any byte address is a valid struct nk_nqe address. */
static inline int64_t nk_ring_push_bytes(struct nk_ring *r, const char *src, uint32_t n)
{
	return nk_ring_push(r, (const struct nk_nqe *)(const void *)src, n);
}

static inline int64_t nk_ring_pop_bytes(struct nk_ring *r, char *dst, uint32_t n)
{
	return nk_ring_pop(r, (struct nk_nqe *)(void *)dst, n);
}

#endif
