/* exec and spawn: a program's children are NetKernel's too (PRE-3).
 *
 * A program may clear LD_PRELOAD (or pass a fresh environment) to a child: each
 * exec* and posix_spawn* puts back LD_PRELOAD with this library and the
 * NETKERNEL_* variables the child's library needs to find the same agent. The
 * exec* functions that glibc implements on top of execve (execv, execl, ...) call
 * execve inside glibc, which no interposition sees: they are rebuilt here on our
 * execve/execvpe.
 *
 * vfork is fork here: a wrapper cannot return into a vfork child (it would return
 * on the parent's stack), and the child's exec needs malloc to build the
 * environment. Programs only see that the parent runs on before the child execs. */
#include "preload.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

static void keep(char *dst, size_t size, const char *value)
{
	if (value != NULL && strlen(value) < size)
		strcpy(dst, value);
}

static char self_path[PATH_MAX];
static char agent_bin[PATH_MAX];
static char saved_instance[256];
static char saved_root[PATH_MAX];
static char saved_agent[PATH_MAX];  /* NETKERNEL_AGENT, even if the program unsets it */

/* NETKERNEL_AGENT, _INSTANCE or _ROOT: the environment's, else the value it had when
 * the library loaded. A program may clear its environment (nginx's workers keep only
 * what `env` directives name) and still use the sockets it inherited (PRE-2). */
const char *nk_env(const char *name)
{
	const char *live = getenv(name);
	if (live != NULL && *live)
		return live;
	const char *saved = strcmp(name, NK_AG_ENV_SOCKET) == 0 ? saved_agent
			    : strcmp(name, "NETKERNEL_INSTANCE") == 0 ? saved_instance
			    : strcmp(name, "NETKERNEL_ROOT") == 0 ? saved_root : "";
	return *saved ? saved : NULL;
}

void nk_env_agent(const char *path)
{
	keep(saved_agent, sizeof saved_agent, path);
}

const char *nk_self_path(void)
{
	return self_path[0] ? self_path : NULL;
}

const char *nk_agent_bin(void)
{
	const char *env = getenv(NK_AG_ENV_BIN);
	if (env != NULL && *env)
		return env;
	return agent_bin[0] ? agent_bin : NULL;
}


/* Where this library and nk-agent are: the environment if it says, else next to
 * this library (dladdr), as `make preload agent` lays them out. */
void nk_env_init(void)
{
	keep(self_path, sizeof self_path, getenv(NK_AG_ENV_LIB));
	if (!self_path[0]) {
		Dl_info info;
		if (dladdr((void *)nk_env_init, &info) && info.dli_fname != NULL &&
		    realpath(info.dli_fname, self_path) == NULL)
			keep(self_path, sizeof self_path, info.dli_fname);
	}
	keep(agent_bin, sizeof agent_bin, getenv(NK_AG_ENV_BIN));
	if (!agent_bin[0] && self_path[0]) {
		const char *slash = strrchr(self_path, '/');
		size_t dir = slash ? (size_t)(slash - self_path) + 1 : 0;
		if (dir + sizeof "nk-agent" <= sizeof agent_bin) {
			memcpy(agent_bin, self_path, dir);
			strcpy(agent_bin + dir, "nk-agent");
		}
	}
	keep(saved_instance, sizeof saved_instance, getenv("NETKERNEL_INSTANCE"));
	keep(saved_root, sizeof saved_root, getenv("NETKERNEL_ROOT"));
	keep(saved_agent, sizeof saved_agent, getenv(NK_AG_ENV_SOCKET));
}

/* --- the environment a child gets ------------------------------------------------ */

#define EXTRA 6

struct envfix {
	char **envp;          /* what to pass: the caller's, or `made` */
	char **made;
	char *strings[EXTRA];
};

static const char *find(char *const envp[], const char *name, size_t len)
{
	for (char *const *e = envp; e && *e; e++)
		if (strncmp(*e, name, len) == 0 && (*e)[len] == '=')
			return *e + len + 1;
	return NULL;
}

static bool preloads_us(const char *value)
{
	if (value == NULL || self_path[0] == 0)
		return value != NULL && strstr(value, "libnkpreload") != NULL;
	const char *base = strrchr(self_path, '/');
	return strstr(value, self_path) != NULL || strstr(value, base ? base + 1 : self_path);
}

/* NAME=VALUE, or NAME=BEFORE:VALUE: libraries already preloaded stay first (a
 * sanitizer runtime must be), as `netkernel run` orders them. */
static char *entry(const char *name, const char *value, const char *before)
{
	size_t n = strlen(name) + strlen(value) + (before ? strlen(before) + 1 : 0) + 2;
	char *s = malloc(n);
	if (s != NULL)
		snprintf(s, n, "%s=%s%s%s", name, before ? before : "", before ? ":" : "", value);
	return s;
}

