#!/bin/sh
# Alternating A/B of the folder scenario: old/ and new/ each hold
# notesync, notesync-server and notesync-bench (old: d5b03fd, new: this
# commit's parent tree, see BENCHMARKS.md). Run from a folder holding both.
set -e
out=${OUT:-.}
for i in 1 2 3; do for v in old new; do
  new/notesync-bench folder --size 1000 --json \
    --server-bin $v/notesync-server --cli-bin $v/notesync > $out/$v-$i.json
  uptime >> $out/load.txt
done; done
