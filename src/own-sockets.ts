// Aeterna's own sockets, as opposed to the app's listeners: the control socket, the metrics endpoint, the sd_notify
// socket and the state relay. A fresh start opens them; a re-executed Aeterna adopts the ones the previous program
// carried (the handover names their fds), so one code path serves both. The socket files are kept while Aeterna
// runs (a tmp cleaner may delete them) and closed at shutdown.
import path from 'node:path';
import type { Config } from './config/types';
import type { Logger } from './log';
import { startMetricsServer, type Metrics, type MetricsEndpoint } from './monitor/metrics';
import { NotifySocket } from './resources/notify';
import { keepSocketFile, type SocketFile, type SocketFileWatch } from './resources/socket-file';
import type { ListenerWatch } from './resources/listener-watch';
import type { ControlApi } from './orchestrator/types';
import { startControlServer, type ControlServer } from './control/server';
import { SrpCoordinator } from './srp/coordinator';
import { resolveIdentity } from './supervisor/identity';
import { ROOT_RUNTIME_DIR, defaultRuntimeDir, ensurePrivateRuntimeDir } from './config/runtime-dir';
import type { FdRole, Handover } from './upgrade/handover';
import { openNotifySocket, openStateRelay } from './start-failure';

/** What the sockets answer with, and whom they tell that what an upgrade carries changed. */
export interface OwnSocketsDeps {
  config: Config;
  log: Logger;
  /** What the control socket serves. */
  api: ControlApi;
  metrics: Metrics;
  listenerWatch: ListenerWatch;
  /** Whether the app is ready (the metrics endpoint's /ready). */
  isReady: () => boolean;
  /** A socket's fd changed (re-created, re-listening): what a handover describes must be prepared again. */
  changed: () => void;
}

export class OwnSockets {
  control: ControlServer | null = null;
  metricsEndpoint: MetricsEndpoint | null = null;
  notify: NotifySocket | null = null;
  /** The state relay, when orchestration.state_handoff is on. */
  relay: SrpCoordinator | null = null;
  private readonly watches: SocketFileWatch[] = [];

  constructor(private readonly deps: OwnSocketsDeps) {}

  /**
   * Open every socket, or adopt the ones `handover` carries (an upgrade, a recovery). Throws what a failed start
   * reports (start-failure.ts); the control socket comes first, so that a second daemon on the same socket is
   * refused before it binds anything else; `afterControl` runs then (the daemon binds the app's listeners).
   */
  async open(handover: Handover | null, afterControl: () => void): Promise<void> {
    const { config, log } = this.deps;
    const kept = (role: FdRole): number | undefined => handover?.fds.find((f) => f.role === role)?.fd;
    this.prepareRuntimeDir();
    this.control = await this.startControl(kept('control'), handover?.control);
    afterControl();
    await this.startMetrics(kept('metrics'));
    const notifyFd = kept('notify');
    this.notify =
      handover && notifyFd !== undefined
        ? NotifySocket.adopt(handover.notify, notifyFd, log)
        : openNotifySocket(NotifySocket.pathFor(config.control.socketPath), log);
    this.openRelay(handover, kept('relay'));
    this.keepSocketFiles();
  }

  /** The control socket; on the one the previous Aeterna carried (`adoptFd`, `file`), if any. */
  private startControl(adoptFd: number | undefined, file: SocketFile | undefined): Promise<ControlServer> {
    const listeningChanged = this.deps.changed;
    return startControlServer(
      this.deps.config.control.socketPath,
      this.deps.api,
      this.deps.log,
      adoptFd !== undefined && file ? { adopt: { fd: adoptFd, file }, listeningChanged } : { listeningChanged },
    );
  }

  /** The metrics endpoint, when configured; on the socket the previous Aeterna carried (`adoptFd`), if any. */
  private async startMetrics(adoptFd: number | undefined): Promise<void> {
    const { config, metrics, listenerWatch, log } = this.deps;
    const address = config.observability.metrics;
    if (!address) return;
    this.metricsEndpoint = await startMetricsServer(
      metrics,
      address,
      this.deps.isReady,
      (probe) => listenerWatch.check(probe),
      log,
      adoptFd,
    );
    log.info({ metrics: `${address.host}:${address.port}` }, 'metrics endpoint ready');
  }

  /** The state relay, when orchestration.state_handoff is on: created, or on the previous one's socket (`adoptFd`). */
  private openRelay(handover: Handover | null, adoptFd: number | undefined): void {
    const { config, metrics, log } = this.deps;
    const handoff = config.orchestration.stateHandoff;
    if (!handoff.enabled) return;
    const identity = resolveIdentity(config.service.user, config.service.group);
    // Each instance's checkpoint: instance 0's is `checkpoint`, the others' `instance_checkpoints`.
    const instances = config.service.instances ?? 1;
    const checkpoints = [handover?.checkpoint ?? null, ...(handover?.instance_checkpoints ?? [])].filter(
      (c) => c !== null,
    );
    this.relay =
      handover?.relay && adoptFd !== undefined
        ? SrpCoordinator.adopt(handoff, handover.relay, adoptFd, log, checkpoints, instances)
        : openStateRelay(handoff, identity, log, instances);
    this.relay.on('checkpoint', (result) => metrics.checkpointed(result));
    log.info({ socket: handoff.socketPath }, 'state relay ready');
  }

  /**
   * Check the state relay's and the notify socket files like the control socket's (a tmp cleaner may delete
   * them): re-created at the same path, which the generations' environment names; the handover then names the new fd.
   */
  private keepSocketFiles(): void {
    const { config, log, changed } = this.deps;
    const keep = (file: SocketFile, what: string, consequence: string, recreate: () => SocketFile): void => {
      const recreated = (): SocketFile => {
        const now = recreate();
        changed();
        return now;
      };
      this.watches.push(keepSocketFile(file, { what, consequence, recreate: recreated }, log));
    };
    const notify = this.notify!;
    keep(notify.file, 'notify socket', "the app's READY=1 (and WATCHDOG=1, FDSTORE=1) cannot reach Aeterna", () =>
      notify.rebind(),
    );
    const relay = this.relay;
    if (!relay) return;
    const consequence = 'new generations cannot connect to the state relay (a reload starts without the state)';
    keep(relay.listening.file, 'state relay socket', consequence, () =>
      relay.relisten(resolveIdentity(config.service.user, config.service.group)),
    );
  }

  /** Sockets left at their default as a non-root user go to a private directory: create it 0700, or refuse one that is not ours. */
  private prepareRuntimeDir(): void {
    const { config } = this.deps;
    const dir = defaultRuntimeDir();
    const sockets = [config.control.socketPath, config.orchestration.stateHandoff.socketPath];
    if (dir !== ROOT_RUNTIME_DIR && sockets.some((p) => path.dirname(p) === dir)) ensurePrivateRuntimeDir(dir);
  }

  /** Stop keeping the socket files: before the sockets are closed, so that none is re-created after. */
  stopKeeping(): void {
    for (const watch of this.watches) watch.stop();
  }

  /** Close the control socket, the metrics endpoint and the notify socket (the relay: closeRelay). */
  async close(): Promise<void> {
    this.stopKeeping();
    await this.control?.close().catch(() => undefined);
    this.metricsEndpoint?.server.closeAllConnections();
    this.metricsEndpoint?.server.close();
    this.notify?.close();
  }

  async closeRelay(): Promise<void> {
    await this.relay?.close();
  }
}
