// What an upgrade (or a recovery) carries of the relay across Aeterna's exec:
// the idle relay connections, with what their hellos said, and each
// instance's latest checkpoint memfd. The next Aeterna speaks on those connections as if
// nothing happened; a connection busy with anything is not carried.
import type { Logger } from '../log';
import type { SocketFile } from '../resources/socket-file';
import type { Generation } from '../supervisor/generation';
import { closeQuietly } from './codec';
import type { InstanceCheckpoints } from './checkpoint-instances';
import type { CarriedCheckpoint } from './checkpoint-store';
import { SrpConnection } from './connection';
import { RELAY_HIGH_WATER_MARK, busyWith, helloFlags, newSession, type Session, type Sessions } from './session';

/** Why Aeterna re-executes itself (upgrade/handover.ts's ReexecReason is this). */
export type CarryReason = 'upgrade' | 'exception' | 'signal';

/** An idle state relay connection of a generation (its fd is among the handover's `fds`, role 'relay-connection'). */
export interface CarriedRelayConnection {
  fd: number;
  generation: number;
  /** Which instance of the generation (service.instances); absent: instance 0. */
  instance?: number;
  /** False: its initial load went out whole and its ack is still due. */
  initialAcked: boolean;
  /** What its hello said (srp/session.ts: helloFlags). */
  noFds: boolean;
  takesTrailer: boolean;
  /** Takes the direct transport (a socket pair per relay); absent in a handover written before it existed. */
  takesDirect?: boolean;
  /** Hands its client connections over at a final sync; absent in a handover written before it existed. */
  takesHandoff?: boolean;
  /** Trailer checks besides sha256 it computes (its hello's `checksums`); absent likewise. */
  checksums?: string[];
}

export type { CarriedCheckpoint } from './checkpoint-store';

/** The relay's share of what an upgrade carries: its connections and checkpoints (the daemon's carrier, upgrade/carrier.ts, merges it with the others'). */
/** What the relay carries across a re-exec: its fds, and its part of the handover. */
export interface RelayCarried {
  fds: Array<{ role: 'relay' | 'relay-connection' | 'checkpoint'; name: string; fd: number }>;
  part: {
    relay: SocketFile;
    relay_connections: CarriedRelayConnection[];
    checkpoint: CarriedCheckpoint | null;
    instance_checkpoints?: CarriedCheckpoint[];
  };
}

export class RelayCarrier {
  /** An upgrade is about to exec: nothing is accepted or read (frames wait in the kernel for the next Aeterna). */
  frozen = false;

  constructor(
    private readonly sessions: Sessions,
    private readonly checkpoints: InstanceCheckpoints,
    private readonly maxFrame: number,
    private readonly log: Logger,
    private readonly listen: (s: Session) => void,
  ) {}

  /** Why an upgrade cannot carry every relay connection now ("generation 1 is busy with ..."), or null. */
  busyReason(): string | null {
    for (const s of this.sessions.all) {
      const why = busyWith(s, true);
      if (why)
        return `${s.gen ? `generation ${s.gen.number}` : `a connection of generation ${s.owner.number}`} is busy with ${why}`;
    }
    return null;
  }

  /** Resolves once every connection is idle; rejects with the reason after `timeoutMs` (checked every 20 ms: transfers end on many paths). */
  whenIdle(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const deadline = Date.now() + timeoutMs;
      const check = (): void => {
        const why = this.busyReason();
        if (why === null) return resolve();
        if (Date.now() >= deadline) return reject(new Error(why));
        setTimeout(check, 20);
      };
      check();
    });
  }

  /** Stop reading every connection (throws if one is busy now); the caller stops accepting. */
  freeze(): void {
    const why = this.busyReason();
    if (why) throw new Error(why);
    this.frozen = true;
    for (const s of this.sessions.all) s.conn.pause();
  }

  /** Read again; false if nothing was frozen. */
  thaw(): boolean {
    if (!this.frozen) return false;
    this.frozen = false;
    for (const s of this.sessions.all) s.conn.resume();
    return true;
  }

  /**
   * The relay connections the next Aeterna takes over, with what their hellos said. At an upgrade all must be
   * idle (it throws naming the busy one). At a recovery the busy ones are left out: they close at the exec, the
   * client's call on it fails, and the serving generation keeps its memory (docs/operations.md).
   */
  carry(reason: CarryReason): CarriedRelayConnection[] {
    if (reason === 'upgrade') {
      const why = this.busyReason();
      if (why) throw new Error(why);
    }
    const carried = [...this.sessions.all].filter((s) => s.gen !== null && busyWith(s, reason !== 'signal') === null);
    return carried.map((s) => ({
      fd: s.conn.stream.fd,
      generation: s.gen!.number,
      ...(s.gen!.instance > 0 ? { instance: s.gen!.instance } : {}),
      initialAcked: s.initialAcked,
      ...helloFlags(s),
    }));
  }

  /**
   * Everything the relay carries (upgrade/carried.ts): the state socket `stateFd` (at `file`), the relay connections
   * (see carry()) and each instance's latest checkpoint: instance 0's as `checkpoint` (what a single-instance app
   * always carried), the others' as `instance_checkpoints`, only when there are some.
   */
  carryAll(reason: CarryReason, stateFd: number, file: SocketFile): RelayCarried {
    const connections = this.carry(reason);
    const checkpoints = this.checkpoints.carry();
    const fds: RelayCarried['fds'] = [{ role: 'relay', name: 'state', fd: stateFd }];
    for (const c of connections) fds.push({ role: 'relay-connection', name: `generation ${c.generation}`, fd: c.fd });
    for (const c of checkpoints) {
      const name = c.instance === undefined ? `checkpoint ${c.seq}` : `instance ${c.instance} checkpoint ${c.seq}`;
      fds.push({ role: 'checkpoint', name, fd: c.fd });
    }
    const checkpoint = checkpoints.find((c) => c.instance === undefined) ?? null;
    const others = checkpoints.filter((c) => c.instance !== undefined);
    return {
      fds,
      part: {
        relay: file,
        relay_connections: connections,
        checkpoint,
        ...(others.length > 0 ? { instance_checkpoints: others } : {}),
      },
    };
  }

  /**
   * A re-executed Aeterna: speak again on the connections the previous one carried, each bound to its
   * (adopted, attached) generation, idle (or with the ack of its initial load due); no welcome is sent again.
   */
  adoptConnections(entries: CarriedRelayConnection[], generations: Generation[]): void {
    for (const entry of entries) {
      const gen = generations.find((g) => g.number === entry.generation && g.instance === (entry.instance ?? 0));
      if (!gen || !this.sessions.generations.has(gen)) {
        this.log.warn(
          { generation: entry.generation },
          'relay: a handed-over connection names no running generation; closed',
        );
        closeQuietly(entry.fd);
        continue;
      }
      const conn = new SrpConnection(entry.fd, this.maxFrame, RELAY_HIGH_WATER_MARK);
      const session: Session = {
        ...newSession(conn, gen),
        ...helloFlags(entry),
        gen,
        phase: entry.initialAcked ? 'idle' : 'load-sent',
        initialAcked: entry.initialAcked,
      };
      this.listen(session);
      this.sessions.byGeneration.set(gen, session);
      session.carried = true;
      this.log.debug({ generation: gen.number }, 'relay connection taken over');
    }
  }
}
