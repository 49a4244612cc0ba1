# Alternating A/B of the folder scenario: old/ and new/ each hold a notesync CLI; one server and bench binary.
OUT=${OUT:-out}; mkdir -p $OUT
for i in 1 2 3; do for v in old new; do
  ./notesync-bench folder --size 1000 --json --server-bin ./notesync-server --cli-bin $v/notesync > $OUT/$v-$i.json 2> $OUT/$v-$i.txt
  echo "$v-$i $(cat /proc/loadavg)" >> $OUT/load.txt
done; done
