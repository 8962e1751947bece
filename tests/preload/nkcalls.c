/* C-level scenarios for tests/test_preload_api.py: what Python cannot call directly
 * (raw syscall(), vfork, execle, sigaction without SA_RESTART, the _chk variants
 * under _FORTIFY_SOURCE) and the static-binary bypass. Each prints what it saw, one
 * fact per line, no ports, so that the run under libnkpreload.so can be compared with
 * plain Linux. Usage: nkcalls NAME */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#define CHECK(x) do { if ((x) < 0) { printf("FAILED %s: %s\n", #x, strerror(errno)); exit(2); } } while (0)

static const char *ename(int e)
{
	switch (e) {
	case 0: return "0";
	case EPIPE: return "EPIPE";
	case ECONNRESET: return "ECONNRESET";
	case EINTR: return "EINTR";
	case EAGAIN: return "EAGAIN";
	case EINVAL: return "EINVAL";
	case ENOTCONN: return "ENOTCONN";
	case ENETDOWN: return "ENETDOWN";
	case ECONNREFUSED: return "ECONNREFUSED";
	default: return strerror(e);
	}
}

/* A listener on 127.0.0.1, a client connected to it, and the accepted end. */
static void tcp_trio(int *lst, int *cli, int *srv)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof a;
	CHECK(*lst = socket(AF_INET, SOCK_STREAM, 0));
	CHECK(bind(*lst, (struct sockaddr *)&a, sizeof a));
	CHECK(listen(*lst, 8));
	CHECK(getsockname(*lst, (struct sockaddr *)&a, &len));
	CHECK(*cli = socket(AF_INET, SOCK_STREAM, 0));
	CHECK(connect(*cli, (struct sockaddr *)&a, sizeof a));
	CHECK(*srv = accept(*lst, NULL, NULL));
}

static void on_alarm(int sig)
{
	(void)sig;
}

static int eintr(void)
{
	int lst, cli, srv;
	tcp_trio(&lst, &cli, &srv);
	struct sigaction sa = { .sa_handler = on_alarm }; /* no SA_RESTART */
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval it = { .it_value = { 0, 200000 } };
	setitimer(ITIMER_REAL, &it, NULL);
	char buf[8];
	ssize_t n = recv(cli, buf, sizeof buf, 0);
	printf("recv %zd %s\n", n, ename(n < 0 ? errno : 0));
	setitimer(ITIMER_REAL, &it, NULL);
	n = accept(lst, NULL, NULL);
	printf("accept %zd %s\n", n < 0 ? n : 0, ename(n < 0 ? errno : 0));
	setitimer(ITIMER_REAL, &it, NULL);
	n = read(cli, buf, sizeof buf);
	printf("read %zd %s\n", n, ename(n < 0 ? errno : 0));
	return 0;
}

/* Sends until the peer's close shows; MSG_NOSIGNAL or not. */
static int sigpipe(int flags)
{
	int lst, cli, srv;
	tcp_trio(&lst, &cli, &srv);
	close(srv);
	char buf[1024] = { 0 };
	for (int i = 0; i < 5000; i++) {
		if (send(cli, buf, sizeof buf, flags) < 0) {
			int e = errno;
			if (e == ECONNRESET) /* Linux may say ECONNRESET once, then EPIPE */
				continue;
			printf("send failed %s\n", ename(e));
			return 0;
		}
		usleep(1000);
	}
	printf("send never failed\n");
	return 1;
}

