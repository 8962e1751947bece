/* nk-agent: the tenant's guest-side relay (spec/preload.md PRE-1, include/nk/agent_proto.h).
 *
 *   nk-agent --socket PATH [--instance NAME] [--root DIR] [--ready-fd N] [--hold-fd N]
 *            [--idle-ms MS] [--name S]
 *
 * PRE-1: attach a tenant device first (RT-3; exit 3 with one line on stderr if that fails,
 * the library then answers ENETDOWN), then listen on PATH, then write one byte to
 * --ready-fd. Exit 0 once idle (no control connection, no live socket, --hold-fd at EOF)
 * for --idle-ms, after waiting at most 5 s for SEND/CLOSE replies (GL-10); PATH is
 * removed. The CoreEngine's end (engine.sock EOF or a DETACHED header, RT-4, GL-9) resets
 * every socket (PRE-9) and the agent exits once idle. SIGTERM: exit as if idle now.
 * SIGINT is ignored: a Ctrl-C meant for the program must not cut its sockets.
 *
 * A device handed to us (spec/vm.md VM-3): NETKERNEL_DEVICE=pci maps BAR 2 of the PCI
 * device 1af4:1110 (ivshmem: a guest whose host attached the device for it and holds the
 * connection), NETKERNEL_DEVICE=PATH maps that file the same way; with NETKERNEL_DEVICE
 * unset the PCI device is taken when the instance has no engine.sock. No attach then:
 * the VM ID is the header's dev_id, the CoreEngine's end is the header's DETACHED (VM-4),
 * the file is flock'ed (VM-6), and a POLLED device's bells are polled (VM-2).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"
#include "nk/bell.h"

struct ag_tag ag_tag_listen = { AG_K_LISTEN }, ag_tag_wake = { AG_K_WAKE },
	      ag_tag_engine = { AG_K_ENGINE }, ag_tag_hold = { AG_K_HOLD },
	      ag_tag_signal = { AG_K_SIGNAL };

struct opts {
	const char *socket, *instance, *root, *name;
	int ready_fd, hold_fd;
	long idle_ms;
};

static int unix_addr(const char *path, struct sockaddr_un *sa, int *dirfd);

static struct ag agent; /* large (the scratch buffer): static, not on the stack */

static void usage(void)
{
	fprintf(stderr, "usage: nk-agent --socket PATH [--instance NAME] [--root DIR] "
			"[--ready-fd N] [--hold-fd N] [--idle-ms MS] [--name S]\n");
	exit(2);
}

static void parse(int argc, char **argv, struct opts *o)
{
	static const struct option longs[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "instance", required_argument, NULL, 'i' },
		{ "root", required_argument, NULL, 'r' },
		{ "ready-fd", required_argument, NULL, 'R' },
		{ "hold-fd", required_argument, NULL, 'H' },
		{ "idle-ms", required_argument, NULL, 'I' },
		{ "name", required_argument, NULL, 'n' },
		{ NULL, 0, NULL, 0 },
	};
	*o = (struct opts){ .ready_fd = -1, .hold_fd = -1, .idle_ms = 2000, .name = "nk-agent" };
	int c;
	while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
		switch (c) {
		case 's': o->socket = optarg; break;
		case 'i': o->instance = optarg; break;
		case 'r': o->root = optarg; break;
		case 'R': o->ready_fd = atoi(optarg); break;
		case 'H': o->hold_fd = atoi(optarg); break;
		case 'I': o->idle_ms = atol(optarg); break;
		case 'n': o->name = optarg; break;
		default: usage();
		}
	}
	if (!o->socket || optind != argc)
		usage();
	/* RT-1: the command line, else the environment, else the defaults */
	if (!o->instance)
		o->instance = getenv("NETKERNEL_INSTANCE");
	if (!o->instance || !*o->instance)
		o->instance = "default";
	if (!o->root)
		o->root = getenv("NETKERNEL_ROOT");
	if (!o->root || !*o->root)
		o->root = "/dev/shm/netkernel";
}

/* ---- attach (RT-3) ---------------------------------------------------------------------- */

