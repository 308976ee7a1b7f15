// Semantic rules of aeterna.yaml that JSON Schema cannot express: uniqueness
// across list items, keys that only make sense for one mode, paths that must
// differ. schema.ts attaches each to the spec it governs (and states it in that
// key's description). A check also runs when parts of its subtree are invalid,
// so every issue shows in one run: those parts are undefined and not judged.
// Parameter types are structural, naming just what a check reads.

import { formatDuration } from './duration';
import type { CheckContext } from './spec';
import type { ListenAddress } from './types';
import { RESERVED_ENV } from '../app-env';

export function checkListener(listener: { address?: ListenAddress | undefined }, context: CheckContext): void {
  if (listener.address?.kind === 'tcp' && context.given('mode')) {
    context.report('mode', `applies only to unix:// listeners (got it on "${listener.address.raw}"); remove it`, 'key');
  }
}

type MaybeListener = { name?: string | undefined; address?: ListenAddress | undefined } | undefined;

export function checkListeners(listeners: MaybeListener[], context: CheckContext): void {
  const names = new Map<string, number>();
  const addresses = new Map<string, number>();
  listeners.forEach((listener, index) => {
    if (listener?.name === undefined) return;
    const firstName = names.get(listener.name);
    if (firstName === undefined) names.set(listener.name, index);
    else {
      context.report(
        `[${index}].name`,
        `duplicate listener name "${listener.name}" (already used at ${context.where(`[${firstName}].name`)}); names must be unique`,
      );
    }
  });
  listeners.forEach((listener, index) => {
    if (listener?.address === undefined) return;
    const key = addressKey(listener.address);
    const firstAddress = addresses.get(key);
    if (firstAddress === undefined) addresses.set(key, index);
    else {
      context.report(
        `[${index}].address`,
        `duplicate listener address "${listener.address.raw}" (already used at ${context.where(`[${firstAddress}].address`)}); ` +
          'an address can be bound only once',
      );
    }
  });
}

export function checkService(
  service: { stdin_listener?: string | undefined; listeners?: MaybeListener[] | undefined },
  context: CheckContext,
): void {
  const name = service.stdin_listener;
  if (name === undefined || service.listeners === undefined) return;
  if (service.listeners.some((listener) => listener?.name === name)) return;
  const names = service.listeners.flatMap((listener) => (listener?.name === undefined ? [] : [`"${listener.name}"`]));
  context.report(
    'stdin_listener',
    `names no listener (got "${name}"); expected one of service.listeners: ${names.length > 0 ? names.join(', ') : 'none is configured'}`,
  );
}

export function checkEnv(entries: (string | undefined)[], context: CheckContext): void {
  const seen = new Map<string, number>();
  entries.forEach((entry, index) => {
    if (entry === undefined) return;
    const key = entry.slice(0, entry.indexOf('='));
    if ((RESERVED_ENV as readonly string[]).includes(key)) {
      context.report(`[${index}]`, `${key} is set by Aeterna and cannot be set here (got "${entry}")`);
    }
    const first = seen.get(key);
    if (first === undefined) seen.set(key, index);
    else
      context.report(
        `[${index}]`,
        `${key} is already set at ${context.where(`[${first}]`)}; each KEY may appear once (got "${entry}")`,
      );
  });
}

export function checkReadiness(
  readiness: { mode?: string | undefined; timeout?: number | undefined; delay?: number | undefined; command?: unknown },
  context: CheckContext,
): void {
  if (readiness.mode === undefined) return;
  const modeOnly: [key: string, mode: string][] = [
    ['command', 'exec'],
    ['interval', 'exec'],
    ['delay', 'delay'],
  ];
  for (const [key, mode] of modeOnly) {
    if (readiness.mode !== mode && context.given(key)) {
      context.report(
        key,
        `applies only to mode ${mode} (got it with mode ${readiness.mode}); remove it or set mode: ${mode}`,
        'key',
      );
    }
  }
  if (readiness.mode === 'exec' && !context.given('command')) {
    context.report(
      'command',
      'is required when mode is exec; expected a non-empty list of strings, ' +
        'e.g. ["curl", "-fsS", "http://127.0.0.1:8080/health"] (got none)',
    );
  }
  const { delay, timeout } = readiness;
  if (readiness.mode === 'delay' && delay !== undefined && timeout !== undefined && delay >= timeout) {
    context.report(
      'delay',
      `must be shorter than timeout (${formatDuration(timeout)}), or the app can never be ready in time (got ${formatDuration(delay)})`,
    );
  }
}

export function checkConfig(
  config: {
    service?: { listeners?: MaybeListener[] | undefined } | undefined;
    orchestration?:
      | {
          state_handoff?: { enabled?: boolean | undefined; socket_path?: string | undefined } | undefined;
          canary?: object | undefined;
        }
      | undefined;
    control?: { socket_path?: string | undefined } | undefined;
  },
  context: CheckContext,
): void {
  // Every socket Aeterna binds needs its own path: a second bind would fail, or unlink the first.
  const stateHandoff = config.orchestration?.state_handoff;
  const sockets: [keyPath: string, socketPath: string | undefined][] = [
    ['control.socket_path', config.control?.socket_path],
  ];
  if (stateHandoff?.enabled === true)
    sockets.push(['orchestration.state_handoff.socket_path', stateHandoff.socket_path]);
  config.service?.listeners?.forEach((listener, index) => {
    if (listener?.address?.kind === 'unix')
      sockets.push([`service.listeners[${index}].address`, listener.address.path]);
  });
  // A reuseport group, which the weighted split steers, exists only for TCP.
  if (config.orchestration?.canary !== undefined) {
    config.service?.listeners?.forEach((listener, index) => {
      if (listener?.address?.kind === 'unix') {
        context.report(
          `service.listeners[${index}].address`,
          `orchestration.canary splits TCP connections only; listener "${listener.name ?? index}" is "${listener.address.raw}" ` +
            '(a unix socket cannot be split by weight: remove orchestration.canary or this listener)',
        );
      }
    });
  }
  const owners = new Map<string, string>();
  for (const [keyPath, socketPath] of sockets) {
    if (socketPath === undefined) continue;
    const owner = owners.get(socketPath);
    if (owner === undefined) owners.set(socketPath, keyPath);
    else
      context.report(
        keyPath,
        `socket path "${socketPath}" is already used by ${owner}; each socket needs its own path`,
      );
  }
}

function addressKey(address: ListenAddress): string {
  return address.kind === 'unix' ? `unix:${address.path}` : `tcp:${address.host.toLowerCase()}:${address.port}`;
}
