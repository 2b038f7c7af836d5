#!/usr/bin/env node
'use strict';
// Print the packet digest (docs/WIRE.md, "Packet digest") of each SignedPacket file named, as
// "<hex digest> <wire version> <file>", computed by wire.js alone: no server, no key. The test
// compares it with diredi_secure.packet.packet_digest over the known-answer vectors.
//   node digest.js FILE... [--protos DIR]

const fs = require('node:fs');
const path = require('node:path');
const wire = require('./wire');

function main(argv) {
  let protos = path.resolve(__dirname, '..', '..', 'protos');
  const files = [];
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--protos' && i + 1 < argv.length) protos = argv[++i];
    else files.push(argv[i]);
  }
  if (!files.length) throw new wire.WireError('usage: node digest.js FILE... [--protos DIR]');
  const messages = wire.loadMessages(protos);
  for (const file of files) {
    const packet = wire.parsePacket(messages, fs.readFileSync(file));
    console.log(`${packet.digest.toString('hex')} ${packet.version} ${file}`);
  }
}

try {
  main(process.argv.slice(2));
} catch (err) {
  console.error(`diredi-node: ${String(err.message).split(/\s+/).join(' ')}`);
  process.exitCode = err instanceof wire.WireError ? 1 : 2;
}
