// How the CLI shows reloads and status to a person: plain lines for logs and
// pipes, one live line on a terminal, JSON for scripts. Pure formatting plus
// the small live-line writer; no socket I/O here.
import type {
  InstanceInfo,
  CrashEvent,
  GenerationUsage,
  OperatorEvent,
  ReloadEvent,
  ReloadPhase,
  ReloadRecord,
  RetiringInfo,
  StatusReport,
} from '../orchestrator/types';

/** 0.05s, 12.3s, 4m05s, 3h04m, 2d03h. */
export function formatDuration(ms: number): string {
  const s = Math.max(0, ms) / 1000;
  if (s < 10) return `${s.toFixed(2)}s`;
  if (s < 60) return `${s.toFixed(1)}s`;
  const pad = (n: number): string => String(Math.floor(n)).padStart(2, '0');
  if (s < 3600) return `${Math.floor(s / 60)}m${pad(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${pad((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d${pad((s % 86400) / 3600)}h`;
}

/** 512 B, 1.5 KiB, 12.0 MiB. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

/** [#####.....] for done/total, clamped. */
export function progressBar(done: number, total: number, width = 10): string {
  const ratio = total > 0 ? Math.min(1, Math.max(0, done / total)) : 1;
  const filled = Math.round(ratio * width);
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
}

/** One plain line per phase, e.g. "reload-3 spawned generation 4 (pid 1234) +0.05s"; null for other events. */
export function plainEventLine(event: ReloadEvent): string | null {
  if (event.type !== 'phase') return null;
  return `${event.reload} ${event.phase}${event.detail ? ` ${event.detail}` : ''} +${formatDuration(event.elapsed_ms)}`;
}

/**
 * `aeterna events` for a person: one line per event (an outcome or a crash with the stderr lines below it), each
 * starting with its time; null for the events only --json shows (the soak's and the relay's progress ticks).
 */
export function describeOperatorEvent(event: OperatorEvent): string | null {
  const now = new Date().toISOString();
  switch (event.type) {
    case 'phase':
      if (event.phase === 'done') return null; // the outcome follows
      return `${event.at} ${event.reload} (${event.trigger}) ${event.phase}${event.detail ? ` ${event.detail}` : ''} +${formatDuration(event.elapsed_ms)}`;
    case 'outcome':
      return `${now} ${event.reload} (${event.trigger}) ${describeOutcome(event.record).text.replace(/^\S+ /, '')}`;
    case 'soak':
    case 'relay':
      return null;
    case 'crash': {
      const how = event.exit.signal !== null ? `killed by ${event.exit.signal}` : `exited with code ${event.exit.code}`;
      const next =
        event.restart_in_ms === null ? 'Aeterna stops' : `restarting in ${formatDuration(event.restart_in_ms)}`;
      const tail = (event.stderr_tail ?? []).map((l) => `\n  | ${l}`).join('');
      return `${event.at} generation ${event.generation} (pid ${event.pid}) ${how} (${event.reason}): ${next}${tail}`;
    }
    case 'restart':
      return `${event.at} generation ${event.generation} (pid ${event.pid}) started: restart ${event.attempt}`;
    case 'upgrade':
      return `${event.at} aeterna upgrade: re-executing in place (from ${event.from}, re-exec ${event.reexecs + 1})`;
    case 'stopping':
      return `${event.at} stopping: ${event.reason}`;
  }
}

