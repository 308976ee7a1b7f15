// The status report (`aeterna status`, the control socket's status, the per-instance metrics): what Aeterna runs,
// each generation's role and instances, and where a reload is. Apart from the orchestrator so that what status shows
// is found in one place; it is a function of a read-only view, so building a report cannot change what it reports on.
import type { Config } from '../config/types';
import type { ListenerSet } from '../resources/listeners';
import type { FdStore } from '../resources/fd-store';
import type { Generation } from '../supervisor/generation';
import type { AppNotices } from './app-notices';
import type { State } from './fsm';
import type { InstanceRestarts } from './instance-restarts';
import type { InstanceSet } from './instance-set';
import type { StateRelay } from './relay';
import type { ReloadRun } from './reload-run';
import type { RetiringGenerations } from './retiring';
import type { GenerationInfo, GenerationUsage, InstanceInfo, ReloadRecord, StatusReport } from './types';

/** What the status report reads of the orchestrator, as it is at the moment of the report. */
export interface StatusView {
  readonly state: State;
  /** The running config (a reload's own until it is promoted is in `inFlight`). */
  readonly config: Config;
  readonly serving: InstanceSet | null;
  readonly candidate: InstanceSet | null;
  readonly draining: InstanceSet | null;
  /** The reload in flight, if any. */
  readonly inFlight: Readonly<Pick<ReloadRun, 'record' | 'awaiting' | 'split' | 'soakEndsAt'>> | null;
  readonly startedAt: Date;
  readonly lastReload: ReloadRecord | null;
  readonly restarts: Readonly<Pick<InstanceRestarts, 'total' | 'lastCrash' | 'isPending' | 'countOf'>>;
  readonly retiring: Pick<RetiringGenerations, 'info'>;
  readonly notices: Pick<AppNotices, 'statusOf'>;
  readonly listeners: Pick<ListenerSet, 'list'>;
  readonly fdStore: Pick<FdStore, 'names'>;
  readonly relay: Pick<StateRelay, 'lastCheckpoint'> | null;
  readonly resourcesOf?: (gen: Generation) => Omit<GenerationUsage, 'generation' | 'pid' | 'role'>;
  /** Whether instance `gen` said it is ready. */
  isReady(gen: Generation): boolean;
  /** Every live process tree Aeterna runs. */
  liveGenerations(): Generation[];
}

/** Each instance of `set`: its pid (of the latest process in its slot), state, readiness and restarts. */
export function instancesOf(view: StatusView, set: InstanceSet): InstanceInfo[] {
  return [...Array(set.size).keys()].map((i) => {
    const g = set.at(i);
    const ready = g !== undefined && g.alive && view.isReady(g);
    const state: InstanceInfo['state'] =
      g === undefined
        ? 'pending'
        : !g.alive
          ? view.restarts.isPending(i)
            ? 'restarting'
            : 'exited'
          : ready
            ? 'ready'
            : 'starting';
    return {
      instance: i,
      pid: g?.alive ? g.pid : null,
      state,
      ready,
      restarts: set === view.serving ? view.restarts.countOf(i) : 0,
      started_at: g?.startedAt.toISOString() ?? null,
      fdstore: view.fdStore.names(i),
      // Checkpoints are per instance number: the serving set's entries show them (one instance: `checkpoint` does).
      ...(set === view.serving && set.size > 1 ? { checkpoint: view.relay?.lastCheckpoint(i) ?? null } : {}),
    };
  });
}

export function statusReport(view: StatusView): StatusReport {
  const { serving, candidate, draining, inFlight } = view;
  const info = (g: InstanceSet | null, ready: boolean): GenerationInfo | null =>
    g && g.alive
      ? {
          generation: g.number,
          pid: g.pid,
          started_at: g.startedAt.toISOString(),
          ready,
          app_status: view.notices.statusOf(g.live[0]),
          ...(g.size > 1 ? { instances: instancesOf(view, g) } : {}),
        }
      : null;
  // While a reload runs: the generation being replaced and the new one (before and after promotion alike).
  const previous = draining ?? (candidate ? serving : null);
  const next = draining ? serving : candidate;
  return {
    state: view.state,
    service: view.config.service.name,
    strategy: inFlight?.record.strategy ?? view.config.orchestration.strategy, // a reload runs with its own config's
    generation: serving?.number ?? 0,
    pid: serving?.alive ? serving.pid : null,
    app_status: serving?.alive ? view.notices.statusOf(serving.live[0]) : null,
    instances: serving ? instancesOf(view, serving) : [],
    daemon_pid: process.pid,
    uptime_ms: Date.now() - view.startedAt.getTime(),
    started_at: view.startedAt.toISOString(),
    listeners: view.listeners.list().map((l) => ({ name: l.name, address: l.address, fd: l.fd })),
    previous: info(previous, previous !== null && previous === serving),
    candidate: info(next, next !== null && (next === serving || inFlight?.awaiting.has('ready') === false)),
    retiring: view.retiring.info(),
    restarts: view.restarts.total,
    fdstore: view.fdStore.names(),
    checkpoint: view.relay?.lastCheckpoint() ?? null,
    canary_weight: inFlight?.split?.weight ?? null,
    last_reload: inFlight?.record ?? view.lastReload,
    last_crash: view.restarts.lastCrash,
    generations: view.liveGenerations().map((g) => ({
      generation: g.number,
      ...(g.instance > 0 ? { instance: g.instance } : {}),
      pid: g.pid,
      role: serving?.has(g) ? 'serving' : candidate?.has(g) ? 'candidate' : draining?.has(g) ? 'previous' : 'retiring',
      ...view.resourcesOf?.(g),
    })),
    soak_remaining_ms:
      view.state === 'Soaking' && inFlight?.soakEndsAt !== undefined
        ? Math.max(0, inFlight.soakEndsAt - Date.now())
        : null,
  };
}
