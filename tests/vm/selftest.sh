#!/usr/bin/env bash
# selftest.sh — host-side check of tests/vm/run-in-vm: boots the VM 4 times (~15-30 s warm).
# Exits non-zero on any failure; the last line is "N passed, M failed".
# shellcheck disable=SC2016 # the single-quoted scripts are expanded in the guest
set -euo pipefail
VM=$(dirname "$(readlink -f "$0")")/run-in-vm
WORK=$(mktemp -d "${TMPDIR:-/tmp}/membroker vm-selftest.XXXXXX")   # a space, on purpose
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
PASSED=0 FAILED=0 RC=0

vm() { RC=0; "$VM" "$@" >out 2>err || RC=$?; }
check() {  # check DESCRIPTION TEST-COMMAND...
    local what=$1
    shift
    if "$@"; then
        PASSED=$((PASSED + 1)) && echo "ok   $what"
    else
        FAILED=$((FAILED + 1)) && echo "FAIL $what (exit $RC)"
        sed 's/^/    stdout: /' out | tail -n 5
        sed 's/^/    stderr: /' err | tail -n 15
    fi
}
is() { [[ $1 == "$2" ]]; }

vm --env "MB_X=a b'c" -- sh -c 'printf "%s|" "$MB_X" "$@"; echo; echo to-stderr >&2; exit 3' _ 'x  y' '*'
check "exit status 3 is propagated" is "$RC" 3
check "stdout carries COMMAND's stdout only, argv and --env verbatim" is "$(<out)" "a b'c|x  y|*|"
check "stderr carries COMMAND's stderr only" is "$(<err)" to-stderr

vm -- sh -c 'D=/sys/bus/dax/devices/dax0.0
    test -c /dev/dax0.0 && echo chardev
    echo "node=$(cat $D/target_node)"
    test -e $D/../dax_region/create && echo dynamic
    echo written-in-guest >"from guest.txt"'
check "the guest run succeeds" is "$RC" 0
check "/dev/dax0.0 is a character device" grep -qx chardev out
check "dax0.0 target_node is set (not -1)" grep -qE '^node=[0-9]+$' out
check "the dax region is dynamic (has create)" grep -qx dynamic out
check "a file written in the guest's cwd is on the host" is "$(cat "from guest.txt" 2>/dev/null)" written-in-guest

vm --no-dax -- sh -c '! test -e /dev/dax0.0'
check "--no-dax: no /dev/dax0.0" is "$RC" 0

START=$SECONDS
vm --timeout 20 -- sleep 600
check "timeout gives 124" is "$RC" 124
check "timeout is enforced (took $((SECONDS - START)) s)" test $((SECONDS - START)) -lt 60

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
