// The real nucleus-nodejs module with a backlog: <events> events queued before its socket
// opens, as after the agent was down for a while. The module sends its whole queue in one
// frame every tick and drops from it the events whose ids come back in `reportedIds`.
// Usage: node nucleus_backlog.js <endpoint> <appId> <events> <seconds>
// Prints each frame sent ("SENT <bytes> <events>") and each close ("CLOSE <code> <reason>"),
// then "DRAINED" once the module's queue is empty (filtered as the module filters it), or
// "TIMEOUT" with how much is left after <seconds>. Event i is named `evt-<i> <label>`.
'use strict'

const [endpoint, appId, count, seconds] = process.argv.slice(2)
const WS = require('ws')

// Ids are Math.random() * 1e6: seeded, and kept within 1..10000 (the Python module's
// range), so that ids collide across the queue as they do in a real backlog.
let seed = 20261201
Math.random = () => {
  seed = (seed + 0x6D2B79F5) | 0
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return (((t ^ (t >>> 14)) >>> 0) / 4294967296) * 0.01
}

let pending = null // the module's queue as it filters it: the last frame minus its acks
globalThis.WebSocket = class LoggingWebSocket extends WS {
  constructor (url) {
    super(url)
    this.on('message', (data) => {
      const acked = JSON.parse(data).reportedIds || []
      if (pending !== null) pending = pending.filter((e) => !acked.includes(e.id))
      if (pending !== null && pending.length === 0) {
        console.log('DRAINED')
        process.exit(0)
      }
    })
    this.on('close', (code, reason) => console.log('CLOSE ' + code + ' ' + reason))
  }

  send (data) {
    const events = JSON.parse(data).data.filter((e) => e.type !== 'heartbeat')
    if (events.length) pending = events
    console.log('SENT ' + Buffer.byteLength(data) + ' ' + events.length)
    super.send(data)
  }
}

const Nucleus = require('nucleus-nodejs')
Nucleus.init(appId, { endpoint, reportInterval: 1, disableErrorReports: true })
Nucleus.appStarted()
const names = ['plain', 'café', 'emoji 🚀', 'quote "q"']
for (let i = 0; i < Number(count); i++) {
  Nucleus.track(`evt-${i} ${names[i % names.length]}`, { i, label: 'x'.repeat(300) })
}
setTimeout(() => {
  console.log('TIMEOUT ' + (pending === null ? 'nothing sent' : pending.length + ' left'))
  process.exit(0)
}, Number(seconds) * 1000)
