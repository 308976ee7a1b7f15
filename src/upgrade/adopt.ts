// What a re-executed Aeterna (an upgrade, a recovery) takes over from the handover, beside its sockets
// (own-sockets.ts) and the fd store: the app's processes, as Generation objects again (the serving generation's
// instances, and the old generations of promoted reloads still retiring, with the SIGKILL deadlines the previous
// program set), the pipes it read their output from, and their state relay connections.
import type { Logger } from '../log';
import { native } from '../native/binding';
import type { AppOutput } from '../monitor/app-output';
import { outputKey } from '../monitor/app-output';
import type { Cgroups } from '../supervisor/cgroup';
import { Generation } from '../supervisor/generation';
import type { Reaper } from '../supervisor/reaper';
import type { SrpCoordinator } from '../srp/coordinator';
import type { HandedGeneration, Handover } from './handover';

/** A carried retiring generation, taken over: it drains on until its deadline. */
export interface AdoptedRetiring {
  gen: Generation;
  since: Date;
  deadline: Date;
}

/**
 * The handover's generations as Generation objects, each in its cgroup, its output pipes read on (the app would block
 * once one is full; a pipe of a generation not taken over is closed). Call it before the reaper's first sweep: a
 * generation that exited during the exec is then reported, not reaped as an orphan.
 */
export function adoptGenerations(
  h: Handover,
  reaper: Reaper,
  cgroups: Cgroups | null,
  appOutput: AppOutput,
): { serving: Generation[]; retiring: AdoptedRetiring[] } {
  const adopted = h.generations.map((g) =>
    Generation.adopt(
      g.number,
      g.pid,
      new Date(g.started_at),
      reaper,
      cgroups,
      g.cgroup === null ? null : (cgroups?.adoptGeneration(g.cgroup) ?? null),
      g.instance ?? 0,
    ),
  );
  const outputs = h.fds.filter((f) => f.role === 'app-output');
  for (const gen of adopted) appOutput.adopt(gen, outputs);
  for (const f of outputs) if (!adopted.some((g) => f.name.startsWith(`${outputKey(g)}/`))) native.close(f.fd);
  // The serving generation's instances, each carried as an entry of its own; beside them the old generations of
  // promoted reloads still draining.
  return {
    serving: adopted.filter((_, i) => h.generations[i].state !== 'retiring'),
    retiring: h.generations.flatMap((g, i) =>
      g.state === 'retiring' ? [{ gen: adopted[i], ...retiringTimes(g) }] : [],
    ),
  };
}

/**
 * The relay connections the previous Aeterna handed over, to `relay` (closed when the relay is off now: nobody would
 * read them, and so are the carried checkpoints). A retiring generation's relay is over (its final sync ran before it
 * was replaced): its connection is closed.
 */
export function adoptRelayConnections(
  h: Handover,
  relay: SrpCoordinator | null,
  serving: Generation[],
  retiring: readonly AdoptedRetiring[],
  log: Logger,
): void {
  const retired = new Set(retiring.map((r) => r.gen.number));
  const entries = [];
  for (const e of h.relay_connections ?? []) {
    if (retired.has(e.generation)) native.close(e.fd);
    else entries.push(e);
  }
  if (relay) relay.adoptConnections(entries, serving);
  else entries.forEach((e) => native.close(e.fd));
  if (!relay) for (const c of [h.checkpoint, ...(h.instance_checkpoints ?? [])]) if (c) native.close(c.fd);
  if (entries.length > 0)
    log.info(
      { generations: entries.map((e) => e.generation), relay: relay !== null },
      `took over ${entries.length} state relay connection(s)`,
    );
}

/** A carried retiring generation's SIGTERM and SIGKILL times; a missing or unreadable deadline is due now. */
function retiringTimes(g: HandedGeneration): { since: Date; deadline: Date } {
  const since = new Date(g.draining_since ?? g.started_at);
  const deadline = new Date(g.kill_deadline ?? Date.now());
  return {
    since: Number.isNaN(since.getTime()) ? new Date() : since,
    deadline: Number.isNaN(deadline.getTime()) ? new Date() : deadline,
  };
}