/* The JSON value after "key": in line; a string value into out (escapes kept simple). */
static const char *json_value(const char *line, const char *key)
{
	char pat[64];
	snprintf(pat, sizeof(pat), "\"%s\"", key);
	const char *p = strstr(line, pat);
	if (!p)
		return NULL;
	p += strlen(pat);
	while (*p == ' ' || *p == ':')
		p++;
	return p;
}

static int json_string(const char *v, char *out, size_t cap)
{
	if (!v || *v != '"')
		return -1;
	size_t n = 0;
	for (v++; *v && *v != '"'; v++) {
		if (*v == '\\' && v[1])
			v++;
		if (n + 1 >= cap)
			return -1;
		out[n++] = *v;
	}
	out[n] = 0;
	return *v == '"' ? 0 : -1;
}

static void json_escape(const char *in, char *out, size_t cap)
{
	size_t n = 0;
	for (; *in && n + 3 < cap; in++) {
		if ((unsigned char)*in < 0x20)
			continue;
		if (*in == '"' || *in == '\\')
			out[n++] = '\\';
		out[n++] = *in;
	}
	out[n] = 0;
}

/* Attach a tenant device; the connection stays open (RT-4). 0, or -1 with *why set. */
static int attach(struct ag *a, const struct opts *o, char *dev, size_t devcap, const char **why)
{
	static char msg[PATH_MAX + 256];
	char path[PATH_MAX];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int dirfd = -1;
	if ((size_t)snprintf(path, sizeof(path), "%s/%s/engine.sock", o->root, o->instance) >=
		    sizeof(path) ||
	    unix_addr(path, &sa, &dirfd) < 0) {
		*why = "engine.sock path too long";
		return -1;
	}
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		snprintf(msg, sizeof(msg), "no NetKernel instance %s (%s: %s)", o->instance, path,
			 strerror(errno));
		*why = msg;
		if (fd >= 0)
			close(fd);
		if (dirfd >= 0)
			close(dirfd);
		return -1;
	}
	if (dirfd >= 0)
		close(dirfd);
	char name[200], line[4096];
	json_escape(o->name, name, sizeof(name));
	int len = snprintf(line, sizeof(line),
			   "{\"cmd\": \"attach\", \"kind\": \"tenant\", \"pid\": %d, \"name\": \"%s\"}\n",
			   (int)getpid(), name);
	if (write(fd, line, (size_t)len) != len) {
		*why = "engine.sock: write failed";
		close(fd);
		return -1;
	}
	size_t got = 0;
	while (got < sizeof(line) - 1 && !memchr(line, '\n', got)) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		if (poll(&p, 1, 5000) != 1) {
			*why = "engine.sock: no answer to attach in 5 s";
			close(fd);
			return -1;
		}
		ssize_t n = read(fd, line + got, sizeof(line) - 1 - got);
		if (n <= 0) {
			*why = "engine.sock closed during attach";
			close(fd);
			return -1;
		}
		got += (size_t)n;
		line[got] = 0;
	}
	line[got] = 0;
	const char *ok = json_value(line, "ok");
	if (!ok || strncmp(ok, "true", 4) != 0 || json_string(json_value(line, "path"), dev, devcap)) {
		char err[300] = "bad reply";
		json_string(json_value(line, "error"), err, sizeof(err));
		snprintf(msg, sizeof(msg), "instance %s refused the attach: %s", o->instance, err);
		*why = msg;
		close(fd);
		return -1;
	}
	const char *id = json_value(line, "id");
	a->vm_id = id ? atoll(id) : -1;
	a->engine_fd = fd;
	return 0;
}

/* Map the device file at `path` (MAP_SHARED, the whole file: a BAR may be longer than the
 * device, DEV-14). A handed device (VM-3) is first locked (VM-6) and its fd kept for the
 * lock; its VM ID is the header's dev_id. */
