/* The preloaded GuestLib's two halves and what passes between them (spec/preload.md).
 *
 * A program run under `netkernel run` (or with LD_PRELOAD=libnkpreload.so) gets,
 * for every AF_INET/AF_INET6 TCP or UDP socket it creates, one end of an AF_UNIX
 * socketpair: the *app end*. The other end, the *agent end*, is held by nk-agent,
 * the tenant's guest-side process. nk-agent holds the tenant device (RT-3, RT-4),
 * speaks NQEs to the CoreEngine, and relays between the agent ends and the NSM:
 *
 *   - bytes the program writes into an app end are read by the agent into send-half
 *     buffers and leave as SENDs; EV_DATA is written into the agent end, and the
 *     buffer goes back (BUF_RETURN) once the kernel took all of it (PRE-4, BUF-4);
 *   - because the app end is a real kernel socket, read/write/poll/epoll/select/
 *     dup/fork/exec/sendfile/splice/SIGPIPE and EINTR are the kernel's own (PRE-2);
 *   - the last close of the app end, in whatever process, is seen by the agent as
 *     EPOLLHUP on the agent end: the agent sends the socket's CLOSE (PRE-6).
 *
 * The library asks the agent for what a byte stream cannot say (socket, bind,
 * connect, listen, socket options, names) over a *control connection*: one
 * AF_UNIX SOCK_SEQPACKET connection per process to the agent's socket, whose path
 * is the environment variable NETKERNEL_AGENT. Each request is one struct
 * nk_ag_req record, answered by exactly one struct nk_ag_rep record, in order.
 *
 * A socket is named by the inode number of its app end (fstat's st_ino): it is the
 * same in every process holding the socket, across fork, dup and exec.
 */
#ifndef NK_AGENT_PROTO_H
#define NK_AGENT_PROTO_H

#include <stdint.h>

#define NK_AG_VERSION 1
#define NK_AG_ENV_SOCKET "NETKERNEL_AGENT"     /* the agent's control socket path */
#define NK_AG_ENV_LIB "NETKERNEL_PRELOAD"      /* absolute path of libnkpreload.so */
#define NK_AG_ENV_BIN "NETKERNEL_AGENT_BIN"    /* absolute path of nk-agent */
#define NK_AG_DATA_MAX 256                     /* address or option value bytes */

enum nk_ag_op {
	/* arg0 = NK_AG_VERSION. Reply: result = the agent's pid, arg0 = its VM ID. */
	NK_AG_HELLO = 1,
	/* arg0 = domain (AF_INET, AF_INET6), arg1 = SOCK_STREAM or SOCK_DGRAM (no
	 * SOCK_NONBLOCK/SOCK_CLOEXEC: the library applies them to its fd), arg2 = protocol.
	 * Reply: result 0 with the app end as SCM_RIGHTS, arg0 = its st_ino; or -errno
	 * (EAFNOSUPPORT, EPROTONOSUPPORT, ENETDOWN, EMFILE ...). A new stream socket's
	 * app end is not writable until it is connected (PRE-5). */
	NK_AG_SOCKET = 2,
	/* ino. Reply: result = NK_AG_KIND_* bits of a live socket of this agent, or
	 * -ENOENT (not ours: the library passes the call to libc). */
	NK_AG_LOOKUP = 3,
	/* ino, data = sockaddr (len bytes). Reply: result 0 or -errno. */
	NK_AG_BIND = 4,
	/* ino, arg0 = backlog. Reply: 0 or -errno. From then on the app end carries
	 * struct nk_ag_accept records, each with one SCM_RIGHTS fd (PRE-7). */
	NK_AG_LISTEN = 5,
	/* ino, data = sockaddr (len bytes). Stream: the reply is -EINPROGRESS as soon as
	 * the CONNECT NQE left (or an immediate -errno: EISCONN, EALREADY, EINVAL); the
	 * app end becomes writable when the connection is settled, and NK_AG_GETSOCKOPT
	 * SO_ERROR then says how. Datagram: the reply is the CONNECT's result. */
	NK_AG_CONNECT = 6,
	/* ino, arg0 = level, arg1 = optname, data = value (len bytes). Reply: 0 or -errno. */
	NK_AG_SETSOCKOPT = 7,
	/* ino, arg0 = level, arg1 = optname, arg2 = optlen the caller has room for.
	 * Reply: result = value length, data = value; or -errno. SO_ERROR (taken and
	 * cleared), SO_TYPE, SO_DOMAIN, SO_PROTOCOL and SO_ACCEPTCONN are the agent's own
	 * answers; everything else is a GETSOCKOPT NQE. */
	NK_AG_GETSOCKOPT = 8,
	/* ino. Reply: result = address length, data = sockaddr; or -errno. */
	NK_AG_GETSOCKNAME = 9,
	NK_AG_GETPEERNAME = 10,
	/* ino, arg0 = how. Reply: 0 or -errno. The library has already shut the app end
	 * (so the kernel's side of the fd shows it); the agent sends SHUTDOWN after the
	 * bytes the app end still holds (PRE-6). */
	NK_AG_SHUTDOWN = 11,
	/* ino. Reply: result = bytes of the next datagram (FIONREAD on UDP), or -errno. */
	NK_AG_NREAD = 12,
};

/* Kinds (NK_AG_LOOKUP's result bits). */
#define NK_AG_KIND_STREAM 1
#define NK_AG_KIND_DGRAM 2
#define NK_AG_KIND_LISTEN 4
#define NK_AG_KIND_INET6 8

struct nk_ag_req {
	uint32_t op;      /* enum nk_ag_op */
	uint32_t len;     /* bytes used in data */
	uint64_t ino;     /* the socket: st_ino of its app end (0 for HELLO, SOCKET) */
	int64_t arg[3];
	uint8_t data[NK_AG_DATA_MAX];
};

struct nk_ag_rep {
	int64_t result;   /* >= 0, or -errno */
	int64_t arg0;
	uint32_t len;     /* bytes used in data */
	uint32_t pad;
	uint8_t data[NK_AG_DATA_MAX];
};

/* One accepted connection on a listening app end: this record (exactly 32 bytes)
 * carries the new connection's app end as one SCM_RIGHTS fd, and its peer's address. */
struct nk_ag_accept {
	uint32_t addrlen;
	uint8_t addr[28];
};

/* Datagram sockets: the app end is one end of a SOCK_SEQPACKET pair, and every record
 * in either direction is this header followed by the payload. addrlen 0: no address
 * (send: to the connected peer; receive: never, the agent always names the source). */
struct nk_ag_dgram {
	uint32_t addrlen;
	uint8_t addr[28];
};

_Static_assert(sizeof(struct nk_ag_accept) == 32, "accept record");
_Static_assert(sizeof(struct nk_ag_dgram) == 32, "datagram header");

#endif
