/* The real libc functions behind every interposed name (PRE-3).
 *
 * dlsym(RTLD_NEXT) finds the next definition after this library in the lookup
 * order: libc's. Resolved once, under pthread_once, by the constructor or by the
 * first interposed call made before it ran (another library's constructor). */
#include "preload.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/syscall.h>

struct nk_real nk_real;
int nk_real_ready;

static pthread_once_t once = PTHREAD_ONCE_INIT;

/* execveat appeared in glibc 2.34: without it, the system call. */
static int execveat_syscall(int dirfd, const char *path, char *const argv[],
			    char *const envp[], int flags)
{
	return (int)nk_real.syscall(SYS_execveat, dirfd, path, argv, envp, flags);
}

static int close_range_syscall(unsigned first, unsigned last, int flags)
{
	return (int)nk_real.syscall(SYS_close_range, first, last, flags);
}

static void closefrom_syscall(int low)
{
	close_range_syscall((unsigned)low, ~0U, 0);
}

static void *need(const char *name)
{
	void *f = dlsym(RTLD_NEXT, name);
	if (f == NULL)
		abort(); /* without libc's own function there is no way to go on */
	return f;
}

#define LOAD(f) (*(void **)&nk_real.f = need(#f))

static void resolve(void)
{
	LOAD(socket); LOAD(bind); LOAD(listen); LOAD(connect); LOAD(accept); LOAD(accept4);
	LOAD(getsockname); LOAD(getpeername); LOAD(setsockopt); LOAD(getsockopt);
	LOAD(shutdown); LOAD(close); LOAD(dup); LOAD(dup2); LOAD(dup3); LOAD(fcntl);
	LOAD(ioctl); LOAD(read); LOAD(write); LOAD(readv); LOAD(writev); LOAD(send);
	LOAD(recv); LOAD(sendto); LOAD(recvfrom); LOAD(sendmsg); LOAD(recvmsg);
	LOAD(sendmmsg); LOAD(recvmmsg); LOAD(syscall); LOAD(execve); LOAD(execvpe);
	LOAD(fexecve); LOAD(posix_spawn); LOAD(posix_spawnp); LOAD(fork); LOAD(fclose);
	/* Newer than the oldest glibc we build on: optional. */
	*(void **)&nk_real.fcntl64 = dlsym(RTLD_NEXT, "fcntl64");
	if (nk_real.fcntl64 == NULL)
		nk_real.fcntl64 = nk_real.fcntl;
	*(void **)&nk_real.execveat = dlsym(RTLD_NEXT, "execveat");
	if (nk_real.execveat == NULL)
		nk_real.execveat = execveat_syscall;
	*(void **)&nk_real.close_range = dlsym(RTLD_NEXT, "close_range");
	if (nk_real.close_range == NULL)
		nk_real.close_range = close_range_syscall;
	*(void **)&nk_real.closefrom = dlsym(RTLD_NEXT, "closefrom");
	if (nk_real.closefrom == NULL)
		nk_real.closefrom = closefrom_syscall;
	/* Every pointer above is stored before a caller may see ready (acquire in REAL). */
	__atomic_store_n(&nk_real_ready, 1, __ATOMIC_RELEASE);
}

void nk_real_init(void)
{
	pthread_once(&once, resolve);
}

/* The library's constructor: libc first, then what exec must put back, then the
 * fd table of a program that inherited NetKernel sockets across exec (PRE-2). */
__attribute__((constructor)) static void nk_preload_init(void)
{
	nk_real_init();
	nk_env_init();
	nk_ctl_init();
	nk_fd_rebuild();
}
