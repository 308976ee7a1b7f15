// Which generation a process belongs to. Where generations have cgroups
// (cgroup.ts), a process belongs to the generation whose cgroup it is in: it
// cannot shed that. Otherwise: a generation's root runs setsid(), so its
// descendants share its session id unless they start a session of their own;
// for those we also walk the parent chain. Used to attribute sd_notify
// datagrams and SRP connections to a generation, by the pid the kernel reports.
import fs from 'node:fs';
import { cgroupOf, generationCgroupOf } from './cgroup';

export interface ProcStat {
  pid: number;
  state: string;
  ppid: number;
  pgrp: number;
  sid: number;
}

export function procStat(pid: number): ProcStat | null {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return { pid, state: fields[0], ppid: Number(fields[1]), pgrp: Number(fields[2]), sid: Number(fields[3]) };
  } catch {
    return null;
  }
}

/** Whether pid is root itself or one of its descendants (alive now). */
export function belongsTo(pid: number, root: number): boolean {
  if (pid === root) return true;
  const group = generationCgroupOf(root);
  if (group !== null) {
    const own = cgroupOf(pid);
    return own !== null && (own === group || own.startsWith(`${group}/`));
  }
  let stat = procStat(pid);
  if (stat === null) return false;
  if (stat.sid === root) return true;
  for (let depth = 0; depth < 64 && stat !== null; depth++) {
    if (stat.ppid === root) return true;
    if (stat.ppid <= 1) return false;
    stat = procStat(stat.ppid);
  }
  return false;
}

/**
 * Pids of live processes below `ancestor` whose environment has NAME=value, and each `also` entry (NAME=value) too
 * where it has that NAME at all (a process started by an Aeterna before it lacks it) (best effort: unreadable ones
 * are skipped).
 */
export function descendantsWithEnv(ancestor: number, name: string, value: string, also: string[] = []): number[] {
  const wanted = `${name}=${value}`;
  const found: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid === ancestor) continue;
    let environ: string;
    try {
      environ = fs.readFileSync(`/proc/${pid}/environ`, 'latin1');
    } catch {
      continue;
    }
    const entries = environ.split('\0');
    const matches = (e: string): boolean =>
      entries.includes(e) || !entries.some((x) => x.startsWith(e.slice(0, e.indexOf('=') + 1)));
    if (entries.includes(wanted) && also.every(matches) && belongsTo(pid, ancestor)) found.push(pid);
  }
  return found;
}

/** Live (not yet exited) children of pid: for Aeterna, its own children and every orphan re-parented to it. */
export function childrenOf(parent: number): number[] {
  const found: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = procStat(Number(entry));
    if (stat !== null && stat.ppid === parent && stat.state !== 'Z') found.push(stat.pid);
  }
  return found;
}
