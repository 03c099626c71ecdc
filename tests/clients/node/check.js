// node-postgres checks run through `pam db access` by
// tests/integration/test_clients_node.py.
//
// Usage: node check.js CHECK
// The connection comes from the standard libpq environment variables node-postgres
// reads (PGHOST, PGPORT, PGUSER, PGDATABASE); no password, no TLS on the local leg.
//
// Prints exactly one JSON object on one line on stdout; the test asserts its
// values. An unexpected error is printed to stderr and exits 1.
'use strict';

const { Client, Pool } = require('pg');
const QueryStream = require('pg-query-stream');

const POOL_SIZE = 10;
const POOL_QUERIES = 50;
const STREAM_ROWS = 100000;

function config() {
  for (const name of ['PGHOST', 'PGPORT', 'PGUSER', 'PGDATABASE']) {
    if (!process.env[name]) {
      throw new Error(`set ${name}`);
    }
  }
  return {
    host: process.env.PGHOST,
    port: Number(process.env.PGPORT),
    user: process.env.PGUSER,
    database: process.env.PGDATABASE,
    ssl: false,
    application_name: `pam-node-${process.argv[2]}`,
  };
}

async function withClient(fn) {
  const client = new Client(config());
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

// Parameterised queries (extended protocol): three typed parameters, one with
// twelve so that $10..$12 must not be read as $1 followed by a digit, a named
// prepared statement run twice, and an error that keeps its SQLSTATE.
async function params() {
  return withClient(async (client) => {
    const three = await client.query(
      'select $1::int + $2::int as sum, $3::text as label, octet_length($3::text) as bytes',
      [40, 2, 'Grüße 世界 🐘'],
    );
    const values = Array.from({ length: 12 }, (_, i) => `v${i + 1}`);
    const placeholders = values.map((_, i) => `$${i + 1}::text`).join(', ');
    const twelve = await client.query({
      text: `select array[${placeholders}] as all, $10::text || '|' || $11 || '|' || $12 || '|' || $1 as tail`,
      values,
    });
    const named = [];
    for (const n of [7, 8]) {
      const result = await client.query({
        name: 'pam_node_square',
        text: 'select $1::int * $1::int as square',
        values: [n],
      });
      named.push(result.rows[0].square);
    }
    const prepared = await client.query(
      "select count(*)::int as n from pg_prepared_statements where name = 'pam_node_square'",
    );
    let error = null;
    try {
      await client.query('select $1::int / 0', [1]);
    } catch (err) {
      error = { code: err.code, message: err.message };
    }
    const after = await client.query('select $1::text as still', ['here']);
    return {
      sum: three.rows[0].sum,
      label: three.rows[0].label,
      bytes: three.rows[0].bytes,
      all: twelve.rows[0].all,
      tail: twelve.rows[0].tail,
      named,
      named_statements: prepared.rows[0].n,
      error,
      after: after.rows[0].still,
    };
  });
}

// A pool of 10 serving 50 concurrent queries, each returning its own argument.
// All 50 are submitted before any connects, so the pool opens exactly 10
// connections and queues the other 40 on them.
async function pool() {
  const p = new Pool({ ...config(), max: POOL_SIZE });
  try {
    const results = await Promise.all(
      Array.from({ length: POOL_QUERIES }, (_, i) =>
        p.query('select $1::int as n, pg_backend_pid() as pid', [i]),
      ),
    );
    const opened = p.totalCount;
    return {
      returned: results.map((r) => r.rows[0].n),
      distinct_backends: new Set(results.map((r) => r.rows[0].pid)).size,
      opened,
    };
  } finally {
    await p.end();
  }
}

// 100,000 rows through pg-query-stream: a cursor (portal) read in batches with
// Execute(max_rows) and PortalSuspended, consumed as a Node stream.
async function stream() {
  return withClient(async (client) => {
    await client.query('begin');
    const query = new QueryStream(
      "select g, 'row ' || g as label from generate_series(1, $1::int) as g",
      [STREAM_ROWS],
      { batchSize: 1000 },
    );
    let count = 0;
    let sum = 0;
    let inOrder = true;
    let first = null;
    let last = null;
    for await (const row of client.query(query)) {
      count += 1;
      sum += row.g;
      inOrder = inOrder && row.g === count;
      if (first === null) {
        first = row.label;
      }
      last = row.label;
    }
    await client.query('commit');
    const after = await client.query('select count(*)::int as n from generate_series(1, 10)');
    return { count, sum, in_order: inOrder, first, last, after: after.rows[0].n };
  });
}

// node-postgres's own test quick-disconnect: connect, then end at once. The
// client sends Terminate before its startup packet; PostgreSQL closes without a
// reply (the length cannot be a startup packet), so the client sees no error.
async function quickDisconnect() {
  const client = new Client(config());
  let error = null;
  const record = (err) => {
    error = error || { code: err.code || null, message: err.message };
  };
  client.on('error', record);
  const connecting = client.connect().catch(record);
  await client.end();
  // An ErrorResponse would have been read before the close that ended the client;
  // one more turn of the event loop lets its rejection settle.
  await new Promise((resolve) => setImmediate(resolve));
  void connecting;
  return { error };
}

const CHECKS = { params, pool, stream, quick_disconnect: quickDisconnect };

async function main() {
  const name = process.argv[2];
  const check = CHECKS[name];
  if (!check) {
    console.error(`usage: node check.js {${Object.keys(CHECKS).join(',')}}`);
    process.exit(2);
  }
  const out = await check();
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
