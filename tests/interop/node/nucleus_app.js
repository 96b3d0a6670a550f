// A Node app using the real nucleus-nodejs module, pointed at Outpost.
// Usage: node nucleus_app.js <endpoint> <appId> <events> <seconds>
// Prints every frame the module sends ("SENT <json>") and receives ("RECV <json>").
// Exits once the agent has acknowledged every event the app queued (the init, the
// events and the error), or after <seconds> if it never does.
'use strict'

const [endpoint, appId, count, seconds] = process.argv.slice(2)
const WS = require('ws')

const queued = Number(count) + 2   // appStarted's init, the events, trackError's error
const sent = new Set()
const acked = new Set()

// nucleus-nodejs uses a global WebSocket when there is one: wrap ws to log frames.
globalThis.WebSocket = class LoggingWebSocket extends WS {
  constructor (url) {
    super(url)
    this.on('message', (data) => {
      console.log('RECV ' + data)
      let reply = {}
      try { reply = JSON.parse(data) } catch {}   // the test reads the frame as printed
      for (const id of reply.reportedIds || []) acked.add(id)
      if (sent.size >= queued && [...sent].every((id) => acked.has(id))) process.exit(0)
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
Nucleus.init(appId, { endpoint, reportInterval: 1, disableErrorReports: true })
Nucleus.setUserId('user-42')
Nucleus.appStarted()
for (let i = 0; i < Number(count); i++) {
  Nucleus.track('evt-' + i, { i, label: 'x'.repeat(i % 7) })
}
Nucleus.trackError('boom', new Error('kaboom'))
setTimeout(() => process.exit(0), Number(seconds) * 1000)
