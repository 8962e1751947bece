/* nk-agent: is an app end still open? (PRE-6)
 *
 * EPOLLHUP on an agent end means the app end's last close, or both directions shut with
 * the app still holding the fd. The kernel's sock_diag answers which: an AF_UNIX socket
 * is listed by inode until it is released, that is until its last reference is closed.
 *
 * sock_diag answers ENOENT both for "no such socket" and, when the kernel lacks unix_diag
 * (a module a guest kernel may not have loaded), for the whole family. So the first
 * question is about a socket known to be open, the agent's own listening socket; if
 * that one is "not found", the answer comes from a walk of /proc/<pid>/fd instead,
 * slower but only asked after an EPOLLHUP. The walk cannot see a descriptor in flight
 * in an SCM_RIGHTS message; sock_diag can.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

/* Does any process hold the socket with inode `ino`? 1 if one does, 0 if none. */
static int proc_alive(uint64_t ino)
{
	char want[40];
	int wn = snprintf(want, sizeof(want), "socket:[%" PRIu64 "]", ino);
	DIR *proc = opendir("/proc");
	if (!proc)
		return -errno;
	int found = 0;
	struct dirent *p;
	while (!found && (p = readdir(proc))) {
		if (p->d_name[0] < '1' || p->d_name[0] > '9')
			continue; /* not a pid */
		char dir[300];
		snprintf(dir, sizeof(dir), "/proc/%s/fd", p->d_name);
		DIR *fds = opendir(dir);
		if (!fds)
			continue; /* gone meanwhile, or not ours to read */
		struct dirent *f;
		while (!found && (f = readdir(fds))) {
			char path[600], link[40];
			if (f->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "%s/%s", dir, f->d_name);
			ssize_t n = readlink(path, link, sizeof(link));
			found = n == wn && memcmp(link, want, (size_t)wn) == 0;
		}
		closedir(fds);
	}
	closedir(proc);
	return found;
}

static int diag_ask(struct ag *a, uint64_t ino);

int ag_diag_alive(struct ag *a, uint64_t ino)
{
	if (!a->diag_probed) {
		a->diag_probed = true;
		const char *how = getenv("NK_AGENT_DIAG"); /* "proc": as without unix_diag (tests) */
		struct stat st;
		if (how && strcmp(how, "proc") == 0) {
			a->diag_missing = true;
		} else if (a->listen_fd >= 0 && fstat(a->listen_fd, &st) == 0 &&
			   diag_ask(a, (uint64_t)st.st_ino) == 0) {
			a->diag_missing = true;
			fprintf(stderr, "nk-agent: sock_diag has no AF_UNIX (unix_diag not loaded):"
					" closed app ends are found through /proc\n");
		}
	}
	return a->diag_missing ? proc_alive(ino) : diag_ask(a, ino);
}

static int diag_ask(struct ag *a, uint64_t ino)
{
	if (a->diag_fd < 0) {
		a->diag_fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
		if (a->diag_fd < 0)
			return -errno; /* no sock_diag: EPOLLHUP is taken as the last close */
	}
	struct {
		struct nlmsghdr h;
		struct unix_diag_req r;
	} req;
	memset(&req, 0, sizeof(req));
	req.h.nlmsg_len = sizeof(req);
	req.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
	req.h.nlmsg_flags = NLM_F_REQUEST;
	req.r.sdiag_family = AF_UNIX;
	req.r.udiag_states = ~0u;
	req.r.udiag_ino = (uint32_t)ino;
	req.r.udiag_cookie[0] = req.r.udiag_cookie[1] = ~0u; /* no cookie: by inode only */
	struct sockaddr_nl nl = { .nl_family = AF_NETLINK };
	if (sendto(a->diag_fd, &req, sizeof(req), 0, (struct sockaddr *)&nl, sizeof(nl)) < 0)
		return -errno;
	union {
		struct nlmsghdr h;
		char buf[8192];
	} rep;
	ssize_t n = recv(a->diag_fd, &rep, sizeof(rep), 0);
	if (n < (ssize_t)sizeof(struct nlmsghdr))
		return -EIO;
	if (rep.h.nlmsg_type == NLMSG_ERROR) {
		const struct nlmsgerr *e = NLMSG_DATA(&rep.h);
		return e->error == -ENOENT ? 0 : (e->error ? e->error : -EIO);
	}
	return rep.h.nlmsg_type == SOCK_DIAG_BY_FAMILY ? 1 : -EIO;
}
