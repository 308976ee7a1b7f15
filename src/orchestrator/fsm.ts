// The orchestrator's finite state machine. The transition table below is the
// single source of truth: every (state, event) pair is written down, either as
// the state it leads to or as `null` (illegal). The `Table` type requires every
// pair, so adding a state or an event without deciding each of its pairs does
// not compile. docs/fsm.md's diagram is generated from this table (and a test
// checks it has not drifted).
import { AeternaError } from '../errors';

export const STATES = [
  'Stopped',
  'Starting',
  'Running',
  'Handover',
  'Soaking',
  'Draining',
  'RollingBack',
  'Stopping',
] as const;
export type State = (typeof STATES)[number];

export const EVENTS = [
  'start', // begin supervising: spawn the first generation
  'reload', // an operator asked for a reload (CLI or SIGHUP)
  'ready', // the generation being started or handed over to is ready (during a reload: canary, the soak begins)
  'ready-immediate', // during an `immediate` reload: the new generation is ready and relayed, promoted at once
  'ready-timeout', // it did not become ready in time
  'state-relayed', // the old generation's state reached the new one (acked); in Draining, the final sync did
  'relay-failed', // the state relay failed (timeout, nack, checksum, malformed frame, old died mid-dump); in Draining, the final sync was lost
  'spawn-failed', // a reload's new generation could not be started at all (exec failed)
  'exited', // the serving generation (or, during a reload, the new one) exited on its own
  'old-exited', // during a reload, the old generation exited on its own
  'soak-elapsed', // the canary soak time is over
  'promote', // operator: end the soak now, in favour of the new generation
  'rollback', // operator (or a failed canary probe): end the soak now, keep the old generation
  'stop', // SIGTERM/SIGINT/`aeterna stop`, or a crash loop: stop everything
  'drain-done', // every process that was being stopped has exited
  'retire', // in Draining: the promotion settled (final sync over, old generation told to stop); it drains on in the background
] as const;
export type Event = (typeof EVENTS)[number];

type Table = { readonly [S in State]: { readonly [E in Event]: State | null } };

const ILLEGAL: { readonly [E in Event]: null } = {
  start: null,
  reload: null,
  ready: null,
  'ready-immediate': null,
  'ready-timeout': null,
  'state-relayed': null,
  'relay-failed': null,
  'spawn-failed': null,
  exited: null,
  'old-exited': null,
  'soak-elapsed': null,
  promote: null,
  rollback: null,
  stop: null,
  'drain-done': null,
  retire: null,
};

export const TRANSITIONS: Table = {
  Stopped: { ...ILLEGAL, start: 'Starting' },
  // The first generation (or a restart after a crash) is starting; /readyz says 503 until it is ready.
  Starting: {
    ...ILLEGAL,
    ready: 'Running',
    'ready-timeout': 'Starting', // killed and restarted under service.restart
    exited: 'Starting', // restarted under service.restart (with backoff)
    stop: 'Stopping',
  },
  Running: {
    ...ILLEGAL,
    reload: 'Handover',
    exited: 'Starting', // a crash between reloads: restart under service.restart
    stop: 'Stopping',
  },
  // Generation N+1 runs beside N on the same sockets; state is relayed; we wait for readiness.
  Handover: {
    ...ILLEGAL,
    'state-relayed': 'Handover',
    ready: 'Soaking', // canary: both generations serve for soak_time
    'ready-immediate': 'Draining', // immediate: no soak, the old generation is drained at once
    'ready-timeout': 'RollingBack',
    'relay-failed': 'RollingBack',
    'spawn-failed': 'RollingBack', // nothing to stop: the rollback ends at once
    exited: 'RollingBack',
    'old-exited': 'Handover', // the new generation will be promoted if it becomes ready
    stop: 'Stopping',
  },
  // Both generations serve; the new one must survive soak_time.
  Soaking: {
    ...ILLEGAL,
    'soak-elapsed': 'Draining',
    promote: 'Draining',
    'old-exited': 'Draining', // nothing to fall back on: the new generation serves
    exited: 'RollingBack',
    rollback: 'RollingBack',
    stop: 'Stopping',
  },
  // Promotion: the new generation serves; the old one gets SIGTERM (SIGKILL after stop_timeout) and its final sync.
  // The reload ends once both are under way and the sync settled: the old generation is not waited for.
  Draining: {
    ...ILLEGAL,
    retire: 'Running', // the old generation drains on in the background, as a retiring generation
    'drain-done': 'Running', // the old generation was already gone
    'state-relayed': 'Draining', // the final sync arrived
    'relay-failed': 'Draining', // final sync lost: logged, the promotion stands
    exited: 'Draining', // the new generation died while the promotion settles: restarted once it has
    stop: 'Stopping',
  },
  // The new generation is stopped; the old one was never touched and keeps serving.
  RollingBack: {
    ...ILLEGAL,
    'drain-done': 'Running', // the new generation is gone
    'old-exited': 'RollingBack', // the old one died too: restarted once the rollback is done
    stop: 'Stopping',
  },
  // Every generation is stopped; exits are counted, not events: the last one is drain-done.
  Stopping: {
    ...ILLEGAL,
    'drain-done': 'Stopped',
    stop: 'Stopping', // a second stop request: kill at once
  },
};

export class IllegalTransitionError extends AeternaError {
  constructor(
    readonly state: State,
    readonly event: Event,
  ) {
    super('E_ILLEGAL_TRANSITION', `event "${event}" is not valid in state ${state}`);
  }
}

export interface Transition {
  from: State;
  to: State;
  event: Event;
  at: Date;
}

/** The current state and the table; `fire` either applies a legal transition wholly or throws. */
export class StateMachine {
  private current: State = 'Stopped';
  private readonly listeners: Array<(t: Transition) => void> = [];

  get state(): State {
    return this.current;
  }

  can(event: Event): boolean {
    return TRANSITIONS[this.current][event] !== null;
  }

  /** Apply an event. Throws IllegalTransitionError (and changes nothing) when it is not legal now. */
  fire(event: Event): Transition {
    const to = TRANSITIONS[this.current][event];
    if (to === null) throw new IllegalTransitionError(this.current, event);
    const t: Transition = { from: this.current, to, event, at: new Date() };
    this.current = to;
    for (const l of this.listeners) l(t);
    return t;
  }

  onTransition(listener: (t: Transition) => void): void {
    this.listeners.push(listener);
  }
}

/** The table as a Mermaid state diagram (docs/fsm.md embeds this text). */
export function mermaidDiagram(): string {
  const lines = ['stateDiagram-v2', '    [*] --> Stopped'];
  for (const from of STATES) {
    const byTarget = new Map<State, Event[]>();
    for (const event of EVENTS) {
      const to = TRANSITIONS[from][event];
      if (to !== null) byTarget.set(to, [...(byTarget.get(to) ?? []), event]);
    }
    for (const [to, events] of byTarget) lines.push(`    ${from} --> ${to}: ${events.join(', ')}`);
  }
  lines.push('    Stopped --> [*]');
  return lines.join('\n');
}