/** The outcome of a finished reload for a person, and whether it succeeded. */
export function describeOutcome(record: ReloadRecord): { ok: boolean; text: string } {
  const took = record.duration_ms === null ? '' : ` in ${formatDuration(record.duration_ms)}`;
  if (record.outcome === 'promoted') {
    const gen =
      record.to_generation === null
        ? ''
        : `: generation ${record.to_generation}${record.new_pid === null ? '' : ` (pid ${record.new_pid})`} is serving` +
          (record.serving_since ? ` since ${record.serving_since}` : '');
    return { ok: true, text: `${record.id} promoted${took}${gen}` };
  }
  const what =
    record.outcome === 'rolled_back'
      ? 'rolled back'
      : record.outcome === 'failed'
        ? 'failed'
        : `ended ${record.outcome}`;
  const reason = record.reason ?? 'no reason given';
  const code = record.code ? ` (${record.code})` : '';
  const tail = describeStderrTail(record);
  // Several lines (every issue of an invalid config): each on its own line, below the outcome.
  if (reason.includes('\n')) return { ok: false, text: `${record.id} ${what}${took}${code}:\n${reason}${tail}` };
  return { ok: false, text: `${record.id} ${what}${took}: ${reason}${code}${tail}` };
}

/** A failed reload's new generation's last stderr lines, each on a line of its own below the outcome ('' for none). */
function describeStderrTail(record: ReloadRecord): string {
  const tail = record.stderr_tail ?? [];
  if (record.to_generation === null || record.exit == null) return '';
  if (record.stderr_tail === null)
    return `\n(its stderr went straight to Aeterna's; observability.app_output: prefixed or json keeps its last lines for this report)`;
  if (tail.length === 0) return '';
  return `\ngeneration ${record.to_generation}'s last stderr lines:\n${tail.map((l) => `  | ${l}`).join('\n')}`;
}

/** An old generation still draining after its reload: "generation 3 (pid 1200) draining since ..., SIGKILL at ...". */
export function describeRetiring(r: RetiringInfo): string {
  return `generation ${r.generation} (pid ${r.pid}) draining since ${r.draining_since}, SIGKILL at ${r.kill_deadline} at the latest`;
}

/**
 * The live line on a terminal: current phase, time since the reload started
 * (ticking between events), a soak progress bar while soaking, and relay
 * progress while relaying. Rewritten in place with \r.
 */
export class LiveLine {
  private reload = '';
  private phase: ReloadPhase | null = null;
  private detail: string | undefined;
  /** elapsed_ms of the latest event, and when it arrived here: the clock ticks on from there. */
  private elapsedAt = { ms: 0, localMs: Date.now() };
  private soak: { elapsed: number; total: number; localMs: number } | null = null;
  private relay: { bytes: number; total: number; rate: number } | null = null;
  private readonly ticker: NodeJS.Timeout;
  private shown = false;

  constructor(private readonly out: NodeJS.WriteStream) {
    this.ticker = setInterval(() => this.draw(), 250);
    this.ticker.unref();
  }

  event(event: ReloadEvent): void {
    const now = Date.now();
    this.reload = event.reload;
    switch (event.type) {
      case 'phase':
        this.phase = event.phase;
        this.detail = event.detail;
        this.elapsedAt = { ms: event.elapsed_ms, localMs: now };
        if (event.phase !== 'relaying') this.relay = null;
        break;
      case 'soak':
        this.soak = { elapsed: event.elapsed_ms, total: event.soak_ms, localMs: now };
        this.elapsedAt = { ms: event.total_ms, localMs: now };
        break;
      case 'relay':
        this.relay = { bytes: event.bytes, total: event.total, rate: event.rate_bps };
        break;
      case 'outcome':
        return;
    }
    this.draw();
  }

  /** Clear the line and stop ticking; output that follows starts on a clean line. */
  end(): void {
    clearInterval(this.ticker);
    if (this.shown) this.out.write('\r\x1b[K');
    this.shown = false;
  }

