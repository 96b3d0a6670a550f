// A Node app using the real @segment/analytics-node, pointed at Outpost.
// Usage: node segment_send.mjs <host> <writeKey> <count> [maxRetries, default 3]
// Sends <count> track calls plus one identify/page/screen/group/alias, flushes, and prints
// "REQUEST <retry-count> <events>" per HTTP request, "RESPONSE <status>", "ERROR <reason>",
// and finally "DONE <json summary>".
import { Analytics } from '@segment/analytics-node'

const [host, writeKey, count, maxRetries = '3'] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host, flushAt: 20, flushInterval: 200,
  maxRetries: Number(maxRetries) })
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

const userId = 'node-user'
for (let i = 0; i < Number(count); i++) {
  analytics.track({ userId, event: 'Node Event', properties: { i }, messageId: `node-${i}` })
}
analytics.identify({ userId, traits: { plan: 'pro' }, messageId: 'node-identify' })
analytics.page({ userId, name: 'Home', messageId: 'node-page' })
analytics.screen({ userId, name: 'Settings', messageId: 'node-screen' })
analytics.group({ userId, groupId: 'g1', traits: { size: 3 }, messageId: 'node-group' })
analytics.alias({ userId, previousId: 'anon-1', messageId: 'node-alias' })
await analytics.closeAndFlush({ timeout: 20000 })
console.log('DONE ' + JSON.stringify({ errors }))