static int raw_syscalls(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof a;
	int lst = (int)syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
	CHECK(lst);
	CHECK(syscall(SYS_bind, lst, &a, sizeof a));
	CHECK(syscall(SYS_listen, lst, 4));
	CHECK(syscall(SYS_getsockname, lst, &a, &len));
	int cli = (int)syscall(SYS_socket, AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	CHECK(cli);
	CHECK(syscall(SYS_connect, cli, &a, sizeof a));
	struct sockaddr_in peer;
	socklen_t plen = sizeof peer;
	int srv = (int)syscall(SYS_accept4, lst, &peer, &plen, SOCK_CLOEXEC);
	CHECK(srv);
	printf("peer family %d len %u\n", peer.sin_family, plen);
	int v = 0;
	socklen_t vl = sizeof v;
	CHECK(syscall(SYS_getsockopt, cli, SOL_SOCKET, SO_DOMAIN, &v, &vl));
	printf("domain %d\n", v);
	CHECK(syscall(SYS_sendto, cli, "raw", 3, 0, NULL, 0));
	char buf[8] = { 0 };
	long n = syscall(SYS_recvfrom, srv, buf, sizeof buf, 0, NULL, NULL);
	printf("recvfrom %ld %s\n", n, buf);
	int d = (int)syscall(SYS_dup, srv);
	CHECK(d);
	CHECK(syscall(SYS_close, srv));
	CHECK(syscall(SYS_shutdown, d, SHUT_WR));
	n = syscall(SYS_recvfrom, cli, buf, sizeof buf, 0, NULL, NULL);
	printf("eof %ld\n", n);
	printf("getpid still works %d\n", syscall(SYS_getpid) == getpid());
	return 0;
}

/* Whether fd is an app end (an AF_UNIX socket of /proc/net/unix) or a real INET socket. */
static const char *what_is(int fd)
{
	struct stat st;
	if (fstat(fd, &st) < 0)
		return "bad fd";
	FILE *f = fopen("/proc/net/unix", "r");
	char line[512];
	while (f && fgets(line, sizeof line, f)) {
		unsigned long ino = 0;
		if (sscanf(line, "%*s %*s %*s %*s %*s %*s %lu", &ino) == 1 && ino == st.st_ino) {
			fclose(f);
			return "netkernel app end";
		}
	}
	if (f)
		fclose(f);
	return "kernel socket";
}

static int which_socket(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0) {
		printf("socket failed %s\n", ename(errno));
		return 0;
	}
	printf("%s\n", what_is(fd));
	return 0;
}

static int accept_flags(void)
{
	int lst, cli, srv;
	tcp_trio(&lst, &cli, &srv);
	int fl = fcntl(srv, F_GETFL), fd = fcntl(srv, F_GETFD);
	printf("accept: nonblock %d cloexec %d\n", !!(fl & O_NONBLOCK), !!(fd & FD_CLOEXEC));
	CHECK(fcntl(lst, F_SETFL, fcntl(lst, F_GETFL) | O_NONBLOCK));
	int r = accept4(lst, NULL, NULL, SOCK_NONBLOCK);
	printf("accept4 empty %d %s\n", r < 0 ? -1 : 0, ename(r < 0 ? errno : 0));
	int c2;
	struct sockaddr_in a;
	socklen_t len = sizeof a;
	CHECK(getsockname(lst, (struct sockaddr *)&a, &len));
	CHECK(c2 = socket(AF_INET, SOCK_STREAM, 0));
	CHECK(connect(c2, (struct sockaddr *)&a, sizeof a));
	struct pollfd p = { .fd = lst, .events = POLLIN };
	poll(&p, 1, 10000);
	struct sockaddr_in6 big;
	socklen_t small = 4; /* truncated address, full length reported */
	int s2 = accept4(lst, (struct sockaddr *)&big, &small, SOCK_NONBLOCK | SOCK_CLOEXEC);
	CHECK(s2);
	fl = fcntl(s2, F_GETFL), fd = fcntl(s2, F_GETFD);
	printf("accept4: nonblock %d cloexec %d addrlen %u\n", !!(fl & O_NONBLOCK),
	       !!(fd & FD_CLOEXEC), small);
	r = accept(cli, NULL, NULL);
	printf("accept on a connected socket %d %s\n", r < 0 ? -1 : 0, ename(r < 0 ? errno : 0));
	int u = socket(AF_INET, SOCK_STREAM, 0);
	r = accept(u, NULL, NULL);
	printf("accept on a fresh socket %d %s\n", r < 0 ? -1 : 0, ename(r < 0 ? errno : 0));
	struct sockaddr_in nowhere;
	len = sizeof nowhere;
	r = getpeername(u, (struct sockaddr *)&nowhere, &len);
	printf("getpeername unconnected %d %s\n", r, ename(r < 0 ? errno : 0));
	int nb = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	printf("socket flags: nonblock %d cloexec %d\n", !!(fcntl(nb, F_GETFL) & O_NONBLOCK),
	       !!(fcntl(nb, F_GETFD) & FD_CLOEXEC));
	int plain = socket(AF_INET, SOCK_DGRAM, 0);
	printf("plain flags: nonblock %d cloexec %d\n", !!(fcntl(plain, F_GETFL) & O_NONBLOCK),
	       !!(fcntl(plain, F_GETFD) & FD_CLOEXEC));
	return 0;
}

