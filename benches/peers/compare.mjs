// Prints the comparison table from notesync-bench and yjs-bench JSON
// lines: per metric, the median over runs for each server, and how many
// times better notesync is (direction-aware: >1 means notesync is better).
//
//   node compare.mjs FILE...   (each file: JSON objects, one per line)
import fs from 'node:fs'

const rows = []
for (const f of process.argv.slice(2)) {
  for (const line of fs.readFileSync(f, 'utf8').split('\n')) {
    if (line.startsWith('{')) rows.push(JSON.parse(line))
  }
}
const median = v => {
  const s = v.filter(x => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b)
  if (s.length === 0) return undefined
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}
const servers = ['notesync', 'y-websocket', 'hocuspocus']
const get = (server, scenario, key) => median(rows
  .filter(r => (r.server ?? 'notesync') === server && r.scenario === scenario)
  .map(r => typeof key === 'function' ? key(r) : r[key]))
const runs = (server, scenario) => rows.filter(r => (r.server ?? 'notesync') === server && r.scenario === scenario).length

// [label, scenario, key per server (or one for all), higher is better]
const perOp = r => r.flood_server_cpu_s / r.ops * 1e6
const metrics = [
  ['flood: ops/s until all 10 observers had every op', 'live-trace', 'delivered_ops_per_s', true],
  ['flood: acknowledged ops/s (notesync: durable, fsynced; hocuspocus: applied in memory)', 'live-trace',
    { notesync: 'ops_per_s', hocuspocus: 'acked_in_memory_ops_per_s' }, true],
  ['flood: fan-out latency p50 (µs)', 'live-trace', 'p50_us', false],
  ['flood: fan-out latency p99 (µs)', 'live-trace', 'p99_us', false],
  ['flood: server CPU per op (µs)', 'live-trace', perOp, false],
  ['paced (10,000 ops/s offered; 2,000 with SMOKE): ops/s achieved', 'live-trace', 'paced_ops_per_s', true],
  ['paced: fan-out latency p50 (µs)', 'live-trace', 'paced_p50_us', false],
  ['paced: fan-out latency p99 (µs)', 'live-trace', 'paced_p99_us', false],
  ['paced: fan-out latency p99.9 (µs)', 'live-trace', 'paced_p999_us', false],
  ['live-trace: server peak RSS (bytes)', 'live-trace', 'server_peak_rss_bytes', false],
  ['live-trace: server CPU, whole run (s)', 'live-trace', 'server_cpu_s', false],
  ['live-trace: load generator CPU (s)', 'live-trace', 'client_cpu_s', false],
  ['catch-up: full document pulled (ms)', 'catch-up', 'full_pull_ms', false],
  ['catch-up: full document, bytes received', 'catch-up', 'full_pull_bytes', false],
  ['catch-up: 1-op delta pulled (ms)', 'catch-up', 'delta_pull_ms', false],
  ['catch-up: server peak RSS (bytes)', 'catch-up', 'server_peak_rss_bytes', false]
]
const fmt = v => v === undefined ? 'n/a' : (Math.abs(v) >= 100 ? Math.round(v).toLocaleString('en-US') : v.toPrecision(3))
const table = [['metric', ...servers.flatMap(s => s === 'notesync' ? [s] : [s, `notesync vs ${s}`])]]
for (const [label, scenario, key, higher] of metrics) {
  const k = s => typeof key === 'object' && !(key instanceof Function) ? key[s] : key
  const v = Object.fromEntries(servers.map(s => [s, k(s) === undefined ? undefined : get(s, scenario, k(s))]))
  const row = [label]
  for (const s of servers) {
    row.push(fmt(v[s]))
    if (s === 'notesync') continue
    const a = v.notesync
    const b = v[s]
    row.push(a === undefined || b === undefined || a === 0 || b === 0 ? 'n/a' : `${(higher ? a / b : b / a).toFixed(1)}x`)
  }
  table.push(row)
}
const widths = table[0].map((_, i) => Math.max(...table.map(r => String(r[i]).length)))
const line = r => '| ' + r.map((c, i) => i === 0 ? String(c).padEnd(widths[i]) : String(c).padStart(widths[i])).join(' | ') + ' |'
console.log(line(table[0]))
console.log('|' + widths.map((w, i) => (i === 0 ? ':' : '') + '-'.repeat(w + 1) + (i === 0 ? '' : ':')).join('|') + '|')
for (const r of table.slice(1)) console.log(line(r))
console.log()
console.log(`runs per server and scenario: ${servers.map(s => `${s} ${runs(s, 'live-trace')}+${runs(s, 'catch-up')}`).join(', ')} (medians shown)`)
console.log('"notesync vs X": how many times better notesync is on that metric (>1: notesync better).')
console.log('Not like for like: notesync fsyncs every batch before it acknowledges or broadcasts;')
console.log('y-websocket and Hocuspocus keep documents in memory (persisting later, or never, here) and')
console.log('y-websocket acknowledges nothing. The Yjs clients run in Node (writer + one worker thread for')
console.log('the 10 observers); notesync-bench is Rust (one tokio runtime).')
