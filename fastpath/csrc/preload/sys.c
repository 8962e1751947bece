/* syscall(): the socket system calls made by number go where the named calls go
 * (PRE-3); every other number is libc's syscall() with the six argument words. */
#include "preload.h"

#include <stdarg.h>
#include <sys/syscall.h>

#define I(k) ((int)a[k])
#define P(k) ((void *)a[k])

NK_EXPORT long syscall(long nr, ...)
{
	va_list ap;
	long a[6];
	va_start(ap, nr);
	for (int i = 0; i < 6; i++)
		a[i] = va_arg(ap, long);
	va_end(ap);
	switch (nr) {
	case SYS_socket:
		return socket(I(0), I(1), I(2));
	case SYS_bind:
		return bind(I(0), (const struct sockaddr *)P(1), (socklen_t)a[2]);
	case SYS_listen:
		return listen(I(0), I(1));
	case SYS_connect:
		return connect(I(0), (const struct sockaddr *)P(1), (socklen_t)a[2]);
#ifdef SYS_accept
	case SYS_accept:
		return accept(I(0), (struct sockaddr *)P(1), (socklen_t *)P(2));
#endif
	case SYS_accept4:
		return accept4(I(0), (struct sockaddr *)P(1), (socklen_t *)P(2), I(3));
	case SYS_getsockname:
		return getsockname(I(0), (struct sockaddr *)P(1), (socklen_t *)P(2));
	case SYS_getpeername:
		return getpeername(I(0), (struct sockaddr *)P(1), (socklen_t *)P(2));
	case SYS_setsockopt:
		return setsockopt(I(0), I(1), I(2), P(3), (socklen_t)a[4]);
	case SYS_getsockopt:
		return getsockopt(I(0), I(1), I(2), P(3), (socklen_t *)P(4));
	case SYS_shutdown:
		return shutdown(I(0), I(1));
	case SYS_close:
		return nk_close(I(0));
	case SYS_dup:
		return nk_dup(I(0));
#ifdef SYS_dup2
	case SYS_dup2:
		return nk_dup2(I(0), I(1));
#endif
	case SYS_dup3:
		return nk_dup3(I(0), I(1), I(2));
	case SYS_sendto:
		return sendto(I(0), P(1), (size_t)a[2], I(3), (const struct sockaddr *)P(4),
			      (socklen_t)a[5]);
	case SYS_recvfrom:
		return recvfrom(I(0), P(1), (size_t)a[2], I(3), (struct sockaddr *)P(4),
				(socklen_t *)P(5));
	case SYS_sendmsg:
		return sendmsg(I(0), (const struct msghdr *)P(1), I(2));
	case SYS_recvmsg:
		return recvmsg(I(0), (struct msghdr *)P(1), I(2));
	default:
		return REAL(syscall)(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
	}
}
