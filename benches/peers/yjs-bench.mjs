// The Yjs side of notesync-bench's scenarios 1 (live-trace) and 3
// (catch-up), against y-websocket's server or Hocuspocus, with Yjs clients
// in Node speaking each server's wire protocol (y-protocols sync messages;
// Hocuspocus prefixes each with the document name and needs an auth
// message first).
//
//   node yjs-bench.mjs y-websocket|hocuspocus live-trace|catch-up
//        [--trace FILE] [--edits N] [--paced-rate OPS] [--reps N] [--json]
//
// As in notesync-bench: the server runs as its own process (its memory and
// CPU read from /proc/PID); the writer's messages are made before the clock
// starts (one Yjs update per trace edit, as a provider sends them); the
// observers run in a worker thread, record send-to-receipt latency per
// update, and apply what they received only after the clock stops; every
// observer must end with the trace's endContent.
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import zlib from 'node:zlib'
import { fileURLToPath } from 'node:url'
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads'
import WebSocket from 'ws'
import * as Y from 'yjs'
import * as syncProtocol from 'y-protocols/sync'
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'

const here = path.dirname(fileURLToPath(import.meta.url))
const MSG_SYNC = 0
const MSG_AUTH = 2
const MSG_SYNC_STATUS = 8
const OBSERVERS = 10
const TEXT = 'text'
const now = () => Number(process.hrtime.bigint()) // ns, one clock for all threads
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

// ------------------------------------------------------------ wire client

class YClient {
  constructor (kind, port, docName, doc = new Y.Doc()) {
    this.kind = kind
    this.port = port
    this.docName = docName
    this.doc = doc
    this.onUpdate = null // (Uint8Array) => void, for broadcast updates
    this.onStep2 = null
    this.acks = 0
    this.bytesIn = 0
  }

  header (enc, type) {
    if (this.kind === 'hocuspocus') encoding.writeVarString(enc, this.docName)
    encoding.writeVarUint(enc, type)
  }

  async connect () {
    const url = this.kind === 'hocuspocus'
      ? `ws://127.0.0.1:${this.port}`
      : `ws://127.0.0.1:${this.port}/${this.docName}`
    this.ws = new WebSocket(url, { perMessageDeflate: false })
    this.ws.binaryType = 'nodebuffer'
    await new Promise((resolve, reject) => {
      this.ws.once('open', resolve)
      this.ws.once('error', reject)
    })
    this.ws.on('message', data => this.receive(data))
    if (this.kind === 'hocuspocus') {
      const authed = new Promise(resolve => { this.onAuthed = resolve })
      const enc = encoding.createEncoder()
      this.header(enc, MSG_AUTH)
      encoding.writeVarUint(enc, 0) // token
      encoding.writeVarString(enc, '')
      this.ws.send(encoding.toUint8Array(enc))
      await authed
    }
  }

  // Sync step 1 (our state vector); resolves on the server's step 2.
  sync () {
    const got = new Promise(resolve => { this.onStep2 = resolve })
    const enc = encoding.createEncoder()
    this.header(enc, MSG_SYNC)
    syncProtocol.writeSyncStep1(enc, this.doc)
    this.ws.send(encoding.toUint8Array(enc))
    return got
  }

  receive (data) {
    this.bytesIn += data.length
    const dec = decoding.createDecoder(new Uint8Array(data.buffer, data.byteOffset, data.length))
    if (this.kind === 'hocuspocus') decoding.readVarString(dec)
    const type = decoding.readVarUint(dec)
    if (type === MSG_SYNC) {
      const step = decoding.readVarUint(dec)
      if (step === syncProtocol.messageYjsSyncStep1) {
        const sv = decoding.readVarUint8Array(dec)
        const enc = encoding.createEncoder()
        this.header(enc, MSG_SYNC)
        syncProtocol.writeSyncStep2(enc, this.doc, sv)
        this.ws.send(encoding.toUint8Array(enc))
      } else if (step === syncProtocol.messageYjsSyncStep2) {
        const update = decoding.readVarUint8Array(dec)
        Y.applyUpdate(this.doc, update, 'remote')
        const cb = this.onStep2
        this.onStep2 = null
        if (cb) cb(data.length)
      } else if (step === syncProtocol.messageYjsUpdate) {
        const update = decoding.readVarUint8Array(dec)
        if (this.onUpdate) this.onUpdate(update)
        else Y.applyUpdate(this.doc, update, 'remote')
      }
    } else if (type === MSG_AUTH && this.onAuthed) {
      this.onAuthed()
      this.onAuthed = null
    } else if (type === MSG_SYNC_STATUS) {
      this.acks++
    }
  }

