// Which op a relay connection may send when: the single source of truth for
// what Aeterna accepts from an app on the state socket (docs/srp.md, "Which op
// when"). Every (row, op) pair is written down, either as the handler that takes
// it or as `null` (answered with `unexpected_op`). The `Table` type requires
// every pair, so adding a phase or an op without deciding each of its pairs
// does not compile. docs/srp.md's table is generated from this one (and a test
// checks it has not drifted), as docs/fsm.md is from the orchestrator's.
import type { Op } from './messages';

const PHASE_MEANINGS = {
  hello: 'connected; its hello is due',
  waiting: "a reload's new generation: welcomed, waiting for the old state to arrive",
  'load-sent': 'Aeterna sent it a load; its ack is due',
  idle: 'nothing in flight',
  'dump-requested': 'Aeterna asked it for a dump; its `state` (or refusal) is due',
  streaming: "the state's data frames are coming in",
  trailer: "the state's data has arrived; its digest trailer is due",
  direct: "the state's bytes go on the direct socket pair; its digest trailer is due here",
} as const;
/** Where a connection is in the relay of a state. */
export type Phase = keyof typeof PHASE_MEANINGS;

/**
 * The table's rows: the phases, and `checkpoint` for a connection whose streamed checkpoint is arriving (its data
 * frames, then its trailer if it announced one), whatever its phase: until then nothing else may come from it.
 */
export const ROW_MEANINGS = {
  ...PHASE_MEANINGS,
  checkpoint:
    'its streamed checkpoint is arriving (its data frames, then its trailer if announced), whatever its phase',
} as const;
export type Row = keyof typeof ROW_MEANINGS;
export const ROWS = Object.keys(ROW_MEANINGS) as Row[];

export const HANDLERS = {
  hello: 'the handshake: welcome, then the initial load (or wait for the old state)',
  peerError: 'the app reported an error: its connection is closed',
  checkpoint: 'a checkpoint to store (not while Aeterna streams a checkpoint load to this connection)',
  checkpointTrailer: "the streamed checkpoint's sha256",
  ready: 'readiness (only after the initial load was acknowledged)',
  loadAck: 'the answer to the load Aeterna sent',
  dumpDeclined: 'the app declines to dump (only `ok: false`)',
  state: 'the answer to the dump: its header, then its bytes',
  trailer: "the relayed state's digest, passed on to the receiver",
} as const;
/** What Aeterna does with an op it accepts. Some handlers check one more condition (HANDLERS says which). */
export type Handler = keyof typeof HANDLERS;

type Table = { readonly [R in Row]: { readonly [O in Op]: Handler | null } };

const UNEXPECTED: { readonly [O in Op]: null } = {
  hello: null,
  welcome: null,
  load: null,
  state: null,
  ack: null,
  ready: null,
  dump: null,
  handoff: null,
  trailer: null,
  checkpoint: null,
  checkpointed: null,
  error: null,
};
/** Every op (the type above lists them all), in the order of docs/srp.md's table. */
export const OPS = Object.keys(UNEXPECTED) as Op[];

/** What any welcomed connection may send, whatever its relay is doing (unless the framing says otherwise). */
const WELCOMED = { ...UNEXPECTED, error: 'peerError', checkpoint: 'checkpoint', ready: 'ready' } as const;

export const ON: Table = {
  hello: { ...UNEXPECTED, hello: 'hello' },
  waiting: WELCOMED,
  'load-sent': { ...WELCOMED, ack: 'loadAck' },
  idle: WELCOMED,
  'dump-requested': { ...WELCOMED, ack: 'dumpDeclined', state: 'state' },
  // The connection itself admits only data frames until the announced bytes are in (then the trailer, if due).
  streaming: { ...UNEXPECTED, error: 'peerError' },
  trailer: { ...UNEXPECTED, error: 'peerError', trailer: 'trailer' },
  // The bytes go on the socket pair: this connection stays free for the rest, and takes the state's trailer.
  direct: { ...WELCOMED, trailer: 'trailer' },
  checkpoint: { ...UNEXPECTED, error: 'peerError', trailer: 'checkpointTrailer' },
};

/** Where docs/srp.md's generated table begins and ends. */
export const SRP_TABLE_BEGIN =
  '<!-- generated from src/srp/protocol.ts by scripts/gen-srp-doc.ts: edit the table there -->';
export const SRP_TABLE_END = '<!-- end of the generated table -->';

/** The table as Markdown (docs/srp.md embeds this text): one row per phase, one column per op a client sends. */
export function srpTable(): string {
  const sent = OPS.filter((op) => ROWS.some((r) => ON[r][op] !== null));
  const lines = [
    `| phase | ${sent.map((op) => `\`${op}\``).join(' | ')} |`,
    `|---|${sent.map(() => '---').join('|')}|`,
  ];
  for (const row of ROWS) lines.push(`| ${row} | ${sent.map((op) => ON[row][op] ?? '–').join(' | ')} |`);
  const never = OPS.filter((op) => !sent.includes(op));
  lines.push(
    '',
    `\`${never.join('`, `')}\`: never accepted from an app (Aeterna sends them). – : \`unexpected_op\`.`,
    '',
  );
  lines.push('', 'Phases:', '');
  for (const [row, what] of Object.entries(ROW_MEANINGS)) lines.push(`- ${row}: ${what}`);
  lines.push('', 'Handlers:', '');
  for (const [h, what] of Object.entries(HANDLERS)) lines.push(`- ${h}: ${what}`);
  return lines.join('\n');
}
