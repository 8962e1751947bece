/* nk-agent's private declarations: the tenant's guest-side relay (include/nk/agent_proto.h,
 * spec/preload.md PRE-1..PRE-10).
 *
 * One process, two threads, one lock (ag.lock) over all the state: the tenant device's
 * queue set 0 (rings, outboxes, the table of calls in flight), the agent ends, the
 * control connections.
 *   - the loop thread holds the lock except while it sleeps in epoll_wait() (RING-6
 *     before, RING-7: at most 50 ms): it serves the agent ends and control connections;
 *   - the bell thread sleeps on the DEVICE bell (futex). While the loop sleeps, the rings
 *     are the bell thread's: woken by the bell it takes the lock and does the loop's ring
 *     work itself (replies, EV_DATA into the agent ends, the flush), so an NQE costs one
 *     wake-up, not a hop through an eventfd to the loop. It writes the eventfd only when
 *     the loop must look again (main.c: ring_work).
 *
 * Files: main.c (command line, attach, the loop, lifetime), nq.c (NQEs: calls, outboxes,
 * dispatch of replies and events), sock.c (the agent ends: filler, relay, close),
 * ctl.c (control connections and their requests), diag.c (is an app end still open?).
 */
#ifndef NK_AGENT_H
#define NK_AGENT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <pthread.h>

#include "nk/agent_proto.h"
#include "nk/bufpool.h"
#include "nk/device.h"
#include "nk/nqe.h"
#include "nk/outbox.h"
#include "nk/tqueue.h"
#include "nk/ring.h"

#define AG_QSET 0              /* every NQE on queue set 0: SENDs stay ordered (NQE-16) */
#define AG_CALL_HEADROOM 16    /* call slots data SENDs leave to control calls */
#define AG_MAX_SENDS 64        /* SENDs in flight per socket (PRE-4 backpressure) */
#define AG_CHUNK_MAX (64u << 10) /* the most one SEND carries */
#define AG_SLEEP_MS 50         /* RING-7: every sleep is bounded */
#define AG_BUSY_SLEEP_MS 1     /* while an outbox waits for ring room (RING-4: no bell) */
#define AG_SPIN_NS 0          /* see main.c's round_once */
#define AG_RET_HOLD_NS 1000000 /* BUF_RETURNs wait at most this long for a SEND (nq.c) */
#define AG_RET_HOLD_MAX 32     /* ... or until this many wait */
#define AG_RET_HOLD_BYTES (64u << 10) /* ... or until they return this many bytes */
#define AG_TICK_MS 20          /* DETACHED header, watched sockets, throttled listeners */
#define AG_EXIT_NS 5000000000LL /* GL-10: how long the exit waits for SEND/CLOSE replies */
#define AG_CONN_MAX_PENDING 64 /* replies a connection may have queued before we stop reading */
#define AG_SOCKADDR_ROOM 28    /* sockaddr_in6 holds either family (NQE-15) */

/* What an epoll event points at: the first member of every watched object. */
enum ag_kind { AG_K_LISTEN = 1, AG_K_WAKE, AG_K_ENGINE, AG_K_HOLD, AG_K_SIGNAL, AG_K_CONN, AG_K_SOCK };

struct ag_tag {
	int kind;
};

/* One reply a control connection owes, in request order. */
struct ag_pend {
	struct ag_pend *next;
	struct ag_conn *conn;
	bool ready;
	int fd;                  /* passed with SCM_RIGHTS, then closed (-1: none) */
	uint32_t op;             /* the request's (NK_AGENT_DEBUG) */
	uint64_t ino;
	struct nk_ag_rep rep;
};

struct ag_conn {
	struct ag_tag tag;
	int fd;
	bool closed;
	bool in_list;            /* on the dead list (freed after the event batch) */
	uint32_t events;
	struct ag_pend *head, *tail;
	uint32_t npend;
	struct ag_conn *next;    /* all connections */
};

/* An EV_DATA span held until the kernel took all of it (BUF-4). */
struct ag_rx {
	uint64_t off;
	uint32_t size;
	uint32_t pos;            /* next byte to write, from off */
	uint32_t prefix;         /* datagram: source sockaddr length before the payload */
};

