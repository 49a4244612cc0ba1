# Alternating A/B/C of the folder scenario: each of $VERSIONS (directories)
# holds notesync, notesync-server and notesync-bench; one round runs each once.
OUT=${OUT:-out}; VERSIONS=${VERSIONS:-mid new new2}; mkdir -p $OUT
for i in 1 2 3; do for v in $VERSIONS; do
  $v/notesync-bench folder --size 1000 --json --server-bin $v/notesync-server --cli-bin $v/notesync > $OUT/$v-$i.json 2> $OUT/$v-$i.txt
  echo "$v-$i $(cat /proc/loadavg)" >> $OUT/load.txt
done; done