  private draw(): void {
    if (this.phase === null) return;
    const now = Date.now();
    const elapsed = formatDuration(this.elapsedAt.ms + now - this.elapsedAt.localMs);
    let text = `${this.reload} +${elapsed} ${this.phase}${this.detail ? `: ${this.detail}` : ''}`;
    if (this.phase === 'soaking' && this.soak) {
      const soaked = Math.min(this.soak.total, this.soak.elapsed + now - this.soak.localMs);
      text += `  ${progressBar(soaked, this.soak.total)} ${Math.floor(soaked / 1000)}s/${Math.round(this.soak.total / 1000)}s`;
    }
    if (this.relay) {
      const total = this.relay.total > 0 ? `/${formatBytes(this.relay.total)}` : '';
      text += `  relay ${formatBytes(this.relay.bytes)}${total} at ${formatBytes(this.relay.rate)}/s`;
    }
    // Never wrap: a wrapped line cannot be rewritten with \r.
    const width = Math.max(20, (this.out.columns || 80) - 1); // 0 when the terminal does not say
    if (text.length > width) text = text.slice(0, width - 1) + '…';
    this.out.write(`\r\x1b[K${text}`);
    this.shown = true;
  }
}

/** `aeterna status` for a person. */
export function formatStatus(status: StatusReport): string {
  const rows: Array<[string, string]> = [];
  rows.push(['state', status.state]);
  rows.push(['service', `${status.service} (strategy ${status.strategy})`]);
  rows.push([
    'generation',
    status.pid === null ? `${status.generation} (not running)` : `${status.generation} (pid ${status.pid})`,
  ]);
  if (status.app_status != null) rows.push(['app status', status.app_status]);
  // service.instances > 1: one line per instance of the serving generation.
  if ((status.instances ?? []).length > 1)
    status.instances!.forEach((i, k) => rows.push([k === 0 ? 'instances' : '', describeInstance(i)]));
  rows.push([
    'uptime',
    `${formatDuration(status.uptime_ms)} (daemon pid ${status.daemon_pid}, since ${status.started_at})`,
  ]);
  if (status.listeners.length === 0) rows.push(['listeners', 'none']);
  status.listeners.forEach((l, i) => rows.push([i === 0 ? 'listeners' : '', `${l.name} ${l.address} (fd ${l.fd})`]));
  if (status.config_file) rows.push(['config', describeConfigFile(status.config_file)]);
  if (status.previous) rows.push(['previous', describeGeneration(status.previous)]);
  if (status.candidate) rows.push(['candidate', describeGeneration(status.candidate)]);
  (status.retiring ?? []).forEach((r, i) => rows.push([i === 0 ? 'retiring' : '', describeRetiring(r)]));
  if (status.canary_weight !== null)
    rows.push(['canary weight', `${status.canary_weight}% of new connections to the candidate`]);
  if (status.soak_remaining_ms != null)
    rows.push(['soak left', `${formatDuration(status.soak_remaining_ms)}, then the candidate is promoted`]);
  (status.generations ?? []).forEach((g, i) => rows.push([i === 0 ? 'resources' : '', describeUsage(g)]));
  rows.push(['restarts', String(status.restarts)]);
  if (status.last_crash) rows.push(['last crash', describeCrash(status.last_crash)]);
  if (status.checkpoint)
    rows.push([
      'checkpoint',
      `seq ${status.checkpoint.seq}, ${formatBytes(status.checkpoint.size)}, ${formatDuration(status.checkpoint.age_ms)} old`,
    ]);
  // With several instances each instance's line lists its own.
  if (status.fdstore.length > 0 && (status.instances ?? []).length <= 1)
    rows.push(['fd store', `${status.fdstore.length} fd(s): ${status.fdstore.join(', ')}`]);
  rows.push(['last reload', status.last_reload === null ? 'none' : describeLastReload(status.last_reload)]);
  const width = Math.max(...rows.map(([k]) => k.length)) + 2;
  // A value of several lines continues under its first.
  return (
    rows
      .map(([k, v]) => `${k ? `${k}:` : ''}`.padEnd(width) + v.replaceAll('\n', `\n${' '.repeat(width)}`))
      .join('\n') + '\n'
  );
}

