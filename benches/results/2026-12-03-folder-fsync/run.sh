#!/bin/sh
# Alternating A/B of the folder scenario: old/ and new/ each hold
# notesync, notesync-server and notesync-bench (old: ddc5545, new: d94ab71,
# see BENCHMARKS.md "One fsync fewer per imported note"). Run from a
# folder holding both.
set -e
out=${OUT:-.}
for i in 1 2 3; do for v in old new; do
  new/notesync-bench folder --size 1000 --json \
    --server-bin $v/notesync-server --cli-bin $v/notesync > $out/$v-$i.json
  uptime >> $out/load.txt
done; done
