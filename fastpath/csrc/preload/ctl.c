/* The control connection: one AF_UNIX SOCK_SEQPACKET connection per process to
 * nk-agent, opened lazily, one request and one reply at a time (agent_proto.h).
 *
 * Never shared between processes: a forked child closes its inherited copy (the
 * atfork child handler, or the getpid check for raw clone()) and connects anew.
 * The program may close or dup2 over it (daemons close every fd): before each
 * request fstat checks the fd still is the socket we connected, else reconnect.
 *
 * No agent reachable: socket() spawns one (PRE-1), detached (double fork, so it is
 * never the program's child), and waits for its ready byte; no byte means it could
 * not attach (no instance: exit status 3) and socket() fails with ENETDOWN (PRE-9). */
#include "preload.h"

#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>

#define CTL_FD_MIN 700          /* out of the way of programs that expect small fds */
#define READY_TIMEOUT_MS 10000  /* an agent attaches in well under a second */
#define DEFAULT_ROOT "/dev/shm/netkernel"
#define DEFAULT_INSTANCE "default"

extern char **environ;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int ctl_fd = -1;      /* guarded by mu; read without it by nk_ctl_is_ours */
static uint64_t ctl_ino;
static pid_t ctl_pid;
static unsigned spawned;     /* agents this process started: unique socket names */

bool nk_ctl_is_ours(int fd)
{
	return fd >= 0 && fd == __atomic_load_n(&ctl_fd, __ATOMIC_ACQUIRE);
}

/* The program closed or replaced our fd: forget it (the fd is the program's now). */
void nk_ctl_lost(int fd)
{
	int expected = fd;
	if (fd >= 0)
		__atomic_compare_exchange_n(&ctl_fd, &expected, -1, false, __ATOMIC_ACQ_REL,
					    __ATOMIC_ACQUIRE);
}

/* Our connection's fd, if it still is ours: closefrom() and the like close fds
 * behind our back, and the number may be the program's by now. */
static bool fd_is_ctl(void)
{
	struct stat st;
	return ctl_fd >= 0 && fstat(ctl_fd, &st) == 0 && st.st_ino == ctl_ino;
}

static int ensure(bool spawn);

void nk_ctl_atfork_child(void)
{
	/* The parent's lock state and connection are the parent's. */
	pthread_mutex_init(&mu, NULL);
	bool used = ctl_fd >= 0;
	if (fd_is_ctl())
		REAL(close)(ctl_fd);
	ctl_fd = -1;
	/* A child of a process that uses NetKernel connects now, while it has its parent's
	 * credentials: a server's workers drop privileges before their first socket call
	 * (nginx's switch to `nobody`), and could not reach the agent's socket then (PRE-2). */
	if (used)
		ensure(false);
}

void nk_ctl_init(void)
{
	pthread_atfork(NULL, NULL, nk_ctl_atfork_child);
}

static void drop(void)
{
	if (fd_is_ctl())
		REAL(close)(ctl_fd);
	__atomic_store_n(&ctl_fd, -1, __ATOMIC_RELEASE);
}

static bool still_ours(void)
{
	if (ctl_fd < 0)
		return false;
	if (!fd_is_ctl()) {
		__atomic_store_n(&ctl_fd, -1, __ATOMIC_RELEASE); /* not ours to close any more */
		return false;
	}
	if (ctl_pid != getpid()) {
		/* A child made by raw clone() (no atfork handler): the parent's connection. */
		drop();
		return false;
	}
	return true;
}

static int64_t exchange(const struct nk_ag_req *req, struct nk_ag_rep *rep, int *fd_out);

/* connect(2) to a unix socket path of any length: one longer than sun_path is
 * reached through its directory, opened O_PATH, as /proc/self/fd/N/NAME (the agent
 * binds such paths the same way). */