/* The _chk variants (built with _FORTIFY_SOURCE=2: recv/recvfrom/read on a buffer of
 * known size become __recv_chk & co) on UDP. */
static int chk(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof a;
	int r = socket(AF_INET, SOCK_DGRAM, 0), s = socket(AF_INET, SOCK_DGRAM, 0);
	CHECK(bind(r, (struct sockaddr *)&a, sizeof a));
	CHECK(getsockname(r, (struct sockaddr *)&a, &len));
	CHECK(connect(s, (struct sockaddr *)&a, sizeof a));
	char buf[16];
	volatile size_t room = sizeof buf; /* not a constant: the _chk variant is called */
	for (int i = 0; i < 3; i++)
		CHECK(send(s, "chk!", 4, 0));
	struct sockaddr_in from;
	socklen_t flen = sizeof from;
	ssize_t n = recvfrom(r, buf, room, 0, (struct sockaddr *)&from, &flen);
	printf("recvfrom %zd %.*s family %d\n", n, (int)n, buf, from.sin_family);
	n = recv(r, buf, room, 0);
	printf("recv %zd %.*s\n", n, (int)n, buf);
	n = read(r, buf, room);
	printf("read %zd %.*s\n", n, (int)n, buf);
	return 0;
}

/* vfork + execle with a bare environment, posix_spawn with an empty one: the child
 * prints LD_PRELOAD. */
static int spawns(void)
{
	char *bare[] = { "PATH=/usr/bin:/bin", NULL };
	pid_t pid = vfork();
	if (pid == 0) {
		execle("/bin/sh", "sh", "-c", "echo vfork+execle LD_PRELOAD=${LD_PRELOAD:+set}", (char *)NULL,
		       bare);
		_exit(127);
	}
	int st;
	waitpid(pid, &st, 0);
	fflush(stdout);
	char *argv[] = { "sh", "-c", "echo posix_spawn LD_PRELOAD=${LD_PRELOAD:+set}", NULL };
	char *empty[] = { NULL };
	CHECK(-posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, empty));
	waitpid(pid, &st, 0);
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		unsetenv("LD_PRELOAD");
		execlp("sh", "sh", "-c", "echo execlp LD_PRELOAD=${LD_PRELOAD:+set}", (char *)NULL);
		_exit(127);
	}
	waitpid(pid, &st, 0);
	char *argv2[] = { "sh", "-c", "echo posix_spawnp LD_PRELOAD=${LD_PRELOAD:+set}", NULL };
	CHECK(-posix_spawnp(&pid, "sh", NULL, NULL, argv2, bare));
	waitpid(pid, &st, 0);
	fflush(stdout);
	for (int how = 0; how < 3; how++) {
		static const char *names[] = { "execv", "fexecve", "execveat" };
		char cmd[80];
		snprintf(cmd, sizeof cmd, "echo %s LD_PRELOAD=${LD_PRELOAD:+set}", names[how]);
		char *av[] = { "sh", "-c", cmd, NULL };
		pid = fork();
		if (pid == 0) {
			if (how == 0) {
				clearenv();
				execv("/bin/sh", av);
			} else if (how == 1) {
				int fd = open("/bin/sh", O_RDONLY | O_CLOEXEC);
				fexecve(fd, av, bare);
			} else {
				execveat(AT_FDCWD, "/bin/sh", av, bare, 0);
			}
			_exit(127);
		}
		waitpid(pid, &st, 0);
	}
	return 0;
}

/* A daemon closes every fd it does not know (the library's control connection among
 * them), or dup2s over them: the library notices and reconnects. */
