/* The per-process fd table: which fds are NetKernel sockets (PRE-2, PRE-3).
 *
 * Ownership: an entry is written by the thread that creates, duplicates or closes
 * the fd (the program cannot use an fd concurrently with closing it and expect
 * anything), read by any thread. state is stored last with release and loaded
 * first with acquire, so a reader that sees OURS sees the kind and ino with it.
 *
 * The data calls (read/write/send/recv on UDP) trust the table: a table lookup is
 * two loads. The control calls (bind, connect, ...) re-check st_ino with fstat, so
 * an fd closed behind our back (inside glibc, close_range, another library) and
 * reused is never taken for the socket it used to be. */
#include "preload.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define CHUNK_BITS 12
#define CHUNK (1u << CHUNK_BITS)   /* fds per chunk: 64 KiB of entries */
#define CHUNKS 1024u               /* 4 Mi fds: more than any RLIMIT_NOFILE in use */

static struct nk_fd *chunks[CHUNKS];

struct nk_fd *nk_fd_get(int fd)
{
	if (fd < 0 || (unsigned)fd >= CHUNK * CHUNKS)
		return NULL;
	struct nk_fd *c = __atomic_load_n(&chunks[(unsigned)fd >> CHUNK_BITS], __ATOMIC_ACQUIRE);
	return c ? &c[(unsigned)fd & (CHUNK - 1)] : NULL;
}

/* The entry of fd, its chunk mapped if needed. mmap, not malloc: this may run in a
 * forked child of a threaded program or under a signal handler. */
static struct nk_fd *slot(int fd)
{
	struct nk_fd *e = nk_fd_get(fd);
	if (e != NULL || fd < 0 || (unsigned)fd >= CHUNK * CHUNKS)
		return e;
	void *m = mmap(NULL, CHUNK * sizeof(struct nk_fd), PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return NULL;
	struct nk_fd *expected = NULL;
	struct nk_fd **p = &chunks[(unsigned)fd >> CHUNK_BITS];
	/* Two threads may race to map the same chunk: the loser unmaps its copy. */
	if (!__atomic_compare_exchange_n(p, &expected, (struct nk_fd *)m, false,
					 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		munmap(m, CHUNK * sizeof(struct nk_fd));
	return nk_fd_get(fd);
}

void nk_fd_set(int fd, uint32_t state, uint32_t kind, uint64_t ino)
{
	struct nk_fd *e = slot(fd);
	if (e == NULL)
		return;
	__atomic_store_n(&e->state, NK_FD_UNKNOWN, __ATOMIC_RELAXED);
	__atomic_store_n(&e->kind, kind, __ATOMIC_RELAXED);
	__atomic_store_n(&e->ino, ino, __ATOMIC_RELAXED);
	__atomic_store_n(&e->state, state, __ATOMIC_RELEASE);
}

void nk_fd_clear(int fd)
{
	struct nk_fd *e = nk_fd_get(fd);
	if (e != NULL)
		__atomic_store_n(&e->state, NK_FD_UNKNOWN, __ATOMIC_RELEASE);
}

void nk_fd_copy(int from, int to)
{
	struct nk_fd *e = nk_fd_get(from);
	uint32_t state = e ? __atomic_load_n(&e->state, __ATOMIC_ACQUIRE) : NK_FD_UNKNOWN;
	if (state == NK_FD_UNKNOWN)
		nk_fd_clear(to);
	else
		nk_fd_set(to, state, __atomic_load_n(&e->kind, __ATOMIC_RELAXED),
			  __atomic_load_n(&e->ino, __ATOMIC_RELAXED));
}

void nk_fd_add_kind(int fd, uint32_t bits)
{
	struct nk_fd *e = nk_fd_get(fd);
	if (e != NULL)
		__atomic_or_fetch(&e->kind, bits, __ATOMIC_RELEASE);
}

void nk_fd_del_kind(int fd, uint32_t bits)
{
	struct nk_fd *e = nk_fd_get(fd);
	if (e != NULL)
		__atomic_and_fetch(&e->kind, ~bits, __ATOMIC_RELEASE);
}

uint32_t nk_fd_kind_fast(int fd)
{
	struct nk_fd *e = nk_fd_get(fd);
	if (e == NULL || __atomic_load_n(&e->state, __ATOMIC_ACQUIRE) != NK_FD_OURS)
		return 0;
	return __atomic_load_n(&e->kind, __ATOMIC_RELAXED);
}

/* An AF_UNIX stream or seqpacket socket is what an app end looks like; anything else
 * (a pipe, a file, a real INET socket) is never ours and costs no request. */
static bool may_be_app_end(int fd)
{
	int v = 0;
	socklen_t len = sizeof v;
	if (REAL(getsockopt)(fd, SOL_SOCKET, SO_DOMAIN, &v, &len) < 0 || v != AF_UNIX)
		return false;
	len = sizeof v;
	if (REAL(getsockopt)(fd, SOL_SOCKET, SO_TYPE, &v, &len) < 0)
		return false;
	return v == SOCK_STREAM || v == SOCK_SEQPACKET;
}

uint32_t nk_fd_kind(int fd)
{
	struct stat st;
	if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode)) {
		nk_fd_clear(fd);
		return 0; /* libc reports EBADF / ENOTSOCK itself */
	}
	if (nk_ctl_is_ours(fd))
		return 0;
	struct nk_fd *e = nk_fd_get(fd);
	uint32_t state = e ? __atomic_load_n(&e->state, __ATOMIC_ACQUIRE) : NK_FD_UNKNOWN;
	if (state != NK_FD_UNKNOWN && __atomic_load_n(&e->ino, __ATOMIC_RELAXED) == st.st_ino)
		return state == NK_FD_OURS ? __atomic_load_n(&e->kind, __ATOMIC_RELAXED) : 0;
	if (!may_be_app_end(fd)) {
		nk_fd_set(fd, NK_FD_NOT_OURS, 0, st.st_ino);
		return 0;
	}
	struct nk_ag_req req = { .op = NK_AG_LOOKUP, .ino = st.st_ino };
	struct nk_ag_rep rep;
	int64_t r = nk_ctl(&req, &rep, NULL, false);
	if (r >= 0) {
		nk_fd_set(fd, NK_FD_OURS, (uint32_t)r, st.st_ino);
		return (uint32_t)r;
	}
	if (r == -ENOENT)
		nk_fd_set(fd, NK_FD_NOT_OURS, 0, st.st_ino);
	/* No agent reachable: not ours as far as anyone can tell; asked again next time. */
	return 0;
}

/* After exec the table is empty but the sockets without CLOEXEC are still open:
 * ask the agent about every inherited socket that may be an app end (PRE-2). */
void nk_fd_rebuild(void)
{
	if (nk_env(NK_AG_ENV_SOCKET) == NULL)
		return;
	DIR *d = opendir("/proc/self/fd");
	if (d == NULL)
		return;
	struct dirent *de;
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] < '0' || de->d_name[0] > '9')
			continue;
		int fd = atoi(de->d_name);
		if (fd == dirfd(d))
			continue;
		struct stat st;
		if (fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode) && may_be_app_end(fd))
			(void)nk_fd_kind(fd);
	}
	closedir(d);
}