/** "generation 4 (serving, pid 29): 54.3 MiB now, 60.1 MiB at most, CPU 1.25s, 3 processes (cgroup)". */
function describeUsage(g: GenerationUsage): string {
  const mib = (n: number | null | undefined): string => (n == null ? '?' : formatBytes(n));
  const from = g.memory_from === g.cpu_from ? (g.cpu_from ?? '?') : `memory ${g.memory_from}, CPU ${g.cpu_from}`;
  const cpu = g.cpu_seconds == null ? '?' : `${g.cpu_seconds.toFixed(2)}s`;
  return (
    `generation ${g.generation} (${g.role}, pid ${g.pid}): ${mib(g.memory_bytes)} now, ${mib(g.memory_peak_bytes)} at most, ` +
    `CPU ${cpu}, ${g.processes ?? '?'} process(es) (from ${from})`
  );
}

/** "generation 3 (pid 118) killed by SIGKILL (crashed) at ...: restarted after 1s", its stderr lines below. */
function describeCrash(c: CrashEvent): string {
  const how = c.exit.signal !== null ? `killed by ${c.exit.signal}` : `exited with code ${c.exit.code}`;
  const next = c.restart_in_ms === null ? 'Aeterna stopped' : `restarted after ${formatDuration(c.restart_in_ms)}`;
  const tail = (c.stderr_tail ?? []).map((l) => `\n  | ${l}`).join('');
  return `generation ${c.generation} (pid ${c.pid}) ${how} (${c.reason}) at ${c.at}: ${next}${tail}`;
}

/** The config file, and whether what Aeterna runs with (the listeners above included) is what it says. */
function describeConfigFile(file: NonNullable<StatusReport['config_file']>): string {
  const what = {
    applied: 'applied',
    changed: 'changed since it was applied: the next reload applies it',
    invalid: 'invalid: the next reload refuses it; Aeterna runs with the config it last applied',
    unreadable: 'cannot be read: Aeterna runs with the config it last applied',
  }[file.state];
  return `${file.path} (${what})`;
}

/** "1: pid 12, ready, 2 restarts, checkpoint 4 (1.2 KiB, 3s old), fd store: cache". */
function describeInstance(i: InstanceInfo): string {
  const restarts = i.restarts === 1 ? '1 restart' : `${i.restarts} restarts`;
  const c = i.checkpoint;
  const checkpoint = c ? `, checkpoint ${c.seq} (${formatBytes(c.size)}, ${formatDuration(c.age_ms)} old)` : '';
  const stored = (i.fdstore ?? []).length > 0 ? `, fd store: ${i.fdstore.join(', ')}` : '';
  return `${i.instance}: ${i.pid === null ? 'no process' : `pid ${i.pid}`}, ${i.state}, ${restarts}${checkpoint}${stored}`;
}

function describeGeneration(g: {
  generation: number;
  pid: number;
  started_at: string;
  ready: boolean;
  app_status?: string | null;
  instances?: InstanceInfo[];
}): string {
  const said = g.app_status != null ? `, status "${g.app_status}"` : '';
  const instances =
    g.instances !== undefined
      ? `, instances ${g.instances.map((i) => `${i.instance}: ${i.pid === null ? '-' : `pid ${i.pid}`} ${i.state}`).join(', ')}`
      : '';
  return `generation ${g.generation} (pid ${g.pid}), ${g.ready ? 'ready' : 'not ready'}, started ${g.started_at}${said}${instances}`;
}

function describeLastReload(r: ReloadRecord): string {
  if (r.outcome === 'in_progress') {
    const phase = r.phases.length > 0 ? r.phases[r.phases.length - 1].phase : 'accepted';
    return `${r.id} in progress (${r.strategy}, ${phase}), started ${r.started_at}`;
  }
  const [outcome = '', ...issues] = describeOutcome(r).text.split('\n');
  // Before the colon that introduces the issues below, if there is one.
  return [outcome.replace(/:?$/, ` (${r.trigger}, started ${r.started_at})$&`), ...issues].join('\n');
}