static int closeall(void)
{
	int lst, cli, srv;
	tcp_trio(&lst, &cli, &srv);
	for (int fd = 3; fd < 1024; fd++)
		if (fd != lst)
			close(fd);
	int c, s;
	struct sockaddr_in a;
	socklen_t len = sizeof a;
	CHECK(getsockname(lst, (struct sockaddr *)&a, &len));
	CHECK(c = socket(AF_INET, SOCK_STREAM, 0));
	CHECK(connect(c, (struct sockaddr *)&a, sizeof a));
	CHECK(s = accept(lst, NULL, NULL));
	printf("after closing every fd: connected\n");
	int null = open("/dev/null", O_RDONLY);
	for (int fd = 3; fd < 1024; fd++)
		if (fd != lst && fd != null)
			dup2(null, fd);
	for (int fd = 3; fd < 1024; fd++)
		if (fd != lst && fd != null)
			close(fd);
	CHECK(c = socket(AF_INET, SOCK_STREAM, 0));
	CHECK(connect(c, (struct sockaddr *)&a, sizeof a));
	CHECK(s = accept(lst, NULL, NULL));
	CHECK(send(c, "x", 1, 0));
	char b;
	printf("after dup2 over every fd: %zd\n", recv(s, &b, 1, 0));
	CHECK(close_range(3, ~0U, 0));
	CHECK(c = socket(AF_INET, SOCK_DGRAM, 0));
	printf("after close_range: udp socket %d\n", c >= 0);
	return 0;
}

/* sendmmsg/recvmmsg, readv/writev, sendmsg/recvmsg names on UDP; SO_RCVTIMEO; an
 * address given to sendto/sendmsg on a connected TCP socket; recvfrom on TCP. */
static int mmsg(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof a;
	int r = socket(AF_INET, SOCK_DGRAM, 0), s = socket(AF_INET, SOCK_DGRAM, 0);
	CHECK(bind(r, (struct sockaddr *)&a, sizeof a));
	CHECK(getsockname(r, (struct sockaddr *)&a, &len));
	char *words[] = { "alpha", "beta", "gamma" };
	struct iovec iov[3];
	struct mmsghdr out[3];
	memset(out, 0, sizeof out);
	for (int i = 0; i < 3; i++) {
		iov[i] = (struct iovec){ words[i], strlen(words[i]) };
		out[i].msg_hdr = (struct msghdr){ .msg_name = &a, .msg_namelen = sizeof a,
						  .msg_iov = &iov[i], .msg_iovlen = 1 };
	}
	int n = sendmmsg(s, out, 3, 0);
	printf("sendmmsg %d: %u %u %u\n", n, out[0].msg_len, out[1].msg_len, out[2].msg_len);
	char bufs[4][16];
	struct iovec in_iov[4];
	struct sockaddr_in from[4];
	struct mmsghdr in[4];
	memset(in, 0, sizeof in);
	for (int i = 0; i < 4; i++) {
		in_iov[i] = (struct iovec){ bufs[i], sizeof bufs[i] };
		in[i].msg_hdr = (struct msghdr){ .msg_name = &from[i], .msg_namelen = sizeof from[i],
						 .msg_iov = &in_iov[i], .msg_iovlen = 1 };
	}
	struct pollfd p = { .fd = r, .events = POLLIN };
	poll(&p, 1, 10000);
	usleep(100000); /* all three queued */
	n = recvmmsg(r, in, 4, MSG_WAITFORONE, NULL);
	printf("recvmmsg %d:", n);
	for (int i = 0; i < n; i++)
		printf(" %.*s/%u/%d", (int)in[i].msg_len, bufs[i], in[i].msg_hdr.msg_namelen,
		       from[i].sin_family);
	printf("\n");
	/* Two iovecs each way. */
	CHECK(connect(s, (struct sockaddr *)&a, sizeof a));
	struct iovec two[2] = { { "head-", 5 }, { "tail", 4 } };
	printf("writev %zd\n", writev(s, two, 2));
	char h[3], t[16] = { 0 };
	struct iovec back[2] = { { h, sizeof h }, { t, sizeof t } };
	ssize_t got = readv(r, back, 2);
	printf("readv %zd %.3s|%s\n", got, h, t);
	/* recvmsg: MSG_TRUNC in msg_flags, the name filled, no control messages. */
	CHECK(send(s, "0123456789", 10, 0));
	char small[4];
	struct iovec siov = { small, sizeof small };
	struct sockaddr_in src;
	char ctl[64];
	struct msghdr mh = { .msg_name = &src, .msg_namelen = sizeof src, .msg_iov = &siov,
			     .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl };
	got = recvmsg(r, &mh, 0);
	printf("recvmsg %zd trunc %d namelen %u controllen %zu\n", got, !!(mh.msg_flags & MSG_TRUNC),
	       mh.msg_namelen, (size_t)mh.msg_controllen);
	CHECK(send(s, "0123456789", 10, 0));
	got = recv(r, small, sizeof small, MSG_TRUNC);
	printf("recv MSG_TRUNC %zd\n", got);
	/* SO_RCVTIMEO: a blocking recv gives up with EAGAIN. */
	struct timeval tv = { 0, 200000 };
	CHECK(setsockopt(r, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv));
	struct timeval tv2;
	socklen_t tl = sizeof tv2;
	CHECK(getsockopt(r, SOL_SOCKET, SO_RCVTIMEO, &tv2, &tl));
	printf("rcvtimeo %ld.%06ld\n", (long)tv2.tv_sec, (long)tv2.tv_usec);
	got = recv(r, small, sizeof small, 0);
	printf("recv timeout %zd %s\n", got, ename(got < 0 ? errno : 0));
	/* TCP: an address given to a connected socket is ignored; recvfrom names nobody. */
	int lst, cli, srv;
	tcp_trio(&lst, &cli, &srv);
	printf("tcp sendto %zd\n", sendto(cli, "abc", 3, 0, (struct sockaddr *)&a, sizeof a));
	struct iovec one = { "def", 3 };
	struct msghdr tm = { .msg_name = &a, .msg_namelen = sizeof a, .msg_iov = &one, .msg_iovlen = 1 };
	printf("tcp sendmsg %zd\n", sendmsg(cli, &tm, 0));
	char tb[8] = { 0 };
	struct sockaddr_in who;
	socklen_t wl = sizeof who;
	got = recvfrom(srv, tb, 6, MSG_WAITALL, (struct sockaddr *)&who, &wl);
	printf("tcp recvfrom %zd %s addrlen %u\n", got, tb, wl);
	return 0;
}

