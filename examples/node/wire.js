'use strict';
// The byte-level rules of the DiReDi wire (docs/WIRE.md), in Node: packet parsing, the signed
// transcript of wire v1 and v2, the packet digest, the enrolment proof and receipt verification.
// No I/O here: bytes in, objects out, or a WireError naming what failed.

const crypto = require('node:crypto');
const path = require('node:path');
const protobuf = require('protobufjs');

// Domain tags, exactly as diredi_secure/packet.py and services/cloud.py define them.
const PACKET_TAG = { 1: Buffer.from('diredi-packet-v1\0'), 2: Buffer.from('diredi-packet-v2\0') };
const DIGEST_TAG = {
  1: Buffer.from('diredi-packet-digest-v1\0'),
  2: Buffer.from('diredi-packet-digest-v2\0'),
};
const RECEIPT_TAG = Buffer.from('diredi-receipt-v1\0');
const ENROLL_TAG = Buffer.from('diredi-enroll-v1'); // no NUL: ENROLL_DOMAIN in services/cloud.py
const FORMAT_VERSION = 1; // PacketHeader and ReceiptBody

// Caps on what this client parses (the cloud's defaults, diredi_secure/policy.py Limits).
const MAX_PACKET_BYTES = 64 * 1024 * 1024;
const MAX_HEADER_BYTES = 16 * 1024;
const MAX_RECEIPT_BYTES = 8192;
const MAX_RECEIPT_BODY_BYTES = 4096;

class WireError extends Error {}

function u32be(n) {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

function u64be(n) {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
}

function sha256(...parts) {
  const h = crypto.createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
}

function loadMessages(protosDir) {
  const root = protobuf.loadSync(path.join(protosDir, 'diredi', 'v1', 'packet.proto'));
  const get = (name) => root.lookupType(`diredi.v1.${name}`);
  return {
    SignedPacket: get('SignedPacket'),
    PacketHeader: get('PacketHeader'),
    Receipt: get('Receipt'),
    ReceiptBody: get('ReceiptBody'),
  };
}

function decode(type, bytes, what, cap) {
  if (bytes.length > cap) throw new WireError(`${what} is ${bytes.length} bytes, over the cap of ${cap}`);
  if (bytes.length === 0) throw new WireError(`${what} is empty`);
  try {
    return type.decode(bytes);
  } catch (err) {
    throw new WireError(`${what} does not decode as ${type.name}: ${err.message}`);
  }
}

const buf = (v) => (v && v.length !== undefined ? Buffer.from(v) : Buffer.alloc(0));
const str64 = (v) => (v === undefined || v === null ? '0' : v.toString()); // Long, number or undefined

// The signed transcript (packet.py signed_transcript): tag, u32 len(header), header, u32 len(enc),
// enc, u64 len(ciphertext), then the ciphertext (v1) or its SHA-256 (v2). Big-endian lengths.
function signedTranscript(version, header, enc, ciphertext) {
  const tag = PACKET_TAG[version];
  if (!tag) throw new WireError(`wire version ${version} has no signed transcript`);
  const tail = version === 1 ? ciphertext : sha256(ciphertext);
  return Buffer.concat([
    tag, u32be(header.length), header, u32be(enc.length), enc, u64be(ciphertext.length), tail,
  ]);
}

// What the receipt acknowledges (packet.py packet_digest): SHA-256 of the digest tag, u32
// len(signature), the signature and the transcript; the attached certificate is not covered.
function packetDigest(version, signature, transcript) {
  return sha256(DIGEST_TAG[version], u32be(signature.length), signature, transcript);
}

// Parse a SignedPacket as a device holds it: envelope, header, transcript and digest.
function parsePacket(messages, bytes) {
  const env = decode(messages.SignedPacket, bytes, 'signed packet', MAX_PACKET_BYTES);
  const version = env.envelopeVersion || 0;
  const header = buf(env.header);
  const enc = buf(env.enc);
  const ciphertext = buf(env.ciphertext);
  const signature = buf(env.signature);
  if (!PACKET_TAG[version]) throw new WireError(`envelope version ${version} (this client speaks 1, 2)`);
  if (!header.length || !enc.length || !signature.length) {
    throw new WireError('signed packet lacks a header, an enc or a signature');
  }
  const h = decode(messages.PacketHeader, header, 'packet header', MAX_HEADER_BYTES);
  if ((h.formatVersion || 0) !== FORMAT_VERSION) {
    throw new WireError(`packet format version ${h.formatVersion || 0} (this client speaks ${FORMAT_VERSION})`);
  }
  const transcript = signedTranscript(version, header, enc, ciphertext);
  return {
    version,
    packetId: buf(h.packetId),
    deviceId: h.deviceId || '',
    counter: str64(h.counter),
    headerBytes: header,
    transcript,
    signature,
    digest: packetDigest(version, signature, transcript),
  };
}

// A raw 32-byte Ed25519 public key (EnrollResponse.receipt_public_key) as a Node KeyObject.
function ed25519PublicKey(raw) {
  if (raw.length !== 32) throw new WireError(`receipt public key is ${raw.length} bytes, not 32`);
  return crypto.createPublicKey({
    key: { kty: 'OKP', crv: 'Ed25519', x: raw.toString('base64url') },
    format: 'jwk',
  });
}

// Key ids are the SHA-256 of the DER SubjectPublicKeyInfo (DESIGN.md section 3).
function keyId(publicKey) {
  return sha256(publicKey.export({ type: 'spki', format: 'der' }));
}

function enrollProof(deviceKey, certificateDer) {
  return crypto.sign(null, Buffer.concat([ENROLL_TAG, certificateDer]), deviceKey);
}

// Device side of packet.py verify_receipt: the cloud's signature over tag || body, then the body
// names this very packet (id, digest, device, counter) and the key that signed it.
function verifyReceipt(messages, receiptBytes, receiptKey, packet) {
  const receipt = decode(messages.Receipt, receiptBytes, 'receipt', MAX_RECEIPT_BYTES);
  const body = buf(receipt.body);
  const signature = buf(receipt.signature);
  if (!crypto.verify(null, Buffer.concat([RECEIPT_TAG, body]), receiptKey, signature)) {
    throw new WireError('receipt signature does not verify under the receipt key from Enroll');
  }
  const b = decode(messages.ReceiptBody, body, 'receipt body', MAX_RECEIPT_BODY_BYTES);
  const checks = [
    [(b.formatVersion || 0) === FORMAT_VERSION, `receipt format version ${b.formatVersion || 0}`],
    [buf(b.receiptKeyId).equals(keyId(receiptKey)), 'receipt names another receipt key'],
    [buf(b.packetId).equals(packet.packetId), 'receipt names another packet id'],
    [buf(b.packetSha256).equals(packet.digest), 'receipt acknowledges other packet bytes (digest differs)'],
    [(b.deviceId || '') === packet.deviceId, `receipt names device ${b.deviceId}`],
    [str64(b.counter) === packet.counter, `receipt names counter ${str64(b.counter)}`],
  ];
  for (const [ok, message] of checks) if (!ok) throw new WireError(message);
  return { storedAtMs: str64(b.storedAtMs), packetSha256: buf(b.packetSha256) };
}

module.exports = {
  WireError,
  enrollProof,
  ed25519PublicKey,
  keyId,
  loadMessages,
  packetDigest,
  parsePacket,
  signedTranscript,
  verifyReceipt,
};
