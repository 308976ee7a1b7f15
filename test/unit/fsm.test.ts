// The orchestrator's transition table, walked whole: every legal transition
// applies, every illegal (state, event) pair is refused and changes nothing.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  EVENTS,
  IllegalTransitionError,
  STATES,
  StateMachine,
  TRANSITIONS,
  mermaidDiagram,
  type State,
} from '../../src/orchestrator/fsm';
import { ROOT } from '../helpers/aeterna';

/** A machine driven into `state` along legal transitions (breadth-first from Stopped). */
function machineIn(state: State): StateMachine {
  const paths = new Map<State, (typeof EVENTS)[number][]>([['Stopped', []]]);
  const queue: State[] = ['Stopped'];
  while (queue.length > 0) {
    const from = queue.shift()!;
    for (const event of EVENTS) {
      const to = TRANSITIONS[from][event];
      if (to !== null && !paths.has(to)) {
        paths.set(to, [...paths.get(from)!, event]);
        queue.push(to);
      }
    }
  }
  const route = paths.get(state);
  assert.ok(route, `${state} is reachable from Stopped`);
  const m = new StateMachine();
  for (const e of route) m.fire(e);
  assert.equal(m.state, state);
  return m;
}

describe('orchestrator FSM', () => {
  it('has the states and events the design names', () => {
    for (const s of ['Starting', 'Running', 'Handover', 'Soaking', 'Draining', 'RollingBack', 'Stopping', 'Stopped'])
      assert.ok(STATES.includes(s as State), s);
    for (const e of [
      'start',
      'reload',
      'ready',
      'ready-timeout',
      'state-relayed',
      'relay-failed',
      'exited',
      'soak-elapsed',
      'promote',
      'rollback',
      'stop',
      'drain-done',
    ]) {
      assert.ok((EVENTS as readonly string[]).includes(e), e);
    }
  });

  it('every state is reachable from Stopped, and Stopped from every state', () => {
    for (const s of STATES) {
      const m = machineIn(s);
      if (s !== 'Stopped') {
        m.fire('stop');
        if (m.state === 'Stopping') m.fire('drain-done');
        assert.equal(m.state, 'Stopped', `stop from ${s}`);
      }
    }
  });

  let legal = 0;
  let illegal = 0;
  for (const from of STATES) {
    for (const event of EVENTS) {
      const to = TRANSITIONS[from][event];
      if (to !== null) {
        legal++;
        it(`${from} --${event}--> ${to}`, () => {
          const m = machineIn(from);
          const seen: string[] = [];
          m.onTransition((t) => seen.push(`${t.from}>${t.to}:${t.event}`));
          const t = m.fire(event);
          assert.equal(t.to, to);
          assert.equal(m.state, to);
          assert.deepEqual(seen, [`${from}>${to}:${event}`]);
        });
      } else {
        illegal++;
        it(`${from} refuses ${event}`, () => {
          const m = machineIn(from);
          let notified = 0;
          m.onTransition(() => notified++);
          assert.equal(m.can(event), false);
          assert.throws(
            () => m.fire(event),
            (err: unknown) =>
              err instanceof IllegalTransitionError &&
              err.code === 'E_ILLEGAL_TRANSITION' &&
              err.state === from &&
              err.event === event,
          );
          assert.equal(m.state, from, 'a refused event changes nothing');
          assert.equal(notified, 0, 'and notifies nobody');
        });
      }
    }
  }

  it('decides every (state, event) pair', () => {
    assert.equal(legal + illegal, STATES.length * EVENTS.length);
    assert.ok(legal > 0 && illegal > 0);
  });

  it('a reload is refused in every state but Running', () => {
    for (const s of STATES) assert.equal(TRANSITIONS[s].reload !== null, s === 'Running', s);
  });

  it('docs/fsm.md carries the diagram generated from the table', () => {
    const doc = fs.readFileSync(path.join(ROOT, 'docs', 'fsm.md'), 'utf8');
    assert.ok(
      doc.includes('```mermaid\n' + mermaidDiagram() + '\n```'),
      'regenerate with: node dist/scripts/gen-fsm-doc.js',
    );
  });
});
