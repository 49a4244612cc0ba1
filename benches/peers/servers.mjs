// Starts one Yjs server on 127.0.0.1 (a free port) and prints
// "listening on 127.0.0.1:PORT", as notesync-server does, so the driver
// can read its memory and CPU from /proc/PID.
//
//   node servers.mjs y-websocket | hocuspocus
//
// Both keep documents in memory. y-websocket's server persists nothing
// unless YPERSISTENCE is set (then to LevelDB, without fsync); Hocuspocus
// persists only through extensions (none here), debounced by 2 s.
import http from 'node:http'

const which = process.argv[2]

if (which === 'y-websocket') {
  const { WebSocketServer } = await import('ws')
  const { setupWSConnection } = await import('@y/websocket-server/utils')
  const wss = new WebSocketServer({ noServer: true })
  wss.on('connection', setupWSConnection)
  const server = http.createServer((_req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain' })
    res.end('okay')
  })
  server.on('upgrade', (req, socket, head) => {
    wss.handleUpgrade(req, socket, head, ws => wss.emit('connection', ws, req))
  })
  server.listen(0, '127.0.0.1', () => {
    console.log(`listening on 127.0.0.1:${server.address().port}`)
  })
} else if (which === 'hocuspocus') {
  const { Server } = await import('@hocuspocus/server')
  const server = new Server({ port: 0, address: '127.0.0.1', quiet: true })
  await server.listen()
  console.log(`listening on 127.0.0.1:${server.httpServer.address().port}`)
} else {
  console.error('usage: node servers.mjs y-websocket|hocuspocus')
  process.exit(2)
}

for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0))
