// What a generation uses: its memory and its CPU time, for `aeterna status` and the aeterna_app_* metrics. From its
// cgroup where it has one (cgroup v2: memory.current, memory.peak where the kernel has it, cpu.stat's usage_usec),
// else, or for what the cgroup does not count (no memory controller enabled for it), from /proc: the resident
// memory (VmRSS) and the CPU time (utime + stime) of its processes, which are those of its cgroup, or without one
// those of its session (a generation's root process starts a session of its own). Read on demand, never cached.
import fs from 'node:fs';
import path from 'node:path';

/** Processes read per generation at most (a fork bomb does not make one status slow). */
export const MAX_PROCESSES_READ = 4096;
/** The kernel's clock ticks per second for /proc's CPU times (USER_HZ: 100 on every Linux Aeterna runs on). */
const USER_HZ = 100;

export interface GenerationResources {
  /** Memory in use now, bytes: the cgroup's memory.current, else the sum of its processes' resident memory. */
  memory_bytes: number | null;
  /**
   * The most memory it used, bytes: the cgroup's memory.peak, else the sum of its processes' own peaks (VmHWM: an
   * upper bound, each peak may have come at another time); null when neither can be read.
   */
  memory_peak_bytes: number | null;
  /** CPU time used since it started, seconds (user + system): the cgroup's cpu.stat, else its processes' (live ones, and the root's reaped children). */
  cpu_seconds: number | null;
  /** Where each figure came from. */
  memory_from: 'cgroup' | 'proc';
  cpu_from: 'cgroup' | 'proc';
  /** How many processes it has now (read from /proc or cgroup.procs, at most MAX_PROCESSES_READ). */
  processes: number;
}

function readNumber(file: string): number | null {
  try {
    const n = Number(fs.readFileSync(file, 'utf8').trim());
    return Number.isFinite(n) ? n : null;
  } catch {
    return null;
  }
}

function cgroupCpuSeconds(dir: string): number | null {
  try {
    const m = /^usage_usec (\d+)$/m.exec(fs.readFileSync(path.join(dir, 'cpu.stat'), 'utf8'));
    return m === null ? null : Number(m[1]) / 1e6;
  } catch {
    return null;
  }
}

function cgroupPids(dir: string): number[] {
  try {
    return fs
      .readFileSync(path.join(dir, 'cgroup.procs'), 'utf8')
      .split('\n')
      .filter(Boolean)
      .slice(0, MAX_PROCESSES_READ)
      .map(Number);
  } catch {
    return [];
  }
}

/** The processes of the session `root` leads (its generation, without a cgroup). */
function sessionPids(root: number): number[] {
  const pids: number[] = [];
  let entries: string[];
  try {
    entries = fs.readdirSync('/proc');
  } catch {
    return [root];
  }
  for (const entry of entries) {
    if (pids.length >= MAX_PROCESSES_READ) break;
    if (!/^\d+$/.test(entry)) continue;
    const stat = statFields(Number(entry));
    if (stat !== null && (Number(entry) === root || Number(stat[3]) === root)) pids.push(Number(entry));
  }
  return pids;
}

/** /proc/<pid>/stat's fields from the state on (index 0 = state, 1 = ppid, 3 = session, 11 = utime, 13 = cutime). */
function statFields(pid: number): string[] | null {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return text.slice(text.lastIndexOf(')') + 2).split(' ');
  } catch {
    return null;
  }
}

/** VmRSS and VmHWM of a process, bytes. */
function memoryOf(pid: number): { rss: number; hwm: number } | null {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB$`, 'm').exec(status)?.[1] ?? 0);
    return { rss: kb('VmRSS') * 1024, hwm: kb('VmHWM') * 1024 };
  } catch {
    return null;
  }
}

/** What generation `root` (its cgroup `cgroupDir`, or null) uses now. */
export function generationResources(root: number, cgroupDir: string | null): GenerationResources {
  const pids = cgroupDir !== null ? cgroupPids(cgroupDir) : sessionPids(root);
  const cgMemory = cgroupDir === null ? null : readNumber(path.join(cgroupDir, 'memory.current'));
  const cgPeak = cgroupDir === null ? null : readNumber(path.join(cgroupDir, 'memory.peak'));
  const cgCpu = cgroupDir === null ? null : cgroupCpuSeconds(cgroupDir);
  let rss = 0;
  let hwm = 0;
  let ticks = 0;
  let read = 0;
  if (cgMemory === null || cgCpu === null) {
    for (const pid of pids) {
      const memory = cgMemory === null ? memoryOf(pid) : null;
      if (memory !== null) {
        rss += memory.rss;
        hwm += memory.hwm;
        read++;
      }
      if (cgCpu === null) {
        const f = statFields(pid);
        if (f !== null) {
          ticks += Number(f[11]) + Number(f[12]);
          if (pid === root) ticks += Number(f[13]) + Number(f[14]); // its reaped children's
        }
      }
    }
  }
  const fromProc = read > 0;
  return {
    memory_bytes: cgMemory ?? (fromProc ? rss : null),
    memory_peak_bytes: cgMemory !== null ? cgPeak : fromProc ? hwm : null,
    cpu_seconds: cgCpu ?? (pids.length > 0 ? ticks / USER_HZ : null),
    memory_from: cgMemory !== null ? 'cgroup' : 'proc',
    cpu_from: cgCpu !== null ? 'cgroup' : 'proc',
    processes: pids.length,
  };
}
