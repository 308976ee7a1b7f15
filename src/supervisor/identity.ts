// Who the app runs as: service.user and service.group resolved to numeric ids.
import { native } from '../native/binding';
import { AeternaError } from '../errors';

export interface Identity {
  uid: number;
  gid: number;
  groups: number[];
}

/** Resolve service.user/group (names or numeric ids) before fork: name lookups are not async-signal-safe. */
export function resolveIdentity(user?: string | number, group?: string | number): Identity | undefined {
  if (user === undefined && group === undefined) return undefined;
  let uid = process.getuid?.() ?? 0;
  let gid = process.getgid?.() ?? 0;
  let groups: number[] = [];
  if (typeof user === 'number' || (typeof user === 'string' && /^\d+$/.test(user))) {
    uid = Number(user);
    gid = uid; // a bare uid has no passwd entry to name its group: use the same number unless service.group says otherwise
    groups = [gid];
  } else if (typeof user === 'string') {
    const found = native.lookupUser(user);
    if (!found) throw new AeternaError('E_SPAWN_FAILED', `service.user: unknown user "${user}"`);
    ({ uid, gid, groups } = found);
  }
  if (typeof group === 'number' || (typeof group === 'string' && /^\d+$/.test(group))) {
    gid = Number(group);
    groups = [gid];
  } else if (typeof group === 'string') {
    const found = native.lookupGroup(group);
    if (found === null) throw new AeternaError('E_SPAWN_FAILED', `service.group: unknown group "${group}"`);
    gid = found;
    groups = [gid];
  }
  return { uid, gid, groups };
}
