// The node-apn sender of bench/apns.py: sends the benchmark's notifications to the mock APNs
// with @parse/node-apn's Provider (token auth), `in_flight` at a time, and prints one JSON
// line: {"sent", "failed", "wall_s", "cpu_s", "rss"} measured after the warm-up.
//
// Input (JSON on stdin): address, ca_file, key_pem, key_id, team_id, topic, tokens, count,
// warmup, in_flight, body. The package comes from tests/node (NODE_PATH).
'use strict';

const fs = require('fs');
const apn = require('@parse/node-apn');

function notification(job, i) {
  const note = new apn.Notification();
  note.topic = job.topic;
  note.pushType = 'alert';
  note.alert = { title: `Order #${i} shipped`, body: job.body };
  return note;
}

async function sendRange(provider, job, start, stop) {
  const pending = [];
  for (let i = start; i < stop; i++) {
    pending.push(provider.send(notification(job, i), job.tokens[i % job.tokens.length]));
  }
  const outcomes = await Promise.all(pending);
  let sent = 0;
  for (const outcome of outcomes) sent += outcome.sent.length;
  return sent;
}

async function main() {
  const job = JSON.parse(fs.readFileSync(0, 'utf8'));
  const colon = job.address.lastIndexOf(':');
  const provider = new apn.Provider({
    token: { key: job.key_pem, keyId: job.key_id, teamId: job.team_id },
    address: job.address.slice(0, colon),
    port: Number(job.address.slice(colon + 1)),
    ca: [fs.readFileSync(job.ca_file)],
    production: false,
    requestTimeout: 30000,
  });
  try {
    for (let i = 0; i < job.warmup; i += job.in_flight) {
      await sendRange(provider, job, i, Math.min(i + job.in_flight, job.warmup));
    }
    const rss = [];
    const step = Math.max(1, Math.floor(job.count / 10));
    let sent = 0;
    let done = 0;
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    const end = job.warmup + job.count;
    for (let i = job.warmup; i < end; i += job.in_flight) {
      const stop = Math.min(i + job.in_flight, end);
      const before = Math.floor(done / step);
      sent += await sendRange(provider, job, i, stop);
      done += stop - i;
      if (Math.floor(done / step) > before) rss.push(process.memoryUsage().rss);
    }
    const wall = Number(process.hrtime.bigint() - t0) / 1e9;
    const cpu = process.cpuUsage(cpu0);
    process.stdout.write(JSON.stringify({
      sent, failed: job.count - sent, wall_s: wall, cpu_s: (cpu.user + cpu.system) / 1e6, rss,
    }) + '\n');
  } finally {
    await provider.shutdown();
  }
}

main().catch(err => {
  process.stderr.write(`apns_node.js failed: ${err && err.stack ? err.stack : JSON.stringify(err)}\n`);
  process.exit(1);
});
