/* libnkpreload.so's private header: the real libc functions, the fd table, the
 * control connection (spec/preload.md; the protocol is include/nk/agent_proto.h).
 *
 * Rules of this library:
 *   - it links against libc/libdl/libpthread only and never calls Python;
 *   - every intercepted call that is not about a NetKernel socket goes to libc
 *     unchanged, with the caller's errno (PRE-3);
 *   - a NetKernel socket's fd is a real kernel socket (the app end), so nothing
 *     that works on any fd (poll, epoll, select, read/write on TCP, fork) needs
 *     this library (PRE-2): it only adds what a byte stream cannot say.
 */
#ifndef NK_PRELOAD_H
#define NK_PRELOAD_H

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "nk/agent_proto.h"

#define NK_EXPORT __attribute__((visibility("default")))
#define NK_HIDDEN __attribute__((visibility("hidden")))

/* --- the real functions (real.c): resolved once with dlsym(RTLD_NEXT) ----------- */

struct nk_real {
	int (*socket)(int, int, int);
	int (*bind)(int, const struct sockaddr *, socklen_t);
	int (*listen)(int, int);
	int (*connect)(int, const struct sockaddr *, socklen_t);
	int (*accept)(int, struct sockaddr *, socklen_t *);
	int (*accept4)(int, struct sockaddr *, socklen_t *, int);
	int (*getsockname)(int, struct sockaddr *, socklen_t *);
	int (*getpeername)(int, struct sockaddr *, socklen_t *);
	int (*setsockopt)(int, int, int, const void *, socklen_t);
	int (*getsockopt)(int, int, int, void *, socklen_t *);
	int (*shutdown)(int, int);
	int (*close)(int);
	int (*close_range)(unsigned, unsigned, int);
	void (*closefrom)(int);
	int (*fclose)(FILE *);
	int (*dup)(int);
	int (*dup2)(int, int);
	int (*dup3)(int, int, int);
	int (*fcntl)(int, int, ...);
	int (*fcntl64)(int, int, ...);
	int (*ioctl)(int, unsigned long, ...);
	ssize_t (*read)(int, void *, size_t);
	ssize_t (*write)(int, const void *, size_t);
	ssize_t (*readv)(int, const struct iovec *, int);
	ssize_t (*writev)(int, const struct iovec *, int);
	ssize_t (*send)(int, const void *, size_t, int);
	ssize_t (*recv)(int, void *, size_t, int);
	ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
	ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
	ssize_t (*sendmsg)(int, const struct msghdr *, int);
	ssize_t (*recvmsg)(int, struct msghdr *, int);
	int (*sendmmsg)(int, struct mmsghdr *, unsigned, int);
	int (*recvmmsg)(int, struct mmsghdr *, unsigned, int, struct timespec *);
	long (*syscall)(long, ...);
	int (*execve)(const char *, char *const[], char *const[]);
	int (*execvpe)(const char *, char *const[], char *const[]);
	int (*fexecve)(int, char *const[], char *const[]);
	int (*execveat)(int, const char *, char *const[], char *const[], int);
	int (*posix_spawn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
			   const posix_spawnattr_t *, char *const[], char *const[]);
	int (*posix_spawnp)(pid_t *, const char *, const posix_spawn_file_actions_t *,
			    const posix_spawnattr_t *, char *const[], char *const[]);
	pid_t (*fork)(void);
};

NK_HIDDEN extern struct nk_real nk_real;
NK_HIDDEN extern int nk_real_ready;
NK_HIDDEN void nk_real_init(void);

/* The real `f`: resolved on first use if a constructor of another library calls
 * us before ours ran (pthread_once inside), then a plain load. */
#define REAL(f) (*(__atomic_load_n(&nk_real_ready, __ATOMIC_ACQUIRE) ? (void)0 \
		   : nk_real_init(), nk_real.f))

/* --- the fd table (fdtab.c) -------------------------------------------------------
 * fd -> what we know of it. Lock-free: one mmap'ed chunk of entries per 4096 fds,
 * never freed, so a lookup is two loads and no malloc (async-signal-safe). */

