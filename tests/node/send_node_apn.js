// Node side of tests/test_apns_conformance.py: sends notifications through the mock APNs server
// with @parse/node-apn (token auth) and prints what the library reported, as JSON on stdout.
//
// Input (JSON on stdin):
//   {"host": "127.0.0.1", "port": 1234, "ca_file": ".../ca.pem",
//    "key_pem": "-----BEGIN PRIVATE KEY-----...", "key_id": "...", "team_id": "...", "topic": "...",
//    "notifications": [{"token": "<hex>", "alert": "text", "id": "<uuid>", "push_type": "alert",
//                       "payload": {...custom keys...}}]}
// Output: [{"token", "sent": bool, "status", "reason", "timestamp", "apns_id", "unique_id", "error"}]
'use strict';

const fs = require('fs');
const apn = require('@parse/node-apn');

async function main() {
  const job = JSON.parse(fs.readFileSync(0, 'utf8'));
  const provider = new apn.Provider({
    token: { key: job.key_pem, keyId: job.key_id, teamId: job.team_id },
    address: job.host,
    port: job.port,
    ca: [fs.readFileSync(job.ca_file)],
    requestTimeout: 10000,
    connectionRetryLimit: 1,
  });
  const results = [];
  try {
    for (const spec of job.notifications) {
      const note = new apn.Notification();
      note.topic = job.topic;
      note.pushType = spec.push_type || 'alert';
      if (spec.id) note.id = spec.id;
      if (spec.alert !== undefined) note.alert = spec.alert;
      if (spec.payload) note.payload = spec.payload;
      const outcome = await provider.send(note, spec.token);
      const entry = { token: spec.token, length: note.length() };
      if (outcome.sent.length === 1) {
        const sent = outcome.sent[0];
        Object.assign(entry, { sent: true, apns_id: sent['apns-id'], unique_id: sent['apns-unique-id'] });
      } else {
        const failed = outcome.failed[0] || {};
        const response = failed.response || {};
        Object.assign(entry, {
          sent: false,
          status: failed.status === undefined ? null : Number(failed.status),
          reason: response.reason === undefined ? null : response.reason,
          timestamp: response.timestamp === undefined ? null : response.timestamp,
          apns_id: failed['apns-id'],
          error: failed.error ? String(failed.error.message || failed.error) : null,
        });
      }
      results.push(entry);
    }
  } finally {
    await provider.shutdown();
  }
  process.stdout.write(JSON.stringify(results) + '\n');
}

main().catch(err => {
  process.stderr.write(`send_node_apn failed: ${err && err.stack ? err.stack : JSON.stringify(err)}\n`);
  process.exit(1);
});