static int map_device(struct ag *a, const char *path, bool handed, const char **why)
{
	static char msg[PATH_MAX + 128];
	int fd = open(path, O_RDWR | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		snprintf(msg, sizeof(msg), "cannot open the device %s: %s", path, strerror(errno));
		*why = msg;
		if (fd >= 0)
			close(fd);
		return -1;
	}
	if (handed && flock(fd, LOCK_EX | LOCK_NB) < 0) {
		snprintf(msg, sizeof(msg), "the device %s is in use by another device side (%s)",
			 path, strerror(errno));
		*why = msg;
		close(fd);
		return -1;
	}
	void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (base == MAP_FAILED) {
		snprintf(msg, sizeof(msg), "cannot map the device %s: %s", path, strerror(errno));
		*why = msg;
		close(fd);
		return -1;
	}
	if (handed)
		a->dev_fd = fd; /* the flock lives as long as the fd (VM-6) */
	else
		close(fd);
	int rc = ag_dev_init(a, base, (uint64_t)st.st_size); /* DEV-2, DEV-12..14, READY */
	if (rc < 0) {
		snprintf(msg, sizeof(msg), "%s is not a ready tenant device: %s", path,
			 strerror(-rc));
		*why = msg;
		return -1;
	}
	if (handed)
		a->vm_id = ((const struct nk_dev_header *)base)->dev_id; /* VM-3 */
	return 0;
}

/* ---- a device handed to us: the guest's PCI BAR, or a file (spec/vm.md VM-3) ------------ */

#define NK_IVSHMEM_VENDOR 0x1af4
#define NK_IVSHMEM_DEVICE 0x1110

static long read_hex_file(const char *dir, const char *name)
{
	char path[PATH_MAX], buf[32];
	if ((size_t)snprintf(path, sizeof(path), "%s/%s", dir, name) >= sizeof(path))
		return -1;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	return strtol(buf, NULL, 16);
}

/* The first PCI device 1af4:1110 under the PCI devices directory (NETKERNEL_PCI_ROOT for
 * the tests, else /sys/bus/pci/devices), as the path of its resource2: 0, or -1. */
static int find_pci(char *out, size_t cap)
{
	const char *root = getenv("NETKERNEL_PCI_ROOT");
	if (!root || !*root)
		root = "/sys/bus/pci/devices";
	DIR *d = opendir(root);
	if (!d)
		return -1;
	char best[NAME_MAX + 1] = "";
	struct dirent *e;
	while ((e = readdir(d))) { /* the lowest address wins: one answer, whatever the order */
		char dir[PATH_MAX];
		if (e->d_name[0] == '.' ||
		    (size_t)snprintf(dir, sizeof(dir), "%s/%s", root, e->d_name) >= sizeof(dir))
			continue;
		if (read_hex_file(dir, "vendor") == NK_IVSHMEM_VENDOR &&
		    read_hex_file(dir, "device") == NK_IVSHMEM_DEVICE &&
		    (!best[0] || strcmp(e->d_name, best) < 0))
			snprintf(best, sizeof(best), "%s", e->d_name);
	}
	closedir(d);
	if (!best[0] || (size_t)snprintf(out, cap, "%s/%s/resource2", root, best) >= cap)
		return -1;
	return 0;
}

/* Which device: 1 handed (its path in dev), 0 attach through engine.sock, -1 (why set). */
static int handed_device(const struct opts *o, char *dev, size_t cap, bool *pci,
			 const char **why)
{
	const char *want = getenv("NETKERNEL_DEVICE");
	*pci = false;
	if (want && *want && strcmp(want, "pci") != 0) {
		if ((size_t)snprintf(dev, cap, "%s", want) >= cap) {
			*why = "NETKERNEL_DEVICE: path too long";
			return -1;
		}
		return 1;
	}
	if (!want || !*want) {
		/* automatic: a guest has no engine.sock, but has the PCI device */
		char sock[PATH_MAX];
		struct stat st;
		if ((size_t)snprintf(sock, sizeof(sock), "%s/%s/engine.sock", o->root,
				     o->instance) >= sizeof(sock) ||
		    stat(sock, &st) == 0 || errno != ENOENT)
			return 0;
	}
	if (find_pci(dev, cap) == 0) {
		*pci = true;
		return 1;
	}
	if (want && *want) {
		*why = "NETKERNEL_DEVICE=pci: no PCI device 1af4:1110 (ivshmem) found";
		return -1;
	}
	return 0; /* no PCI device either: the attach says what is missing */
}

/* ---- the control socket ----------------------------------------------------------------- */

static int bind_listen(const char *path, const struct sockaddr_un *sa_in);