/* envp with what is missing put back; envp itself when nothing is. */
static struct envfix fix_env(char *const envp[])
{
	struct envfix f = { .envp = (char **)envp };
	struct { const char *name; const char *value; } want[EXTRA - 1] = {
		{ NK_AG_ENV_SOCKET, nk_env(NK_AG_ENV_SOCKET) },
		{ "NETKERNEL_INSTANCE", nk_env("NETKERNEL_INSTANCE") },
		{ "NETKERNEL_ROOT", nk_env("NETKERNEL_ROOT") },
		{ NK_AG_ENV_LIB, nk_self_path() },
		{ NK_AG_ENV_BIN, nk_agent_bin() },
	};
	int k = 0;
	const char *preload = find(envp, "LD_PRELOAD", 10);
	bool drop_preload = false;
	if (self_path[0] && !preloads_us(preload)) {
		f.strings[k++] = entry("LD_PRELOAD", self_path, preload && *preload ? preload : NULL);
		drop_preload = preload != NULL;
	}
	for (int i = 0; i < EXTRA - 1; i++)
		if (want[i].value && *want[i].value &&
		    !find(envp, want[i].name, strlen(want[i].name)))
			f.strings[k++] = entry(want[i].name, want[i].value, NULL);
	if (k == 0)
		return f;
	size_t n = 0;
	for (char *const *e = envp; e && *e; e++)
		n++;
	f.made = malloc((n + k + 1) * sizeof *f.made);
	if (f.made == NULL)
		return f; /* out of memory: the caller's environment as it is */
	size_t m = 0;
	for (char *const *e = envp; e && *e; e++)
		if (!(drop_preload && strncmp(*e, "LD_PRELOAD=", 11) == 0))
			f.made[m++] = *e;
	for (int i = 0; i < k; i++)
		if (f.strings[i] != NULL)
			f.made[m++] = f.strings[i];
	f.made[m] = NULL;
	f.envp = f.made;
	return f;
}

static void free_env(struct envfix *f)
{
	int err = errno;
	for (int i = 0; i < EXTRA; i++)
		free(f->strings[i]);
	free(f->made);
	errno = err;
}

NK_EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
	struct envfix f = fix_env(envp);
	int r = REAL(execve)(path, argv, f.envp);
	free_env(&f);
	return r;
}

NK_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
	struct envfix f = fix_env(envp);
	int r = REAL(execvpe)(file, argv, f.envp);
	free_env(&f);
	return r;
}

NK_EXPORT int execv(const char *path, char *const argv[])
{
	return execve(path, argv, environ);
}

NK_EXPORT int execvp(const char *file, char *const argv[])
{
	return execvpe(file, argv, environ);
}

NK_EXPORT int fexecve(int fd, char *const argv[], char *const envp[])
{
	struct envfix f = fix_env(envp);
	int r = REAL(fexecve)(fd, argv, f.envp);
	free_env(&f);
	return r;
}

NK_EXPORT int execveat(int dirfd, const char *path, char *const argv[], char *const envp[],
		       int flags)
{
	struct envfix f = fix_env(envp);
	int r = REAL(execveat)(dirfd, path, argv, f.envp, flags);
	free_env(&f);
	return r;
}

/* execl & co: the variadic list as an argv on the stack; envp after the NULL for
 * execle. */
#define COLLECT(arg, ap, argv, envp_out)                                    \
	size_t n_ = 1;                                                      \
	va_start(ap, arg);                                                  \
	while (va_arg(ap, char *) != NULL)                                  \
		n_++;                                                       \
	va_end(ap);                                                         \
	char *argv[n_ + 1];                                                 \
	argv[0] = (char *)arg;                                              \
	va_start(ap, arg);                                                  \
	for (size_t i_ = 1; i_ <= n_; i_++)                                 \
		argv[i_] = va_arg(ap, char *);                              \
	envp_out;                                                           \
	va_end(ap)

NK_EXPORT int execl(const char *path, const char *arg, ...)
{
	va_list ap;
	COLLECT(arg, ap, argv, (void)0);
	return execve(path, argv, environ);
}

NK_EXPORT int execlp(const char *file, const char *arg, ...)
{
	va_list ap;
	COLLECT(arg, ap, argv, (void)0);
	return execvpe(file, argv, environ);
}

NK_EXPORT int execle(const char *path, const char *arg, ...)
{
	va_list ap;
	char **envp;
	COLLECT(arg, ap, argv, envp = va_arg(ap, char **));
	return execve(path, argv, envp);
}

NK_EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
			  const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
	struct envfix f = fix_env(envp);
	int r = REAL(posix_spawn)(pid, path, fa, attr, argv, f.envp);
	free_env(&f);
	return r;
}

NK_EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
			   const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
	struct envfix f = fix_env(envp);
	int r = REAL(posix_spawnp)(pid, file, fa, attr, argv, f.envp);
	free_env(&f);
	return r;
}

NK_EXPORT pid_t vfork(void)
{
	return REAL(fork)();
}
