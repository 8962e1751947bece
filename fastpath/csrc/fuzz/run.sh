#!/bin/sh
# Run every libFuzzer target for a bounded time: fuzz/fuzz_<name>.c is built
# (make fuzz) into $FUZZ_BUILD/fuzz_<name> and run on its seed corpus
# fuzz/corpus/<name>/. New inputs go to a scratch corpus, never into the
# repository; a crash leaves its input in $FUZZ_OUT and fails the run.
#
#   fastpath/csrc/fuzz/run.sh SECONDS          every target, SECONDS each
#   FUZZ_TARGETS="nqe" run.sh 30               only these targets
#   FUZZ_BUILD=/tmp/b FUZZ_DEFS=-DNK_FUZZ_BROKEN run.sh 30   another build (e.g. broken)
set -eu
seconds=${1:?usage: run.sh SECONDS}
here=$(cd "$(dirname "$0")" && pwd)
csrc=$(dirname "$here")
build=${FUZZ_BUILD:-$csrc/build}
out=${FUZZ_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/nk-fuzz.XXXXXX")}
targets=${FUZZ_TARGETS:-$(for f in "$here"/fuzz_*.c; do b=$(basename "$f" .c); echo "${b#fuzz_}"; done)}

make -s -C "$csrc" fuzz OBJDIR="$build" FUZZ_DEFS="${FUZZ_DEFS:-}"
status=0
for name in $targets; do
	seeds="$here/corpus/$name"
	work="$out/corpus-$name"
	mkdir -p "$work" "$seeds"
	echo "== fuzz_$name: ${seconds}s, seeds $seeds"
	if ! "$build/fuzz_$name" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix="$out/$name-" "$work" "$seeds"; then
		echo "== fuzz_$name FAILED: artifacts in $out" >&2
		status=1
	fi
done
exit $status