/* PATH as a sockaddr_un; a path longer than sun_path (108 bytes) is reached through its
 * directory: /proc/self/fd/<dir>/<name> (*dirfd stays open until the bind is done). */
static int unix_addr(const char *path, struct sockaddr_un *sa, int *dirfd)
{
	*dirfd = -1;
	if (strlen(path) < sizeof(sa->sun_path)) {
		strcpy(sa->sun_path, path);
		return 0;
	}
	const char *slash = strrchr(path, '/');
	char dir[PATH_MAX];
	if (!slash || (size_t)(slash - path) >= sizeof(dir)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(dir, path, (size_t)(slash - path));
	dir[slash - path] = 0;
	*dirfd = open(*dir ? dir : "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (*dirfd < 0)
		return -1;
	if ((size_t)snprintf(sa->sun_path, sizeof(sa->sun_path), "/proc/self/fd/%d/%s", *dirfd,
			     slash + 1) >= sizeof(sa->sun_path)) {
		close(*dirfd);
		errno = ENAMETOOLONG;
		return -1;
	}
	return 0;
}

static int listen_on(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int dirfd;
	if (unix_addr(path, &sa, &dirfd) < 0)
		return -1;
	int fd = bind_listen(path, &sa);
	int e = errno;
	if (dirfd >= 0)
		close(dirfd);
	errno = e;
	return fd;
}

static int bind_listen(const char *path, const struct sockaddr_un *sa_in)
{
	struct sockaddr_un sa = *sa_in;
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -1;
	int rc = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	if (rc < 0 && errno != EADDRINUSE) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	if (rc < 0) {
		/* a stale path (an agent that crashed) is replaced; a live agent is not */
		int probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
		if (probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
			close(probe);
			close(fd);
			errno = EADDRINUSE;
			return -1;
		}
		if (probe >= 0)
			close(probe);
		unlink(path);
		if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
			close(fd);
			return -1;
		}
	}
	if (listen(fd, 128) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static void watch_fd(struct ag *a, int fd, void *tag)
{
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = tag };
	epoll_ctl(a->epfd, EPOLL_CTL_ADD, fd, &e);
}

/* ---- the CoreEngine's end (RT-4, GL-9, PRE-9) -------------------------------------------- */

static void ce_lost(struct ag *a)
{
	if (a->ce_dead)
		return;
	a->ce_dead = true;
	a->q.job.len = a->q.send.len = 0; /* nothing will ever take them */
	ag_fail_calls(a);
	ag_all_broken(a, ECONNRESET);
}

static void engine_ready(struct ag *a)
{
	char buf[512];
	for (;;) {
		ssize_t n = recv(a->engine_fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n > 0)
			continue;
		if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
			epoll_ctl(a->epfd, EPOLL_CTL_DEL, a->engine_fd, NULL);
			ce_lost(a);
		}
		return;
	}
}

static void check_detached(struct ag *a)
{
	const struct nk_dev_header *h = (const struct nk_dev_header *)a->q.base;
	if (__atomic_load_n(&h->state, __ATOMIC_ACQUIRE) == NK_STATE_DETACHED)
		ce_lost(a);
}

/* ---- the loop ----------------------------------------------------------------------------- */

static void handle(struct ag *a, const struct epoll_event *ev)
{
	struct ag_tag *t = ev->data.ptr;
	switch (t->kind) {
	case AG_K_WAKE: {
		uint64_t v;
		if (read(a->wake_fd, &v, sizeof(v)) < 0) {
			/* EAGAIN: drained already */
		}
		break;
	}
	case AG_K_LISTEN:
		ag_conn_accept(a);
		break;
	case AG_K_ENGINE:
		engine_ready(a);
		break;
	case AG_K_HOLD: {
		char buf[256];
		ssize_t n = read(a->hold_fd, buf, sizeof(buf));
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
			epoll_ctl(a->epfd, EPOLL_CTL_DEL, a->hold_fd, NULL);
			a->hold_eof = true;
		}
		break;
	}
	case AG_K_SIGNAL: {
		struct signalfd_siginfo si;
		if (read(a->sig_fd, &si, sizeof(si)) > 0)
			a->stopping = true;
		break;
	}
	case AG_K_CONN:
		ag_conn_ready(a, (struct ag_conn *)t, ev->events);
		break;
	case AG_K_SOCK:
		ag_sock_ready(a, (struct ag_sock *)t, ev->events);
		break;
	}
}

