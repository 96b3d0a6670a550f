// The real @segment/analytics-node tracking one event every <pace> ms, as a running app
// does, while the agent may be killed and restarted under it.
// Usage: node segment_stream.mjs <host> <writeKey> <count> <pace ms> [maxRetries]
// Event i has messageId `<writeKey>-<i>`. Prints "REQUEST <retry-count> <events>" per HTTP
// request, "RESPONSE <status>", "ERROR <reason>", and finally "DONE <json summary>".
import { Analytics } from '@segment/analytics-node'

const [host, writeKey, count, pace, maxRetries = '3'] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host, flushAt: 5, flushInterval: 100,
  maxRetries: Number(maxRetries), httpRequestTimeout: 5000 })
let errors = 0
analytics.on('error', (err) => {
  errors++
  console.log('ERROR ' + String(err.reason ?? err.code ?? err))
})
analytics.on('http_request', (req) => {
  const body = JSON.parse(req.body)
  console.log(`REQUEST ${req.headers['X-Retry-Count'] ?? 0} ${body.batch.length}`)
})
analytics.on('http_response', (res) => console.log(`RESPONSE ${res.status}`))

for (let i = 0; i < Number(count); i++) {
  analytics.track({ userId: 'u', event: 'Node Event', properties: { i },
    messageId: `${writeKey}-${i}` })
  await new Promise((resolve) => setTimeout(resolve, Number(pace)))
}
await analytics.closeAndFlush({ timeout: 60000 })
console.log('DONE ' + JSON.stringify({ errors }))