struct ag_sock {
	struct ag_tag tag;
	uint32_t id;             /* the NQE socket ID (ours, NQE-7) */
	uint64_t ino;            /* st_ino of the app end: the library's name for it */
	int fd;                  /* the agent end (-1 before an accepted connection's reply) */
	int domain, type, protocol;
	uint32_t events;         /* epoll interest now; ~0u: not in the epoll set */
	bool stream, listening, connecting, connected, settled;
	bool in_eof;             /* the agent end read EOF: the app shut its sending side */
	bool rd_ready;           /* the agent end may hold bytes: epoll said so, or the last
				  * read filled what it asked for (sock.c: pump_in) */
	bool hup;                /* EPOLLHUP: every app reference closed, or both sides shut */
	bool wr_shut;            /* SHUTDOWN(WR or RDWR) sent to the NSM */
	bool fin, fin_done;      /* EV_FIN got / the agent end shut for writing */
	bool broken;             /* EV_ERROR or the CoreEngine/NSM gone: no more relaying */
	bool unread;             /* EV_DATA dropped unread: CLOSE gets ABORT (PRE-6) */
	bool close_sent, freed;
	bool watching;           /* on the watch list: app end polled for its last close */
	bool out_blocked;        /* the agent end was full: EPOLLOUT wanted */
	bool release;            /* CLOSE answered: freed once no call names it */
	bool waits_send;         /* counted in ag.send_waiters (see ag_sock_update) */
	uint8_t listed;          /* on the pump list (1) or the starved list (2) */
	uint32_t ncalls;         /* calls in flight that name this socket */
	bool acceptable;         /* EV_ACCEPTABLE: the NSM holds connections for us */
	bool accepting;          /* an ACCEPT in flight */
	bool accept_pending;     /* created by an ACCEPT, waiting for its reply */
	bool throttled;          /* listener: backlog records wait for the app (EPOLLOUT|ET) */
	int so_error;            /* SO_ERROR, taken and cleared by GETSOCKOPT */
	uint32_t filler;         /* bytes of the app end's filler left to discard (PRE-5) */
	uint32_t sends;          /* SENDs in flight */
	int backlog;
	uint32_t rec_size;       /* SIOCOUTQ bytes of one accept record (measured) */
	struct ag_pend *shut_pend; /* NK_AG_SHUTDOWN waiting for the bytes before it */
	int shut_how;
	uint64_t read_total;     /* bytes read from the agent end so far */
	uint64_t shut_mark;      /* read_total once the bytes before the SHUTDOWN are read */
	int64_t watch_at;        /* next sock_diag look at a watched app end */
	int64_t watch_gap;
	struct ag_rx *rx;        /* FIFO of EV_DATA not yet written into the agent end */
	uint32_t rx_head, rx_len, rx_cap;
	struct ag_sock *hnext;   /* ino hash chain */
	struct ag_sock *pnext;   /* pump list */
	struct ag_sock *wnext;   /* watch list */
	struct ag_sock *gnext;   /* graveyard */
};

struct ag_call {
	bool used;
	uint8_t op;
	uint32_t sock_id;
	uint64_t buf;            /* send-half buffer lent with the request (BUF-3), if size */
	uint32_t size;
	uint32_t room;           /* GET*: bytes of the answer the caller has room for */
	struct ag_pend *pend;    /* the control reply waiting for this call, or NULL */
	int aux;                 /* SHUTDOWN: how; ACCEPT: the new socket's ID */
};

struct ag {
	struct nk_tqueue q;      /* queue set AG_QSET of the device */
	struct nk_bufpool *pool;
	struct ag_call *calls;
	uint32_t ncalls, *free_tags, nfree;
	uint32_t ctl_calls;      /* calls in flight other than SENDs: their replies are awaited */
	uint32_t send_waiters;   /* sockets that cannot go on before a SEND is answered */
	bool send_due;           /* the SEND outbox holds a SEND: it goes out at the flush */
	uint32_t ret_held;       /* BUF_RETURNs waiting in the SEND outbox (nq.c) */
	uint64_t ret_held_bytes;
	int64_t ret_held_since;
	int64_t vm_id;
	int engine_fd;           /* the attach's control connection (RT-4); -1 for a device
				  * handed to us (spec/vm.md VM-3): its end is DETACHED (VM-4) */
	int dev_fd;              /* a handed device, held open for its flock (VM-6), or -1 */
	bool polled;             /* VM-2: bells do not cross to the CoreEngine: bounded sleeps */
	uint64_t work_gen;       /* bumped by the loop when it found work (bell thread's step) */
	/* the loop */
	int epfd, wake_fd, listen_fd, hold_fd, sig_fd, diag_fd;
	bool diag_probed, diag_missing; /* sock_diag lacks AF_UNIX (no unix_diag): walk /proc */
	pthread_t bell_thread;
	pthread_mutex_t lock;    /* everything in here but quit (see the top of the file) */
	bool loop_sleeping;      /* the loop is in its sleeping epoll_wait: the rings are the
				  * bell thread's (under the lock) */
	atomic_bool quit;
	uint32_t bell_seen;
	char *path;
	int64_t idle_ns;
	int64_t spin_ns;         /* poll this long after the last work before sleeping */
	int64_t idle_since;
	bool hold_eof;
	bool ce_dead;            /* the CoreEngine is gone (RT-4, GL-9) */
	bool nsm_dead;           /* EV_ERROR on socket 0: the NSM is gone (CE-19) */
	bool stopping;           /* SIGTERM */
	bool exiting;            /* GL-10: waiting for the last replies */
	bool debug;              /* NK_AGENT_DEBUG: a line per CLOSE, counters at exit */
	int nsm_err;
	/* sockets */
	struct ag_sock **socks;  /* socks[id - 1] */
	uint32_t nsocks, live;
	struct ag_sock **hash;
	uint32_t hash_mask;
	struct ag_sock *pump, *starved, *watch, *grave;
	struct ag_conn *conns;
	uint32_t nconns;
	bool throttled_listener; /* a listener waits for the app to take records */
	char scratch[AG_CHUNK_MAX];
	/* counters, printed with NK_AGENT_DEBUG */
	uint64_t n_sends, n_events, n_bells;
};

