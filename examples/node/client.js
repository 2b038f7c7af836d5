#!/usr/bin/env node
'use strict';
// A DiReDi device client in Node.js (grpc-js + protobufjs), as a second implementation of the wire
// (docs/WIRE.md). Over mTLS with a provisioned device workspace it:
//   1. asks grpc.health.v1.Health/Check for the server (SERVING),
//   2. enrols: EnrollmentService/Enroll with an Ed25519 proof over "diredi-enroll-v1" || cert,
//   3. submits a packet that another implementation sealed (the file's bytes exactly, unary),
//   4. verifies the receipt: Ed25519 under the receipt key Enroll returned, over
//      "diredi-receipt-v1\0" || body, and that the body names this packet's id and digest.
// Prints one summary line and exits 0; on any failure one line on stderr and a non-zero status
// (1: refused or failed verification, 2: bad usage or unreadable input).
//
//   node client.js --target 127.0.0.1:50051 --device DEVICE_WORKSPACE --packet FILE \
//                  [--receipt-out FILE] [--protos DIR] [--timeout-s N]

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const wire = require('./wire');

const PROG = 'diredi-node';
const MAX_FILE_BYTES = 64 * 1024 * 1024 + 65536; // a packet at the cloud's cap, plus slack
const MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024; // unary cap + framing (services/transport.py)

class UsageError extends Error {}

class Refused extends Error {
  // A gRPC status from the cloud; details are "reason: message" (services/status.py).
  constructor(call, err) {
    const code = grpc.status[err.code] || String(err.code);
    super(`${call} refused: ${code} ${err.details || ''}`.trim());
    this.code = code;
    this.reason = (err.details || '').split(': ', 1)[0];
  }
}

function parseArgs(argv) {
  const args = { protos: path.resolve(__dirname, '..', '..', 'protos'), timeoutS: 10 };
  const names = {
    '--target': 'target', '--device': 'device', '--packet': 'packet',
    '--receipt-out': 'receiptOut', '--protos': 'protos', '--timeout-s': 'timeoutS',
  };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key || i + 1 >= argv.length) throw new UsageError(`unknown or incomplete option ${argv[i]}`);
    args[key] = argv[i + 1];
  }
  for (const need of ['target', 'device', 'packet']) {
    if (!args[need]) throw new UsageError(`--${need} is required`);
  }
  args.timeoutS = Number(args.timeoutS);
  if (!(args.timeoutS > 0)) throw new UsageError('--timeout-s must be a positive number');
  return args;
}

function readFile(file, what, cap = MAX_FILE_BYTES) {
  let stat;
  try {
    stat = fs.statSync(file);
  } catch (err) {
    throw new UsageError(`cannot read ${what} ${file}: ${err.code || err.message}`);
  }
  if (!stat.isFile()) throw new UsageError(`${what} ${file} is not a file`);
  if (stat.size > cap) throw new UsageError(`${what} ${file} is ${stat.size} bytes, over ${cap}`);
  return fs.readFileSync(file);
}

// The device workspace as services/workspace.py lays it out (keys without a passphrase).
function loadDevice(dir) {
  let config;
  try {
    config = JSON.parse(readFile(path.join(dir, 'device.json'), 'device config', 1 << 20).toString('utf8'));
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError(`device config in ${dir} is not JSON: ${err.message}`);
  }
  let deviceKey;
  try {
    deviceKey = crypto.createPrivateKey(readFile(path.join(dir, 'device.key'), 'device key', 1 << 16));
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError(`device.key is not a clear PKCS#8 PEM key (passphrase-wrapped keys are not supported here): ${err.message}`);
  }
  if (deviceKey.asymmetricKeyType !== 'ed25519') throw new UsageError('device.key is not an Ed25519 key');
  const caRaw = readFile(path.join(dir, 'ca.crt'), 'CA certificate', 1 << 16);
  const caPem = caRaw.subarray(0, 10).toString() === '-----BEGIN' ? caRaw : Buffer.from(new crypto.X509Certificate(caRaw).toString());
  return {
    deviceId: String(config.device_id || ''),
    serverName: typeof config.server_name === 'string' ? config.server_name : null,
    deviceKey,
    certificateDer: readFile(path.join(dir, 'device.crt'), 'device certificate', 1 << 16),
    tlsKeyPem: readFile(path.join(dir, 'tls.key'), 'TLS key', 1 << 16),
    tlsCertPem: readFile(path.join(dir, 'tls.crt'), 'TLS certificate', 1 << 16),
    caPem,
  };
}

