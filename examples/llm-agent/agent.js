// Aeterna's demo: an "LLM agent" that keeps chat sessions in memory (history
// and a context vector per session), served over HTTP on the socket Aeterna
// owns. Its memory survives `aeterna reload` through the State Relay: the old
// generation dumps the sessions, the new one loads them. It survives a crash
// too (kill -9, OOM): after each change it stores a checkpoint in Aeterna, and
// the generation Aeterna restarts loads it.
//
//   curl -s -X POST localhost:8080/sessions                       -> {"id":"..."}
//   curl -s -X POST localhost:8080/sessions/<id>/messages -d 'hi' -> the reply
//   curl -s localhost:8080/sessions/<id>                          -> history, pid, generation
//   curl -N localhost:8080/sessions/<id>/stream?tokens=100         -> an answer streamed token by token (SSE)
//
// A reload in the middle of a stream does not cut it: at promotion the old generation hands each stream's
// connection to the new one between two tokens (connection handoff), and the new one goes on from the next
// token on the same connection; `generation` changes mid-stream, no token is missing or repeated.
//
// Outside Aeterna it runs too (binding 127.0.0.1:$PORT itself, 8080 by default, starting empty; SIGINT, as
// pm2 sends, stops it like SIGTERM).
'use strict';
const crypto = require('node:crypto');
const http = require('node:http');
// In an app of your own: require('aeterna/client').
const aeterna = require('../../dist/src/client/index.js');

const generation = process.env.AETERNA_GENERATION ?? 'dev';
/** id -> { created, history: [{ role, text, at }], context: number[] } */
let sessions = {};
let relay = null;
/** The streams being answered: stream id -> { stream, session, words, next, total, timer }. */
const streams = new Map();
/** Between two tokens of a stream. */
const TOKEN_MS = 100;
/** The most tokens one stream may ask for. */
const MAX_TOKENS = 100000;

/** The checkpoint under way, and the next one, which every change made meanwhile shares (one write for a burst). */
let storing = Promise.resolve();
let next = null;
/**
 * Store the sessions as Aeterna's checkpoint; resolves once a checkpoint holding every change made so far is
 * stored (so a reply is sent only once its message would survive a crash). Outside Aeterna: a no-op.
 */
function checkpoint() {
  next ??= storing.then(() => {
    next = null;
    storing = relay.checkpoint({ data: JSON.stringify(sessions), encoding: 'json' }).then(
      () => undefined,
      (err) => console.error(`agent ${process.pid}: checkpoint not stored (${err.code}): ${err.message}`),
    );
    return storing;
  });
  return next;
}

function think(session, text) {
  // A stand-in for a model: fold the message into the session's context vector and answer from memory.
  const digest = crypto.createHash('sha256').update(text).digest();
  session.context = session.context.map((v, i) => Math.round((0.9 * v + digest[i] / 255) * 1000) / 1000);
  const turns = session.history.filter((m) => m.role === 'user').length;
  return `I remember ${turns} message${turns === 1 ? '' : 's'} from you; the last was "${text}". (generation ${generation}, pid ${process.pid})`;
}

/** The words an answer streams, taken from the session's history (what the "model" remembers). */
function wordsOf(session) {
  const words = session.history.flatMap((m) => m.text.split(/\s+/)).filter(Boolean).slice(-200);
  return words.length > 0 ? words : ['hello', 'from', 'your', 'agent'];
}

/** Send the stream's next token, then schedule the one after (or end it). */
function tick(s) {
  s.timer = null;
  if (s.next >= s.total || !s.stream.open) {
    s.stream.end();
    streams.delete(s.id);
    return;
  }
  const token = s.words[s.next % s.words.length];
  s.stream.send(JSON.stringify({ i: s.next, token, generation }));
  s.next++;
  s.timer = setTimeout(tick, TOKEN_MS, s);
}

/** Answer (or, adopted from the previous generation, go on answering) a stream from its token `next`. */
function runStream(id, stream, words, next, total) {
  const s = { id, stream, words, next, total, timer: null };
  streams.set(id, s);
  tick(s);
}

/** At promotion: hand every stream to the next generation between two tokens. Returns how many went. */
async function handOverStreams(handoff) {
  for (const s of streams.values()) {
    if (s.timer === null) continue; // ending
    clearTimeout(s.timer);
    s.timer = null;
    try {
      await s.stream.handOver(handoff, s.id, { words: s.words, next: s.next, total: s.total });
      streams.delete(s.id);
    } catch (err) {
      console.error(`agent ${process.pid}: stream ${s.id} not handed over (${err.message}); finishing it here`);
      s.timer = setTimeout(tick, TOKEN_MS, s);
    }
  }
  return handoff.end();
}

