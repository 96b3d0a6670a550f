// The real nucleus-nodejs module tracking one event every <pace> ms, as a running app does,
// while the agent may be killed and restarted under it.
// Usage: node nucleus_stream.js <endpoint> <appId> <events> <pace ms> <seconds>
// Prints "TRACKED <i>" as event i (named `evt-<i>`) is queued, every frame sent
// ("SENT <json>") and received ("RECV <json>"); exits once every event tracked is
// acknowledged ("DONE"), or after <seconds> ("TIMEOUT <left>").
'use strict'

const [endpoint, appId, count, pace, seconds] = process.argv.slice(2)
const WS = require('ws')

// Distinct ids (the module draws them from Math.random, 1..1e6): two events of one id
// would be one to the module's queue, acknowledged by either's ack.
let draws = 0
Math.random = () => ((++draws * 7919) % 1000000) / 1000000

const sent = new Set()
const acked = new Set()
let tracked = 0

globalThis.WebSocket = class LoggingWebSocket extends WS {
  constructor (url) {
    super(url)
    this.on('message', (data) => {
      console.log('RECV ' + data)
      let reply = {}
      try { reply = JSON.parse(data) } catch {}
      for (const id of reply.reportedIds || []) acked.add(id)
      if (tracked === Number(count) && [...sent].every((id) => acked.has(id)) &&
          sent.size === Number(count)) {
        console.log('DONE')
        process.exit(0)
      }
    })
  }

  send (data) {
    console.log('SENT ' + data)
    for (const ev of JSON.parse(data).data || []) {
      if (ev.type !== 'heartbeat') sent.add(ev.id)
    }
    super.send(data)
  }
}

const Nucleus = require('nucleus-nodejs')
Nucleus.init(appId, { endpoint, reportInterval: 0.2, disableErrorReports: true })
const timer = setInterval(() => {
  Nucleus.track('evt-' + tracked, { i: tracked })
  console.log('TRACKED ' + tracked)
  tracked++
  if (tracked === Number(count)) clearInterval(timer)
}, Number(pace))
setTimeout(() => {
  console.log('TIMEOUT ' + [...sent].filter((id) => !acked.has(id)).length)
  process.exit(0)
}, Number(seconds) * 1000)
