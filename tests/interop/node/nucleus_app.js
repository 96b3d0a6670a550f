// A Node app using the real nucleus-nodejs module, pointed at Outpost.
// Usage: node nucleus_app.js <endpoint> <appId> <events> <seconds>
// Prints every frame the module sends ("SENT <json>") and receives ("RECV <json>").
'use strict'

const [endpoint, appId, count, seconds] = process.argv.slice(2)
const WS = require('ws')

// nucleus-nodejs uses a global WebSocket when there is one: wrap ws to log frames.
globalThis.WebSocket = class LoggingWebSocket extends WS {
  constructor (url) {
    super(url)
    this.on('message', (data) => console.log('RECV ' + data))
  }
  send (data) {
    console.log('SENT ' + data)
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
