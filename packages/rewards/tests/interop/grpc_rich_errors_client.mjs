// A non-Python gRPC client of dancegrpo.rewards.v1.RewardService with no dependencies
// beyond Node.js (>= 18): gRPC over HTTP/2 (node:http2) and a hand-written protobuf wire
// reader/writer. It reads what any language reads from a failed call: grpc-status,
// grpc-message and the google.rpc.Status in the grpc-status-details-bin trailer
// (base64), decoded with the field numbers of googleapis google/rpc/status.proto and
// error_details.proto only.
//
//   node grpc_rich_errors_client.mjs HOST:PORT   ->  one JSON object on stdout
import http2 from "node:http2";

const SCORE = "/dancegrpo.rewards.v1.RewardService/Score";

// ---------------------------------------------------------------- protobuf wire format
function varint(value) {
  const out = [];
  let v = BigInt(value);
  do {
    let byte = Number(v & 0x7fn);
    v >>= 7n;
    if (v > 0n) byte |= 0x80;
    out.push(byte);
  } while (v > 0n);
  return Buffer.from(out);
}
const key = (field, wire) => varint((field << 3) | wire);
const bytesField = (field, data) => Buffer.concat([key(field, 2), varint(data.length), data]);
const stringField = (field, text) => bytesField(field, Buffer.from(text, "utf8"));

function readFields(buf) {
  // One message level: {fieldNumber: [values]} (varints as BigInt, LEN as Buffer).
  const fields = {};
  let i = 0;
  const readVarint = () => {
    let result = 0n;
    let shift = 0n;
    for (;;) {
      if (i >= buf.length) throw new Error("truncated varint");
      const byte = buf[i++];
      result |= BigInt(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return result;
      shift += 7n;
    }
  };
  while (i < buf.length) {
    const k = readVarint();
    const field = Number(k >> 3n);
    const wire = Number(k & 7n);
    let value;
    if (wire === 0) value = readVarint();
    else if (wire === 2) {
      const n = Number(readVarint());
      value = buf.subarray(i, i + n);
      i += n;
    } else if (wire === 5) {
      value = buf.subarray(i, i + 4);
      i += 4;
    } else if (wire === 1) {
      value = buf.subarray(i, i + 8);
      i += 8;
    } else throw new Error(`unsupported wire type ${wire}`);
    (fields[field] ??= []).push(value);
  }
  return fields;
}
const str = (fields, n) => (fields[n] ? fields[n][0].toString("utf8") : "");
const num = (fields, n) => (fields[n] ? Number(fields[n][0]) : 0);

// google/rpc/status.proto: Status{code=1, message=2, details=3 (google.protobuf.Any{type_url=1, value=2})}
// google/rpc/error_details.proto: BadRequest{field_violations=1 (FieldViolation{field=1, description=2})},
// RetryInfo{retry_delay=1 (Duration{seconds=1, nanos=2})}, ResourceInfo{resource_type=1, resource_name=2}
function decodeStatus(buf) {
  const status = readFields(buf);
  const details = (status[3] ?? []).map((any) => {
    const a = readFields(any);
    const typeUrl = str(a, 1);
    const value = a[2] ? readFields(a[2][0]) : {};
    const detail = { type_url: typeUrl };
    if (typeUrl.endsWith("/google.rpc.BadRequest")) {
      detail.field_violations = (value[1] ?? []).map((v) => {
        const fv = readFields(v);
        return { field: str(fv, 1), description: str(fv, 2) };
      });
    } else if (typeUrl.endsWith("/google.rpc.RetryInfo")) {
      const d = value[1] ? readFields(value[1][0]) : {};
      detail.retry_delay_s = num(d, 1) + num(d, 2) / 1e9;
    } else if (typeUrl.endsWith("/google.rpc.ResourceInfo")) {
      detail.resource_type = str(value, 1);
      detail.resource_name = str(value, 2);
    }
    return detail;
  });
  return { code: num(status, 1), message: str(status, 2), details };
}

// ---------------------------------------------------------------- gRPC over HTTP/2
function call(session, path, message) {
  return new Promise((resolve, reject) => {
    const req = session.request({
      ":method": "POST",
      ":path": path,
      "content-type": "application/grpc",
      te: "trailers",
      "grpc-timeout": "20S",
    });
    const prefix = Buffer.alloc(5);
    prefix.writeUInt32BE(message.length, 1);
    const chunks = [];
    let meta = {};
    req.on("response", (headers) => (meta = { ...meta, ...headers }));
    req.on("trailers", (trailers) => (meta = { ...meta, ...trailers }));
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("error", reject);
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      const result = { grpc_status: Number(meta["grpc-status"]) };
      if (meta["grpc-message"] !== undefined) {
        result.grpc_message = decodeURIComponent(meta["grpc-message"]);
      }
      if (meta["grpc-status-details-bin"] !== undefined) {
        result.status = decodeStatus(Buffer.from(meta["grpc-status-details-bin"], "base64"));
      }
      if (body.length >= 5) result.response = body.subarray(5, 5 + body.readUInt32BE(1));
      resolve(result);
    });
    req.end(Buffer.concat([prefix, message]));
  });
}

function scoreRequest(reward, data, shape, prompt) {
  const packedShape = Buffer.concat(shape.map((d) => varint(d)));
  const raw = Buffer.concat([bytesField(1, data), bytesField(2, packedShape)]);
  const media = bytesField(1, raw); // Media.raw = 1
  const sample = Buffer.concat([stringField(1, prompt), bytesField(2, media)]);
  return Buffer.concat([stringField(1, reward), bytesField(2, sample)]);
}

function scores(response) {
  // ScoreResponse{outputs=1 (OutputColumn{name=1, values=2 packed float})}
  return (readFields(response)[1] ?? []).map((col) => {
    const c = readFields(col);
    const packed = c[2] ? c[2][0] : Buffer.alloc(0);
    const values = [];
    for (let j = 0; j + 4 <= packed.length; j += 4) values.push(packed.readFloatLE(j));
    return { name: str(c, 1), values };
  });
}

const target = process.argv[2];
const session = http2.connect(`http://${target}`);
session.on("error", (err) => {
  console.error(err);
  process.exit(2);
});
const timer = setTimeout(() => {
  console.error("timed out");
  process.exit(3);
}, 30000);
try {
  const ok = await call(session, SCORE, scoreRequest("color", Buffer.alloc(12), [2, 2, 3], "a red square"));
  const short = await call(session, SCORE, scoreRequest("color", Buffer.alloc(10), [2, 2, 3], "red"));
  const unknown = await call(session, SCORE, scoreRequest("nope", Buffer.alloc(12), [2, 2, 3], "red"));
  const garbage = await call(session, SCORE, Buffer.from([0x0f, 0x01]));
  const out = {
    ok: { grpc_status: ok.grpc_status, outputs: ok.response ? scores(ok.response) : null },
    short,
    unknown,
    garbage,
  };
  process.stdout.write(JSON.stringify(out));
} finally {
  clearTimeout(timer);
  session.close();
}
