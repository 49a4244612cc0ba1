#!/bin/bash
for i in 1 2 3; do
  for v in old new; do
    new/notesync-bench folder --size 1000 --json --server-bin $v/notesync-server --cli-bin $v/notesync > ./$v-$i.json 2> ./$v-$i.txt
    echo "$v $i rc=$? load=$(cut -d' ' -f1-3 /proc/loadavg)" >> ./log
  done
done
