# Alternating A/B of the folder scenario: old/ and new/ each hold notesync, notesync-server, notesync-bench.
OUT=${OUT:-out}; mkdir -p $OUT
for i in 1 2 3; do for v in old new; do
  $v/notesync-bench folder --size 1000 --json --server-bin $v/notesync-server --cli-bin $v/notesync > $OUT/$v-$i.json 2> $OUT/$v-$i.txt
  echo "$v-$i $(cat /proc/loadavg)" >> $OUT/load.txt
done; done