enum nk_fd_state {
	NK_FD_UNKNOWN = 0,  /* never looked at (or closed since) */
	NK_FD_OURS = 1,     /* a NetKernel socket: kind bits valid */
	NK_FD_NOT_OURS = 2, /* a socket the agent does not know (cached by st_ino) */
};

struct nk_fd {
	uint32_t state;     /* enum nk_fd_state, written last (release) */
	uint32_t kind;      /* NK_AG_KIND_* | NK_FD_UNCONNECTED */
	uint64_t ino;       /* st_ino of the fd when the entry was made */
};

/* A datagram socket created here and not connected yet: send without an address is
 * EDESTADDRREQ. (Unknown after exec: then the agent decides.) */
#define NK_FD_UNCONNECTED 0x100
/* A stream socket made here that never connected (or whose blocking connect failed):
 * its app end holds the filler, so the kernel would block where Linux says ENOTCONN
 * (receive) or EPIPE (send). With LISTEN: no byte stream at all. */
#define NK_FD_FRESH 0x200
#define NK_FD_NO_STREAM (NK_FD_FRESH | NK_AG_KIND_LISTEN)

NK_HIDDEN struct nk_fd *nk_fd_get(int fd);              /* NULL: none, never allocates */
NK_HIDDEN void nk_fd_set(int fd, uint32_t state, uint32_t kind, uint64_t ino);
NK_HIDDEN void nk_fd_clear(int fd);
NK_HIDDEN void nk_fd_copy(int from, int to);             /* dup: to gets from's entry */
NK_HIDDEN void nk_fd_add_kind(int fd, uint32_t bits);
NK_HIDDEN void nk_fd_del_kind(int fd, uint32_t bits);
/* The kind bits of fd if it is a NetKernel socket, else 0 (table only: fast path). */
NK_HIDDEN uint32_t nk_fd_kind_fast(int fd);
/* The kind bits of fd if it is a NetKernel socket, else 0: checks st_ino and asks
 * the agent (NK_AG_LOOKUP) about sockets it has not seen yet. For control calls. */
NK_HIDDEN uint32_t nk_fd_kind(int fd);
NK_HIDDEN void nk_fd_rebuild(void);

/* --- the control connection (ctl.c) --------------------------------------------- */

/* One request, one reply (agent_proto.h). *fd_out (if not NULL) receives an
 * SCM_RIGHTS fd (or -1). spawn: start an agent if none is reachable (only
 * NK_AG_SOCKET does). Returns the reply's result (>= 0 or -errno); on a dead or
 * unreachable agent -ENETDOWN (SOCKET) or -ECONNRESET. */
NK_HIDDEN int64_t nk_ctl(const struct nk_ag_req *req, struct nk_ag_rep *rep, int *fd_out,
			 bool spawn);
NK_HIDDEN bool nk_ctl_is_ours(int fd);      /* fd is this process's control connection */
NK_HIDDEN void nk_ctl_lost(int fd);         /* the program closed / dup2'ed over fd */
NK_HIDDEN void nk_ctl_atfork_child(void);
NK_HIDDEN void nk_ctl_init(void);

/* --- environment for exec (exec.c) ---------------------------------------------- */
NK_HIDDEN void nk_env_init(void);
NK_HIDDEN const char *nk_self_path(void);   /* this library, absolute if known */
NK_HIDDEN const char *nk_agent_bin(void);   /* nk-agent to spawn */
NK_HIDDEN void nk_env_agent(const char *path); /* the agent this process now uses */
NK_HIDDEN const char *nk_env(const char *name);  /* NETKERNEL_AGENT/_INSTANCE/_ROOT, kept */

/* --- helpers --------------------------------------------------------------------- */
static inline int nk_fail(int err)
{
	errno = err;
	return -1;
}

/* The sockets entry points the syscall() wrapper dispatches to (sock.c, io.c). */
NK_HIDDEN int nk_close(int fd);
NK_HIDDEN int nk_dup(int fd);
NK_HIDDEN int nk_dup2(int a, int b);
NK_HIDDEN int nk_dup3(int a, int b, int flags);

#endif