  // An encoded update message.
  updateMessage (update) {
    const enc = encoding.createEncoder()
    this.header(enc, MSG_SYNC)
    syncProtocol.writeUpdate(enc, update)
    return encoding.toUint8Array(enc)
  }

  close () { this.ws.terminate() }
}

// ------------------------------------------------------------ observers (worker)

if (!isMainThread) {
  const { kind, port, docName, n, observers, stamps, progress } = workerData
  const sent = new Float64Array(stamps)
  const counts = new Int32Array(progress)
  const obs = []
  for (let k = 0; k < observers; k++) {
    const c = new YClient(kind, port, docName)
    await c.connect()
    await c.sync()
    c.got = []
    c.lat = new Float64Array(n)
    c.onUpdate = update => {
      const i = c.got.length
      const t = sent[i]
      c.lat[i] = t > 0 ? (now() - t) / 1e3 : 0
      c.got.push(update)
      if (k === 0) Atomics.store(counts, 0, c.got.length)
      if (c.got.length === n) {
        c.done = now()
        if (obs.every(o => o.done)) parentPort.postMessage({ kind: 'delivered', at: Math.max(...obs.map(o => o.done)) })
      }
    }
    obs.push(c)
  }
  parentPort.postMessage({ kind: 'ready' })
  parentPort.on('message', msg => {
    if (msg.kind !== 'check') return
    const lat = new Float64Array(n * observers)
    let bad = null
    obs.forEach((c, k) => {
      lat.set(c.lat, k * n)
      for (const u of c.got) Y.applyUpdate(c.doc, u, 'remote')
      const text = c.doc.getText(TEXT).toString()
      if (text !== msg.expected && bad === null) bad = `observer ${k} diverged: ${text.length} chars, expected ${msg.expected.length}`
      c.close()
    })
    parentPort.postMessage({ kind: 'checked', bad, lat }, [lat.buffer])
  })
}

// ------------------------------------------------------------ main

function args () {
  const a = process.argv.slice(2)
  const o = {
    server: a[0],
    scenario: a[1],
    trace: path.join(here, '../../../shared/traces/automerge-paper.json.gz'),
    edits: Infinity,
    pacedRate: 10000,
    reps: 20,
    window: 16384,
    json: false
  }
  for (let i = 2; i < a.length; i++) {
    const f = a[i]
    if (f === '--json') o.json = true
    else if (f === '--trace') o.trace = a[++i]
    else if (f === '--edits') o.edits = Number(a[++i])
    else if (f === '--paced-rate') o.pacedRate = Number(a[++i])
    else if (f === '--reps') o.reps = Number(a[++i])
    else if (f === '--window') o.window = Number(a[++i])
    else throw new Error(`unknown flag ${f}`)
  }
  if (!['y-websocket', 'hocuspocus'].includes(o.server) || !['live-trace', 'catch-up'].includes(o.scenario)) {
    console.error('usage: node yjs-bench.mjs y-websocket|hocuspocus live-trace|catch-up [--trace FILE] [--edits N] [--paced-rate OPS] [--reps N] [--json]')
    process.exit(2)
  }
  return o
}

function loadTrace (file, limit) {
  const t = JSON.parse(zlib.gunzipSync(fs.readFileSync(file)).toString('utf8'))
  const edits = []
  for (const txn of t.txns) for (const p of txn.patches) edits.push(p)
  const complete = edits.length <= limit
  return { start: t.startContent, end: t.endContent, edits: complete ? edits : edits.slice(0, limit), complete }
}

// One update per edit, as a provider would send them; made before timing.
function prepare (trace) {
  const doc = new Y.Doc()
  const text = doc.getText(TEXT)
  const updates = []
  doc.on('update', u => updates.push(u))
  if (trace.start) text.insert(0, trace.start)
  for (const [pos, del, ins] of trace.edits) {
    doc.transact(() => {
      if (del > 0) text.delete(pos, del)
      if (ins) text.insert(pos, ins)
    })
  }
  const expected = text.toString()
  if (trace.complete && expected !== trace.end) throw new Error('Yjs does not reproduce the trace endContent')
  return { updates, expected }
}

function procSample (pid) {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8')
    const kib = k => Number(status.split('\n').find(l => l.startsWith(k)).slice(k.length).trim().split(/\s+/)[0]) * 1024
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return { rss: kib('VmRSS:'), hwm: kib('VmHWM:'), cpu: (Number(f[11]) + Number(f[12])) / 100 }
  } catch { return null }
}