static bool idle(const struct ag *a)
{
	return a->nconns == 0 && a->live == 0 && (a->hold_fd < 0 || a->hold_eof);
}

/* One round: rings, pumps, the flush, then epoll (sleeping per RING-6/RING-7 when the
 * previous round found nothing). Returns whether anything happened. */
static bool round_once(struct ag *a, bool busy)
{
	static int64_t last_work;
	int64_t now = ag_now_ns();
	if (busy) {
		last_work = now;
		a->work_gen++; /* the bell thread's polled sleeps start short again (VM-2) */
	}
	else if (now - last_work < a->spin_ns)
		busy = true; /* spin a little: a sleep costs the bell thread's hop */
	int n = ag_poll_rings(a);
	if (n < 0)
		ce_lost(a); /* RING-10: a broken ring is a device we can no longer use */
	ag_run_pumps(a);
	if (ag_flush(a) < 0)
		ce_lost(a);
	int timeout = 0;
	bool sleeping = false;
	if (!busy && n == 0 && !a->pump) {
		bool lazy;
		sleeping = true;
		if (ag_rings_prepare_sleep(a, &lazy))
			timeout = ag_flush_waits(a) || a->q.send.len ? AG_BUSY_SLEEP_MS
				  : a->watch || a->throttled_listener || a->starved || lazy
				  ? AG_TICK_MS
				  : AG_SLEEP_MS;
	}
	struct epoll_event evs[64];
	if (sleeping) { /* the rings are the bell thread's until we have the lock again */
		a->loop_sleeping = true;
		pthread_mutex_unlock(&a->lock);
	}
	int k = epoll_wait(a->epfd, evs, 64, timeout);
	if (sleeping) {
		pthread_mutex_lock(&a->lock);
		a->loop_sleeping = false;
		ag_rings_finish_sleep(a); /* we poll them every round from here on */
	}
	for (int i = 0; i < k; i++)
		handle(a, &evs[i]);
	ag_run_pumps(a);
	if (ag_flush(a) < 0)
		ce_lost(a);
	ag_reap(a);
	ag_conn_reap(a);
	return n > 0 || k > 0;
}

/* The loop; it holds a->lock except while it sleeps (round_once), and returns it. */
static int run(struct ag *a)
{
	bool busy = true, exiting = false;
	int64_t next_tick = ag_now_ns(), deadline = 0;
	for (;;) {
		busy = round_once(a, busy);
		int64_t now = ag_now_ns();
		if (now >= next_tick) {
			next_tick = now + (int64_t)AG_TICK_MS * 1000000;
			if (!a->ce_dead)
				check_detached(a);
			ag_tick(a);
			ag_run_pumps(a);
			ag_flush(a);
		}
		if (exiting) {
			/* GL-10: the SENDs and CLOSEs in flight get their replies, within 5 s */
			if (a->ce_dead || ag_calls_in_flight(a) == 0 || now >= deadline)
				return 0;
			continue;
		}
		if (idle(a)) {
			if (a->idle_since < 0)
				a->idle_since = now;
		} else {
			a->idle_since = -1;
		}
		if (a->stopping || (a->idle_since >= 0 && now - a->idle_since >= a->idle_ns)) {
			exiting = a->exiting = true; /* every reply is awaited from here on */
			deadline = now + AG_EXIT_NS;
			if (a->engine_fd < 0 && !a->ce_dead)
				ag_close_all(a); /* VM-6: no detach will close them for us */
			unlink(a->path); /* no new connection from here on */
			epoll_ctl(a->epfd, EPOLL_CTL_DEL, a->listen_fd, NULL);
			close(a->listen_fd);
			a->listen_fd = -1;
		}
	}
}

