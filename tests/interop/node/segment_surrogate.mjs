// The real @segment/analytics-node, one of <count> track calls with a title cut inside an
// emoji: JavaScript's slice leaves a lone surrogate, which JSON.stringify writes "\ud83d".
// Usage: node segment_surrogate.mjs <host> <writeKey> <count>
// Prints "RESPONSE <status>" per HTTP response, "ERROR <reason>", then "DONE <json summary>".
import { Analytics } from '@segment/analytics-node'

const [host, writeKey, count] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host, flushAt: Number(count), flushInterval: 200,
  maxRetries: 2 })
let errors = 0
analytics.on('error', (err) => {
  errors++
  console.log('ERROR ' + String(err.reason ?? err.code ?? err))
})
analytics.on('http_response', (res) => console.log(`RESPONSE ${res.status}`))
const cut = 'Sale 😀'.slice(0, 6)
for (let i = 0; i < Number(count); i++) {
  analytics.track({ userId: 'u', event: 'Viewed', messageId: `sur-${i}`,
    properties: { i, title: i === 3 ? cut : 'ok' } })
}
await analytics.closeAndFlush({ timeout: 20000 })
console.log('DONE ' + JSON.stringify({ errors }))