function loadServices(protosDir) {
  const options = { keepCase: true, longs: String, enums: String, defaults: false, oneofs: true };
  const pkg = grpc.loadPackageDefinition(protoLoader.loadSync(
    [path.join(protosDir, 'diredi', 'v1', 'services.proto'),
      path.join(__dirname, 'protos', 'grpc', 'health', 'v1', 'health.proto')],
    { ...options, includeDirs: [protosDir, path.join(__dirname, 'protos')] },
  ));
  return { Enrollment: pkg.diredi.v1.EnrollmentService, Health: pkg.grpc.health.v1.Health };
}

function call(name, fn) {
  return new Promise((resolve, reject) => {
    fn((err, value) => (err ? reject(new Refused(name, err)) : resolve(value)));
  });
}

async function run(args) {
  const device = loadDevice(args.device);
  const packetBytes = readFile(args.packet, 'packet');
  const messages = wire.loadMessages(args.protos);
  const packet = wire.parsePacket(messages, packetBytes);
  if (packet.deviceId !== device.deviceId) {
    throw new wire.WireError(`packet is device ${packet.deviceId}'s, the workspace is ${device.deviceId}'s`);
  }

  const credentials = grpc.credentials.createSsl(device.caPem, device.tlsKeyPem, device.tlsCertPem);
  const options = {
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  };
  if (device.serverName) options['grpc.ssl_target_name_override'] = device.serverName;
  const services = loadServices(args.protos);
  const health = new services.Health(args.target, credentials, options);
  const enrollment = new services.Enrollment(args.target, credentials, options);
  // KnowledgeService is called with identity (de)serialisers: the packet leaves as the exact bytes
  // that were signed, and the receipt arrives as the exact bytes the cloud signed.
  const raw = new grpc.Client(args.target, credentials, options);
  const deadline = () => new Date(Date.now() + args.timeoutS * 1000);
  const identity = (b) => Buffer.from(b);
  try {
    const h = await call('Health/Check', (cb) => health.Check({ service: '' }, { deadline: deadline() }, cb));
    if (h.status !== 'SERVING') throw new wire.WireError(`health check answered ${h.status}`);

    const proof = wire.enrollProof(device.deviceKey, device.certificateDer);
    const enrolled = await call('Enroll', (cb) => enrollment.Enroll(
      { certificate: device.certificateDer, proof }, { deadline: deadline() }, cb));
    if (enrolled.device_id !== device.deviceId) {
      throw new wire.WireError(`Enroll answered for device ${enrolled.device_id}, not ${device.deviceId}`);
    }
    const receiptKey = wire.ed25519PublicKey(Buffer.from(enrolled.receipt_public_key || []));

    const receiptBytes = await call('Submit', (cb) => raw.makeUnaryRequest(
      '/diredi.v1.KnowledgeService/Submit', identity, identity, packetBytes,
      new grpc.Metadata(), { deadline: deadline() }, cb));
    const body = wire.verifyReceipt(messages, receiptBytes, receiptKey, packet);
    if (args.receiptOut) fs.writeFileSync(args.receiptOut, receiptBytes);
    return `ok: health SERVING; enrolled ${device.deviceId}; packet ${packet.packetId.toString('hex')} ` +
      `(wire v${packet.version}, counter ${packet.counter}, ${packetBytes.length} packet bytes) stored at ` +
      `${body.storedAtMs} ms; receipt signature verified under key ` +
      `${wire.keyId(receiptKey).toString('hex').slice(0, 16)}, digest ${packet.digest.toString('hex').slice(0, 16)}`;
  } finally {
    health.close();
    enrollment.close();
    raw.close();
  }
}

function oneLine(text) {
  return String(text).split(/\s+/).filter(Boolean).join(' ');
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
    console.log(oneLine(await run(args)));
    return 0;
  } catch (err) {
    const kind = err instanceof Refused || err instanceof wire.WireError ? 1 : err instanceof UsageError ? 2 : 1;
    const text = err instanceof Refused || err instanceof wire.WireError || err instanceof UsageError
      ? err.message : `unexpected ${err && err.name}: ${err && err.message}`;
    console.error(`${PROG}: ${oneLine(text)}`);
    return kind;
  }
}

main().then((code) => { process.exitCode = code; });