extern struct ag_tag ag_tag_listen, ag_tag_wake, ag_tag_engine, ag_tag_hold, ag_tag_signal;

int64_t ag_now_ns(void);

/* nq.c */
int ag_dev_init(struct ag *a, void *base, uint64_t len);
int ag_call_new(struct ag *a, uint8_t op, uint32_t sock_id, bool data);
void ag_call_free(struct ag *a, uint32_t tag);
int ag_data_alloc(struct ag *a, uint64_t size, uint64_t *off);
int ag_call_buffer(struct ag *a, uint32_t tag, const void *in, uint32_t in_len, uint32_t room);
int ag_publish(struct ag *a, uint32_t tag, uint64_t op_data);
void ag_buf_return(struct ag *a, uint64_t off, uint32_t size);
int ag_flush(struct ag *a);
int ag_poll_rings(struct ag *a);
bool ag_rings_prepare_sleep(struct ag *a, bool *lazy);
void ag_rings_finish_sleep(struct ag *a);
bool ag_flush_waits(const struct ag *a);
void *ag_bell_main(void *arg);
void ag_fail_calls(struct ag *a);
uint32_t ag_calls_in_flight(const struct ag *a);

/* sock.c */
struct ag_sock *ag_sock_new(struct ag *a);
struct ag_sock *ag_sock_by_id(struct ag *a, uint32_t id);
struct ag_sock *ag_sock_by_ino(struct ag *a, uint64_t ino);
void ag_sock_call_ref(struct ag *a, uint32_t id, int delta);
int ag_sock_make_pair(struct ag *a, struct ag_sock *s, int *app_fd);
void ag_sock_discard(struct ag *a, struct ag_sock *s);
void ag_sock_update(struct ag *a, struct ag_sock *s);
void ag_sock_ready(struct ag *a, struct ag_sock *s, uint32_t events);
void ag_sock_pump(struct ag *a, struct ag_sock *s);
void ag_sock_want_pump(struct ag *a, struct ag_sock *s);
void ag_run_pumps(struct ag *a);
void ag_sock_unstarve(struct ag *a);
void ag_sock_settle(struct ag *a, struct ag_sock *s, int64_t result);
void ag_sock_data(struct ag *a, struct ag_sock *s, const struct nk_nqe *n);
void ag_sock_fin(struct ag *a, struct ag_sock *s);
void ag_sock_error(struct ag *a, struct ag_sock *s, int err);
void ag_sock_send_done(struct ag *a, struct ag_sock *s, int64_t result, uint32_t size);
void ag_sock_closed(struct ag *a, struct ag_sock *s);
void ag_sock_accept_more(struct ag *a, struct ag_sock *s);
void ag_sock_accepted(struct ag *a, struct ag_sock *l, uint32_t new_id, int64_t result,
		      const void *addr);
void ag_sock_try_shutdown(struct ag *a, struct ag_sock *s);
void ag_tick(struct ag *a);
void ag_reap(struct ag *a);
void ag_all_broken(struct ag *a, int err);
void ag_close_all(struct ag *a);

/* ctl.c */
void ag_conn_accept(struct ag *a);
void ag_conn_ready(struct ag *a, struct ag_conn *c, uint32_t events);
struct ag_pend *ag_pend_new(struct ag_conn *c);
void ag_pend_done(struct ag *a, struct ag_pend *p, int64_t result);
void ag_conn_flush(struct ag *a, struct ag_conn *c);
void ag_conn_reap(struct ag *a);
void ag_reply_call(struct ag *a, struct ag_call *c, int64_t result);

/* diag.c: 1 if the unix socket with inode `ino` is still open, 0 if not, -errno unknown.
 * Asks sock_diag; where the kernel has no unix_diag, looks through /proc/<pid>/fd. */
int ag_diag_alive(struct ag *a, uint64_t ino);

#endif