static int connect_unix(int s, const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int dfd = -1;
	if (strlen(path) < sizeof sa.sun_path) {
		strcpy(sa.sun_path, path);
	} else {
		const char *slash = strrchr(path, '/');
		char dir[PATH_MAX];
		if (slash == NULL || (size_t)(slash - path) >= sizeof dir)
			return -ENAMETOOLONG;
		memcpy(dir, path, (size_t)(slash - path));
		dir[slash - path] = 0;
		dfd = open(dir[0] ? dir : "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
		if (dfd < 0)
			return -errno;
		int n = snprintf(sa.sun_path, sizeof sa.sun_path, "/proc/self/fd/%d/%s", dfd,
				 slash + 1);
		if (n < 0 || (size_t)n >= sizeof sa.sun_path) {
			REAL(close)(dfd);
			return -ENAMETOOLONG;
		}
	}
	int r = REAL(connect)(s, (struct sockaddr *)&sa, sizeof sa) < 0 ? -errno : 0;
	if (dfd >= 0)
		REAL(close)(dfd);
	return r;
}

static int connect_path(const char *path)
{
	int s = REAL(socket)(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -errno;
	int cr = connect_unix(s, path);
	if (cr < 0) {
		REAL(close)(s);
		return cr;
	}
	int high = REAL(fcntl)(s, F_DUPFD_CLOEXEC, CTL_FD_MIN);
	if (high >= 0) {
		REAL(close)(s);
		s = high;
	}
	struct stat st;
	if (fstat(s, &st) < 0) {
		int err = errno;
		REAL(close)(s);
		return -err;
	}
	ctl_ino = st.st_ino;
	ctl_pid = getpid();
	__atomic_store_n(&ctl_fd, s, __ATOMIC_RELEASE);
	struct nk_ag_req hello = { .op = NK_AG_HELLO, .arg = { NK_AG_VERSION } };
	struct nk_ag_rep rep;
	int64_t r = exchange(&hello, &rep, NULL);
	if (r < 0) {
		drop();
		return (int)r;
	}
	return 0;
}

/* environ without LD_PRELOAD: the agent itself must not be intercepted. */
static char **agent_env(void)
{
	size_t n = 0;
	for (char **e = environ; e && *e; e++)
		n++;
	char **env = malloc((n + 1) * sizeof *env);
	if (env == NULL)
		return NULL;
	size_t k = 0;
	for (char **e = environ; e && *e; e++)
		if (strncmp(*e, "LD_PRELOAD=", 11) != 0)
			env[k++] = *e;
	env[k] = NULL;
	return env;
}

/* The grandchild: only system calls from here on (a raw clone of a possibly
 * threaded process: no malloc, no locks). */
static __attribute__((noreturn)) void exec_agent(const char *bin, char **argv, char **env,
						 int ready)
{
	/* Not the program's signal mask, ignored signals or directory either. */
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int sig = 1; sig < 32; sig++)
		if (sig != SIGKILL && sig != SIGSTOP)
			signal(sig, SIG_DFL);
	if (chdir("/") < 0) {
		/* the agent needs no directory: go on */
	}
	int null = open("/dev/null", O_RDWR);
	if (null >= 0) {
		/* Nothing of the program's: its pipes must see EOF when it exits. */
		REAL(dup2)(null, 0);
		REAL(dup2)(null, 1);
		REAL(dup2)(null, 2);
	}
	/* Every other inherited fd goes at exec: an app end held by the agent would hide
	 * the program's last close (PRE-6). */
	if (nk_real.syscall(SYS_close_range, 3, ~0U, 4 /* CLOSE_RANGE_CLOEXEC */) < 0)
		for (int fd = 3; fd < 4096; fd++)
			if (fd != ready)
				REAL(close)(fd);
	REAL(fcntl)(ready, F_SETFD, 0);
	nk_real.execve(bin, argv, env);
	_exit(127);
}

static int spawn_agent(char *path, size_t size)
{
	const char *bin = nk_agent_bin();
	if (bin == NULL)
		return -ENETDOWN;
	const char *root = nk_env("NETKERNEL_ROOT");
	const char *inst = nk_env("NETKERNEL_INSTANCE");
	int n = snprintf(path, size, "%s/%s/agent-%d-%u.sock", root && *root ? root : DEFAULT_ROOT,
			 inst && *inst ? inst : DEFAULT_INSTANCE, (int)getpid(), spawned);
	if (n < 0 || (size_t)n >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
		/* A deep NETKERNEL_ROOT: the temporary directory, as `netkernel run` does. */
		const char *tmp = getenv("TMPDIR");
		n = snprintf(path, size, "%s/netkernel-agent-%d-%u.sock", tmp && *tmp ? tmp : "/tmp",
			     (int)getpid(), spawned);
		if (n < 0 || (size_t)n >= size)
			return -ENETDOWN;
	}
	spawned++;
	int p[2];
	if (pipe2(p, O_CLOEXEC) < 0)
		return -errno;
	char fdbuf[16];
	snprintf(fdbuf, sizeof fdbuf, "%d", p[1]);
	char *argv[] = { (char *)bin, "--socket", path, "--ready-fd", fdbuf, NULL };
	char **env = agent_env();
	if (env == NULL) {
		REAL(close)(p[0]);
		REAL(close)(p[1]);
		return -ENOMEM;
	}
	/* Raw clone: fork() would run the program's atfork handlers. */
	long pid = nk_real.syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
	if (pid == 0) {
		nk_real.syscall(SYS_setsid);
		if (nk_real.syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0) == 0)
			exec_agent(bin, argv, env, p[1]);
		_exit(0);
	}
	int err = pid < 0 ? errno : 0;
	REAL(close)(p[1]);
	free(env);
	if (pid < 0) {
		REAL(close)(p[0]);
		return -err;
	}
	while (waitpid((pid_t)pid, NULL, 0) < 0 && errno == EINTR)
		;
	/* One byte: attached and listening. EOF: it exited (3: no instance). */
	char byte;
	ssize_t got = -1;
	struct pollfd pfd = { .fd = p[0], .events = POLLIN };
	for (;;) {
		int r = poll(&pfd, 1, READY_TIMEOUT_MS);
		if (r < 0 && errno == EINTR)
			continue;
		if (r == 1)
			got = REAL(read)(p[0], &byte, 1);
		break;
	}
	REAL(close)(p[0]);
	if (got != 1)
		return -ENETDOWN;
	setenv(NK_AG_ENV_SOCKET, path, 1);
	nk_env_agent(path);
	return 0;
}