async function startServer (kind) {
  const child = spawn(process.execPath, [path.join(here, 'servers.mjs'), kind], { stdio: ['ignore', 'pipe', 'inherit'] })
  const port = await new Promise((resolve, reject) => {
    let buf = ''
    const timer = setTimeout(() => reject(new Error('server did not start')), 20000)
    child.stdout.on('data', d => {
      buf += d
      const m = buf.match(/listening on 127\.0\.0\.1:(\d+)/)
      if (m) { clearTimeout(timer); resolve(Number(m[1])) }
    })
    child.once('exit', code => reject(new Error(`server exited with ${code}`)))
  })
  return { child, port, pid: child.pid }
}

function quantile (sorted, q) {
  if (sorted.length === 0) return 0
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]
}

function latencies (prefix, lat, out) {
  const s = Float64Array.from(lat.filter(x => x > 0)).sort()
  out[`${prefix}p50_us`] = Math.round(quantile(s, 0.5))
  out[`${prefix}p99_us`] = Math.round(quantile(s, 0.99))
  out[`${prefix}p999_us`] = Math.round(quantile(s, 0.999))
  out[`${prefix}max_us`] = Math.round(s.length ? s[s.length - 1] : 0)
}

// One replay phase on a fresh document: flood (rate null) or paced.
async function phase (o, kind, port, prepared, rate, observers) {
  const { updates, expected } = prepared
  const n = updates.length
  const docName = `live-${process.pid}-${Date.now()}-${rate ?? 'flood'}`
  const stamps = new SharedArrayBuffer(8 * n)
  const sent = new Float64Array(stamps)
  const progress = new SharedArrayBuffer(4)
  const counts = new Int32Array(progress)
  let worker = null
  let delivered = null
  let workerMsg = null
  if (observers > 0) {
    worker = new Worker(fileURLToPath(import.meta.url), { workerData: { kind, port, docName, n, observers, stamps, progress } })
    worker.on('message', m => {
      if (m.kind === 'delivered') delivered = m.at
      else workerMsg = m
    })
    worker.on('error', e => { console.error(e); process.exit(1) })
    while (!workerMsg || workerMsg.kind !== 'ready') await sleep(5)
  }
  const writer = new YClient(kind, port, docName)
  await writer.connect()
  await writer.sync()
  const msgs = updates.map(u => writer.updateMessage(u))
  // Flow control: hocuspocus acks each update (applied in memory); for
  // y-websocket, the first observer's receipts stand in for acks.
  const done = () => kind === 'hocuspocus' ? writer.acks : (observers > 0 ? Atomics.load(counts, 0) : n)
  const first = now()
  let ackedAt = null
  for (let i = 0; i < n;) {
    if (i - done() >= o.window || writer.ws.bufferedAmount > (4 << 20)) { await sleep(0); continue }
    let end = Math.min(n, i + 512, done() + o.window)
    if (rate) {
      const due = Math.floor((now() - first) / 1e9 * rate) + 1
      end = Math.min(end, due)
      if (end <= i) { await sleep(1); continue }
    }
    const t = now()
    for (; i < end; i++) {
      sent[i] = t
      writer.ws.send(msgs[i])
    }
    await new Promise(resolve => setImmediate(resolve))
  }
  const deadline = Date.now() + 600000
  while ((kind === 'hocuspocus' && writer.acks < n) || (observers > 0 && delivered === null)) {
    if (kind === 'hocuspocus' && ackedAt === null && writer.acks >= n) ackedAt = now()
    if (Date.now() > deadline) throw new Error(`phase did not finish (acks ${writer.acks}, delivered ${delivered})`)
    await sleep(1)
  }
  if (kind === 'hocuspocus' && ackedAt === null) ackedAt = now()
  const out = { ops: n, first, delivered, ackedAt }
  if (worker) {
    workerMsg = null
    worker.postMessage({ kind: 'check', expected })
    while (!workerMsg) await sleep(5)
    if (workerMsg.bad) throw new Error(workerMsg.bad)
    out.lat = workerMsg.lat
    await worker.terminate()
  }
  writer.close()
  return out
}