function reply(res, code, body) {
  const text = JSON.stringify(body, null, 2) + '\n';
  res.writeHead(code, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://agent');
  const m = /^\/sessions(?:\/([\w-]+))?(\/messages|\/stream)?$/.exec(url.pathname);
  if (req.method === 'POST' && url.pathname === '/sessions') {
    const id = crypto.randomUUID().slice(0, 8);
    sessions[id] = { created: new Date().toISOString(), history: [], context: new Array(8).fill(0) };
    return void checkpoint().then(() => reply(res, 201, { id, pid: process.pid, generation }));
  }
  if (m && m[1] && !sessions[m[1]]) return reply(res, 404, { error: `no session ${m[1]}` });
  if (req.method === 'GET' && m && m[2] === '/stream') {
    const total = Number(url.searchParams.get('tokens') ?? 20);
    if (!Number.isSafeInteger(total) || total < 0 || total > MAX_TOKENS)
      return reply(res, 400, { error: `tokens must be a whole number from 0 to ${MAX_TOKENS}` });
    const id = `${m[1]}-${crypto.randomUUID().slice(0, 8)}`;
    return runStream(id, aeterna.SseStream.start(res), wordsOf(sessions[m[1]]), 0, total);
  }
  if (req.method === 'POST' && m && m[2] === '/messages') {
    let text = '';
    req.setEncoding('utf8');
    req.on('data', (d) => (text += d));
    req.on('end', () => {
      const session = sessions[m[1]];
      session.history.push({ role: 'user', text, at: new Date().toISOString() });
      const answer = think(session, text);
      session.history.push({ role: 'agent', text: answer, at: new Date().toISOString() });
      void checkpoint().then(() => reply(res, 200, { reply: answer, pid: process.pid, generation }));
    });
    return;
  }
  if (req.method === 'GET' && m && m[1]) return reply(res, 200, { id: m[1], pid: process.pid, generation, ...sessions[m[1]] });
  if (req.method === 'GET' && url.pathname === '/') {
    return reply(res, 200, { agent: 'aeterna demo', pid: process.pid, generation, sessions: Object.keys(sessions).length });
  }
  reply(res, 404, { error: 'not found' });
});
// Keep idle keep-alive connections longer than the idle timeout of a load balancer in front (often 60 s), so the
// balancer never sends a request on a connection the agent is closing; a reload's drain closes them all the same.
server.keepAliveTimeout = 65_000;
aeterna.trackConnections(server);

async function main() {
  relay = await aeterna.connect(); // a no-op outside Aeterna
  let from = '';
  const previous = await relay.load((state) => {
    // "relay": the previous generation handed them over; "checkpoint": it died, they come from its last checkpoint.
    from = state.source === 'checkpoint' ? ` from checkpoint ${state.seq}` : ' from the previous generation';
    return state.json();
  });
  if (previous) sessions = previous;
  console.log(`agent ${process.pid} (generation ${generation}) starts with ${Object.keys(sessions).length} session(s)${previous ? from : ''}`);
  relay.onDump(({ final }) => {
    console.log(`agent ${process.pid}: handing over ${Object.keys(sessions).length} session(s)${final ? ' (final sync)' : ''}`);
    return { data: JSON.stringify(sessions), encoding: 'json' };
  });
  // The final sync: what the old generation learnt after its first dump.
  relay.onLoad((state) => Object.assign(sessions, state.json()));
  // The streams the previous generation was answering: go on from the token it stopped at.
  relay.onConnection((c) => {
    const resumed = aeterna.resumeSse(c, { server });
    if (!resumed) return void c.socket.destroy();
    const { words, next, total } = resumed.meta;
    runStream(c.id, resumed.stream, words, next, total);
  });

  const fd = aeterna.listeners().get('http');
  const ready = () => relay.ready();
  if (fd !== undefined) server.listen({ fd }, ready);
  else server.listen(Number(process.env.PORT ?? 8080), '127.0.0.1', ready);

  const stop = async () => {
    // Promoted away: the streams go on in the next generation, on their connections (null: nobody to take them).
    const handoff = await relay.handoff();
    if (handoff) console.log(`agent ${process.pid}: handed ${await handOverStreams(handoff)} stream(s) over`);
    await aeterna.drain(server); // finish in-flight requests (and streams not handed over), close keep-alive connections
    await relay.shutdown(); // answer the final dump, if Aeterna asks for one
    process.exit(0);
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
