/* nk-agent: is an app end still open? (PRE-6)
 *
 * EPOLLHUP on an agent end means the app end's last close, or both directions shut with
 * the app still holding the fd. The kernel's sock_diag answers which: an AF_UNIX socket
 * is listed by inode until it is released, that is until its last reference is closed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "agent.h"

int ag_diag_alive(struct ag *a, uint64_t ino)
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