/* A socket's fd closed inside glibc (fclose of an fdopen'ed FILE, closefrom), then
 * reused for a pipe: the pipe is a pipe, not the UDP socket the number used to be. */
static int reuse(void)
{
	for (int round = 0; round < 2; round++) {
		int u = socket(AF_INET, SOCK_DGRAM, 0);
		CHECK(u);
		if (round == 0) {
			FILE *f = fdopen(u, "r+");
			if (f == NULL || fclose(f) != 0)
				printf("fdopen/fclose failed\n");
		} else {
			closefrom(u);
		}
		int p[2];
		CHECK(pipe(p));
		char buf[8] = { 0 };
		ssize_t w = write(p[1], "pipe", 4);
		ssize_t r = read(p[0], buf, sizeof buf);
		printf("%s: reused %d, pipe write %zd read %zd %s\n", round ? "closefrom" : "fclose",
		       p[0] == u || p[1] == u, w, r, buf);
		close(p[0]);
		close(p[1]);
	}
	return 0;
}

/* A blocking connect to a listener whose queue is full (its SYNs are dropped) is
 * interrupted by a signal handler without SA_RESTART: EINTR (PRE-5). */
static int connect_eintr(const char *port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
				 .sin_port = htons((uint16_t)atoi(port)) };
	struct sigaction sa = { .sa_handler = on_alarm };
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval it = { .it_value = { 0, 300000 } };
	setitimer(ITIMER_REAL, &it, NULL);
	int c = socket(AF_INET, SOCK_STREAM, 0);
	CHECK(c);
	int r = connect(c, (struct sockaddr *)&a, sizeof a);
	printf("connect %d %s\n", r, ename(r < 0 ? errno : 0));
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	const char *what = argc > 1 ? argv[1] : "";
	if (!strcmp(what, "eintr"))
		return eintr();
	if (!strcmp(what, "sigpipe"))
		return sigpipe(0);
	if (!strcmp(what, "nosignal"))
		return sigpipe(MSG_NOSIGNAL);
	if (!strcmp(what, "syscall"))
		return raw_syscalls();
	if (!strcmp(what, "which"))
		return which_socket();
	if (!strcmp(what, "accept"))
		return accept_flags();
	if (!strcmp(what, "chk"))
		return chk();
	if (!strcmp(what, "mmsg"))
		return mmsg();
	if (!strcmp(what, "connect_eintr") && argc > 2)
		return connect_eintr(argv[2]);
	if (!strcmp(what, "reuse"))
		return reuse();
	if (!strcmp(what, "closeall"))
		return closeall();
	if (!strcmp(what, "spawns"))
		return spawns();
	fprintf(stderr, "usage: nkcalls eintr|sigpipe|nosignal|syscall|which|accept|chk|mmsg|connect_eintr PORT|reuse|closeall|spawns\n");
	return 2;
}
