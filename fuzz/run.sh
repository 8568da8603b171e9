#!/usr/bin/env bash
# Runs the fuzz targets for SECONDS each, one after the other, and prints the
# executions per target. A crash fails the run (after the other targets),
# with its input shown.
#
#   fuzz/run.sh SECONDS [TARGET...]     (all targets when none are named)
#
# Each target grows fuzz/corpus/<target> (kept between runs, not committed),
# starting from fuzz/seeds/<target>; fuzz/dicts/ guide the mutations.
# The default, --sanitizer none (the crates fuzzed have no unsafe code), builds
# on the stable toolchain as it is. FUZZ_SANITIZER=address adds ASan, whose
# -Zsanitizer flag is nightly-only: RUSTC_BOOTSTRAP=1, set here, lets the
# stable toolchain take it (checked with rustc 1.95).
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-none}
if (($#)); then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi

started=$SECONDS
build_log=$(mktemp)
if ! cargo fuzz build --sanitizer "$sanitizer" 2>"$build_log"; then
    cat "$build_log" >&2
    exit 1
fi
rm -f "$build_log"
echo "fuzz: built ${#targets[@]} targets in $((SECONDS - started))s"

declare -A dict=(
    [bearer]=http [admin_route]=http [admin_body]=http [header_map]=http
    [introspection]=json [config]=json [jwks]=json [jwt]=jwt [cache_store]=json [denylist_store]=json [etcd_answers]=json
)
status=0
printf '%-16s %12s %8s %s\n' target executions corpus result
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t"
    log=$(mktemp)
    args=(-max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048)
    [[ -n "${dict[$t]:-}" ]] && args+=(-dict="dicts/${dict[$t]}.dict")
    if cargo fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" "seeds/$t" -- "${args[@]}" >"$log" 2>&1; then
        result=ok
    else
        result=CRASH
        status=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{print $2}' | tail -1)
    printf '%-16s %12s %8s %s\n' "$t" "${execs:-?}" "$(ls "corpus/$t" | wc -l)" "$result"
    if [[ $result == CRASH ]]; then
        grep -E -A12 'panicked at|ERROR: libFuzzer' "$log" | head -40 >&2
        artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | awk '{print $5}' | tail -1)
        if [[ -n "$artifact" ]]; then
            echo "input ($artifact):" >&2
            od -c "$artifact" | head -20 >&2
            echo "reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $t $artifact  (in fuzz/)" >&2
        fi
    fi
    rm -f "$log"
done
echo "fuzz: $((SECONDS - started))s in all"
exit $status