/* Connected, or -errno. Called with mu held. */
static int ensure(bool spawn)
{
	if (still_ours())
		return 0;
	const char *path = nk_env(NK_AG_ENV_SOCKET);
	int r = path ? connect_path(path) : -ENOENT;
	if (r == 0 || !spawn)
		return r;
	char fresh[PATH_MAX];
	r = spawn_agent(fresh, sizeof fresh);
	if (r < 0)
		return r;
	return connect_path(fresh);
}

static int64_t exchange(const struct nk_ag_req *req, struct nk_ag_rep *rep, int *fd_out)
{
	ssize_t n;
	do
		n = REAL(send)(ctl_fd, req, sizeof *req, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n != (ssize_t)sizeof *req)
		return -ECONNRESET;
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(4 * sizeof(int))];
	} cm;
	struct iovec iov = { rep, sizeof *rep };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf,
			     .msg_controllen = sizeof cm.buf };
	do
		n = REAL(recvmsg)(ctl_fd, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < (ssize_t)offsetof(struct nk_ag_rep, data))
		return -ECONNRESET;
	int got = -1;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		int nfd = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
		for (int i = 0; i < nfd; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
			if (got < 0 && fd_out != NULL)
				got = fd;
			else
				REAL(close)(fd);
		}
	}
	if (fd_out != NULL)
		*fd_out = got;
	if (rep->len > NK_AG_DATA_MAX)
		rep->len = NK_AG_DATA_MAX;
	return rep->result;
}

int64_t nk_ctl(const struct nk_ag_req *req, struct nk_ag_rep *rep, int *fd_out, bool spawn)
{
	if (fd_out != NULL)
		*fd_out = -1;
	memset(rep, 0, offsetof(struct nk_ag_rep, data));
	pthread_mutex_lock(&mu);
	int64_t r = -ECONNRESET;
	/* Twice at most: a connection found dead on use (the agent restarted, the
	 * program closed our fd between check and use) is reopened once. */
	for (int attempt = 0; attempt < 2; attempt++) {
		int c = ensure(spawn);
		if (c < 0) {
			r = spawn ? -ENETDOWN : -ECONNRESET;
			break;
		}
		r = exchange(req, rep, fd_out);
		if (r != -ECONNRESET || rep->result == -ECONNRESET)
			break;
		drop(); /* the transport failed, not the request */
		r = spawn ? -ENETDOWN : -ECONNRESET;
	}
	pthread_mutex_unlock(&mu);
	return r;
}
