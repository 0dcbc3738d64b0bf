#!/usr/bin/env bash
# ctest scripts.staging: scripts/stage_split and scripts/stage_join, the staging of the 491 MB
# GGUF to the device in chunks (docs/reproduction.md, "GPU presets"), on a small random file:
# the join equals the original byte for byte, a rerun keeps it, a damaged or missing chunk is
# named and leaves no joined file, bad arguments are refused with the argument named.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SLOWED_STAGE_DIR="$work/stage"
fails=0
check() { if eval "$1"; then :; else echo "FAIL: $2"; fails=$((fails + 1)); fi; }

head -c $((5 * 1024 * 1024 + 7)) /dev/urandom > "$work/model.gguf"
out="$("$root/scripts/stage_split" "$work/model.gguf" 2 2>&1)"; rc=$?
check "[[ $rc == 0 ]]" "stage_split exit $rc: $out"
check "[[ \$(ls '$work/stage'/model.gguf.part* | wc -l) == 3 ]]" "expected 3 chunks of <= 2 MiB"
check "[[ \$(wc -l < '$work/stage/model.gguf.sha256') == 4 ]]" "sha256 list has not 3 chunks + the whole"
for f in "$work/stage"/model.gguf.part*; do
  check "[[ \$(stat -c %s '$f') -le $((2 * 1024 * 1024)) ]]" "$f larger than 2 MiB"
done

out="$("$root/scripts/stage_join" "$work/stage/model.gguf" 2>&1)"; rc=$?
check "[[ $rc == 0 ]] && cmp -s '$work/model.gguf' '$work/stage/model.gguf'" "join differs from the original ($out)"
out="$("$root/scripts/stage_join" "$work/stage/model.gguf" 2>&1)"
check "[[ '$out' == *'already joined and checked'* ]]" "rerun did not keep the joined file: $out"

rm "$work/stage/model.gguf"
printf 'X' | dd of="$work/stage/model.gguf.part01" bs=1 seek=1000 conv=notrunc status=none
out="$("$root/scripts/stage_join" "$work/stage/model.gguf" 2>&1)"; rc=$?
check "[[ $rc == 1 && '$out' == *'chunk model.gguf.part01 is damaged'* ]]" "damaged chunk not named (exit $rc): $out"
check "[[ ! -e '$work/stage/model.gguf' && ! -e '$work/stage/model.gguf.tmp' ]]" "a damaged join left a file"

rm "$work/stage/model.gguf.part02"
out="$("$root/scripts/stage_join" "$work/stage/model.gguf" 2>&1)"; rc=$?
check "[[ $rc == 1 && ( '$out' == *'part01'* || '$out' == *'chunk model.gguf.part02 missing'* ) ]]" "missing chunk not named: $out"

out="$("$root/scripts/stage_split" "$work/model.gguf" 0 2>&1)"; rc=$?
check "[[ $rc == 2 && '$out' == *'CHUNK_MIB: expected an integer in [1, 60], got'* ]]" "bad CHUNK_MIB: exit $rc: $out"
out="$("$root/scripts/stage_split" "$work/nonexistent" 2>&1)"; rc=$?
check "[[ $rc == 2 && '$out' == *'does not exist'* ]]" "missing FILE: exit $rc: $out"
out="$("$root/scripts/stage_join" "$work/stage/other.gguf" 2>&1)"; rc=$?
check "[[ $rc == 2 && '$out' == *'other.gguf.sha256 missing'* ]]" "missing checksum list: exit $rc: $out"

if ((fails)); then echo "$fails failures"; exit 1; fi
echo "staging: all checks passed"