async function liveTrace (o, srv, trace) {
  const prepared = prepare(trace)
  const out = { edits: trace.edits.length, ops: prepared.updates.length, observers: OBSERVERS }
  const cpu0 = procSample(srv.pid)?.cpu
  const flood = await phase(o, o.server, srv.port, prepared, null, OBSERVERS)
  const cpu1 = procSample(srv.pid)?.cpu
  const secs = (flood.delivered - flood.first) / 1e9
  out.delivered_ops_per_s = Math.round(flood.ops / secs)
  if (o.server === 'hocuspocus') out.acked_in_memory_ops_per_s = Math.round(flood.ops / ((flood.ackedAt - flood.first) / 1e9))
  out.elapsed_s = secs
  latencies('', flood.lat, out)
  out.flood_server_cpu_s = cpu1 - cpu0
  const paced = await phase(o, o.server, srv.port, prepared, o.pacedRate, OBSERVERS)
  out.paced_rate = o.pacedRate
  out.paced_ops_per_s = Math.round(paced.ops / ((paced.delivered - paced.first) / 1e9))
  latencies('paced_', paced.lat, out)
  out.paced_server_cpu_s = procSample(srv.pid)?.cpu - cpu1
  out.check = `all ${OBSERVERS} observers hold the ${trace.complete ? 'endContent' : "writer's"} text (${prepared.expected.length} chars), twice`
  return out
}

async function catchUp (o, srv, trace) {
  const prepared = prepare(trace)
  const docName = `paper-${process.pid}-${Date.now()}`
  // The document: the whole trace sent as live updates (no observers).
  const writer = new YClient(o.server, srv.port, docName)
  await writer.connect()
  await writer.sync()
  for (const u of prepared.updates) writer.ws.send(writer.updateMessage(u))
  while (writer.ws.bufferedAmount > 0) await sleep(5)
  const median = v => { const s = [...v].sort((a, b) => a - b); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2 }
  const full = []
  let bytes = 0
  let reader = null
  for (let r = 0; r < o.reps; r++) {
    for (let tries = 0; ; tries++) {
      const c = new YClient(o.server, srv.port, docName)
      await c.connect()
      const t = now()
      bytes = await c.sync()
      const ms = (now() - t) / 1e6
      if (c.doc.getText(TEXT).toString() === prepared.expected) {
        full.push(ms)
        if (reader) reader.close()
        reader = c
        break
      }
      // The server is still applying the writer's updates.
      c.close()
      if (tries > 600) throw new Error('the pulled text never matched')
      await sleep(100)
    }
  }
  // 1-op deltas: a typist (synced) appends one char; once a watcher has
  // it, the reader (holding the previous text) syncs on a new connection.
  reader.close()
  const typist = new YClient(o.server, srv.port, docName)
  await typist.connect()
  await typist.sync()
  const watcher = new YClient(o.server, srv.port, docName)
  await watcher.connect()
  await watcher.sync()
  let seen = 0
  watcher.onUpdate = () => { seen++ }
  // (a provider's send of local edits)
  typist.doc.on('update', (u, origin) => {
    if (origin !== 'remote') typist.ws.send(typist.updateMessage(u))
  })
  const typistText = typist.doc.getText(TEXT)
  const delta = []
  for (let k = 0; k < o.reps * 10; k++) {
    typistText.insert(typistText.length, 'x')
    while (seen < k + 1) await sleep(0)
    const c = new YClient(o.server, srv.port, docName, reader.doc)
    await c.connect()
    const t = now()
    await c.sync()
    delta.push((now() - t) / 1e6)
    if (c.doc.getText(TEXT).toString() !== typistText.toString()) throw new Error('a delta sync did not bring the new char')
    c.close()
  }
  typist.close(); watcher.close(); writer.close()
  return {
    full_pull_ms: median(full),
    full_pull_max_ms: Math.max(...full),
    full_pull_bytes: bytes,
    text_bytes: Buffer.byteLength(prepared.expected),
    delta_pull_ms: median(delta),
    check: 'every full sync rebuilds the text; every delta sync brings the new char'
  }
}

if (isMainThread) {
  const o = args()
  const trace = loadTrace(o.trace, o.edits)
  const srv = await startServer(o.server)
  let out
  try {
    out = o.scenario === 'live-trace' ? await liveTrace(o, srv, trace) : await catchUp(o, srv, trace)
  } catch (e) {
    srv.child.kill('SIGKILL')
    console.error(`yjs-bench ${o.server} ${o.scenario}: FAILED: ${e.stack || e}`)
    process.exit(1)
  }
  const s = procSample(srv.pid)
  const cpu = process.cpuUsage()
  out = { scenario: o.scenario, server: o.server, ...out, server_peak_rss_bytes: s?.hwm, server_cpu_s: s?.cpu, client_cpu_s: (cpu.user + cpu.system) / 1e6 }
  srv.child.kill('SIGTERM')
  const table = [`== ${o.server} ${o.scenario}`, ...Object.entries(out).map(([k, v]) => `  ${k.padEnd(28)} ${v}`)].join('\n')
  if (o.json) { console.error(table); console.log(JSON.stringify(out)) } else console.log(table)
  process.exit(0)
}