int main(int argc, char **argv)
{
	struct opts o;
	parse(argc, argv, &o);
	struct ag *a = &agent;
	a->listen_fd = a->hold_fd = a->sig_fd = a->diag_fd = a->engine_fd = -1;
	a->idle_since = -1;
	a->idle_ns = o.idle_ms * 1000000LL;
	const char *dbg = getenv("NK_AGENT_DEBUG");
	a->debug = dbg && *dbg && strcmp(dbg, "0") != 0;
	const char *spin = getenv("NK_AGENT_SPIN_US");
	a->spin_ns = spin ? atoll(spin) * 1000 : AG_SPIN_NS;
	a->path = (char *)o.socket;
	signal(SIGPIPE, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	struct rlimit rl; /* one fd per socket of the whole program tree: as many as allowed */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}

	char dev[PATH_MAX];
	const char *why = NULL;
	bool pci = false;
	a->dev_fd = -1;
	int handed = handed_device(&o, dev, sizeof(dev), &pci, &why);
	a->polled = pci; /* VM-2: no futex on a PCI BAR, whatever the header says */
	if (handed < 0 || (handed == 0 && attach(a, &o, dev, sizeof(dev), &why) < 0) ||
	    map_device(a, dev, handed == 1, &why) < 0) {
		fprintf(stderr, "nk-agent: %s\n", why); /* PRE-9: the library answers ENETDOWN */
		return 3;
	}
	if (a->debug)
		fprintf(stderr, "nk-agent: vm %lld on %s%s%s\n", (long long)a->vm_id, dev,
			handed ? " (handed, VM-3)" : "", a->polled ? ", polled (VM-2)" : "");
	a->hash_mask = 4095;
	a->hash = calloc(a->hash_mask + 1, sizeof(*a->hash));
	a->epfd = epoll_create1(EPOLL_CLOEXEC);
	a->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	sigset_t term;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigprocmask(SIG_BLOCK, &term, NULL);
	a->sig_fd = signalfd(-1, &term, SFD_NONBLOCK | SFD_CLOEXEC);
	if (!a->hash || a->epfd < 0 || a->wake_fd < 0 || a->sig_fd < 0) {
		fprintf(stderr, "nk-agent: set-up failed: %s\n", strerror(errno));
		return 1;
	}
	a->listen_fd = listen_on(o.socket);
	if (a->listen_fd < 0) {
		fprintf(stderr, "nk-agent: cannot listen on %s: %s\n", o.socket, strerror(errno));
		return 1;
	}
	watch_fd(a, a->wake_fd, &ag_tag_wake);
	watch_fd(a, a->listen_fd, &ag_tag_listen);
	if (a->engine_fd >= 0) { /* a handed device has none: VM-4, the header says */
		fcntl(a->engine_fd, F_SETFL, O_NONBLOCK);
		watch_fd(a, a->engine_fd, &ag_tag_engine);
	}
	watch_fd(a, a->sig_fd, &ag_tag_signal);
	if (o.hold_fd >= 0) {
		a->hold_fd = o.hold_fd;
		fcntl(a->hold_fd, F_SETFD, FD_CLOEXEC);
		watch_fd(a, a->hold_fd, &ag_tag_hold);
	}
	/* DEV-9: the bell's value before the loop's first re-check, read here */
	a->bell_seen = nk_bell_value(a->q.device_bell);
	if (pthread_mutex_init(&a->lock, NULL) != 0 ||
	    pthread_create(&a->bell_thread, NULL, ag_bell_main, a) != 0) {
		fprintf(stderr, "nk-agent: no bell thread\n");
		return 1;
	}
	if (o.ready_fd >= 0) { /* PRE-1: attached and listening */
		char one = 1;
		if (write(o.ready_fd, &one, 1) < 0) {
			/* the parent is gone: it will find out */
		}
		close(o.ready_fd);
	}
	pthread_mutex_lock(&a->lock);
	int rc = run(a);
	pthread_mutex_unlock(&a->lock);
	atomic_store_explicit(&a->quit, true, memory_order_release);
	pthread_join(a->bell_thread, NULL); /* it sees quit within one sleep (RING-7) */
	if (a->debug)
		fprintf(stderr, "nk-agent: sends %llu events %llu bells %llu\n",
			(unsigned long long)a->n_sends, (unsigned long long)a->n_events,
			(unsigned long long)a->n_bells);
	if (a->engine_fd >= 0)
		close(a->engine_fd); /* RT-4: the hot-unplug */
	if (a->dev_fd >= 0)
		close(a->dev_fd); /* VM-6: the next device side may have it; the host keeps it attached */
	return rc;
}
