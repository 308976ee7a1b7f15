// Listener addresses ("tcp://host:port", "tcp://[v6]:port", "unix:///path")
// and the metrics endpoint's "[host]:port". Parsers return the parsed value or
// an error text that says what was expected and what was found, so the config
// loader and the CLI can both report it as is.

import { isIPv4, isIPv6 } from 'node:net';
import path from 'node:path';
import type { ListenAddress } from './types';

export const LISTEN_ADDRESS_FORM = 'tcp://host:port, tcp://[v6]:port or unix:///absolute/path';
export const HOST_PORT_FORM = '[host]:port, e.g. ":9091", "127.0.0.1:9091" or "[::1]:9091"';

/** sockaddr_un.sun_path is 108 bytes on Linux, one of which is the NUL. */
export const UNIX_PATH_MAX_BYTES = 107;

// Loose shapes for the JSON Schema (editors); the parsers below are the real check.
export const LISTEN_ADDRESS_PATTERN = '^(tcp://(\\[[0-9A-Za-z:.%]+\\]|[^\\[\\]:/]+):[0-9]{1,5}|unix://.+)$';
export const HOST_PORT_PATTERN = '^((\\[[0-9A-Za-z:.%]+\\]|[^\\[\\]:/]*):[0-9]{1,5})?$';

// RFC 1123 labels, plus "_" which container runtimes allow in service names.
const HOST_NAME_RE =
  /^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$/;

/**
 * Parses a listener address. A relative unix path is resolved against
 * `baseDir` (the config file's directory); without `baseDir` it is an error.
 */
export function parseAddress(text: string, baseDir?: string): ListenAddress | string {
  if (text.startsWith('tcp://')) {
    const hostPort = splitHostPort(text.slice('tcp://'.length), text, LISTEN_ADDRESS_FORM);
    if (typeof hostPort === 'string') return hostPort;
    if (hostPort.host === '') {
      return `host is missing; write it out, e.g. tcp://0.0.0.0:${hostPort.port} for all IPv4 interfaces (got "${text}")`;
    }
    return { kind: 'tcp', host: hostPort.host, port: hostPort.port, raw: text };
  }
  if (text.startsWith('unix://')) {
    const written = text.slice('unix://'.length);
    if (written.startsWith('@')) return `abstract unix sockets are not supported; use a file path (got "${text}")`;
    const socketPath = resolveSocketPath(written, baseDir);
    if (socketPath.error !== undefined) return socketPath.error;
    return { kind: 'unix', path: socketPath.path, raw: text };
  }
  return `must be ${LISTEN_ADDRESS_FORM} (got "${text}")`;
}

/** Parses "[host]:port"; an omitted host is `defaultHost`. */
export function parseHostPort(text: string, defaultHost = '0.0.0.0'): { host: string; port: number } | string {
  const hostPort = splitHostPort(text, text, HOST_PORT_FORM);
  if (typeof hostPort === 'string') return hostPort;
  return { host: hostPort.host === '' ? defaultHost : hostPort.host, port: hostPort.port };
}

/**
 * Resolves and checks a unix socket path: relative paths are taken against
 * `baseDir`, and the result must fit in sun_path.
 */
export function resolveSocketPath(
  written: string,
  baseDir?: string,
): { path: string; error?: undefined } | { path?: undefined; error: string } {
  if (written === '') return { error: 'socket path is empty' };
  if (written.includes('\0')) return { error: 'socket path contains a NUL byte' };
  if (!path.isAbsolute(written) && baseDir === undefined) {
    return { error: `socket path must be absolute (got "${written}")` };
  }
  const resolved = path.resolve(baseDir ?? '/', written);
  const bytes = Buffer.byteLength(resolved);
  if (bytes > UNIX_PATH_MAX_BYTES) {
    return {
      error: `socket path must be at most ${UNIX_PATH_MAX_BYTES} bytes, the sun_path limit (got ${bytes} bytes: "${resolved}")`,
    };
  }
  return { path: resolved };
}

/** Splits "host:port" / "[v6]:port"; `whole` and `form` are for error texts. Host may be ''. */
function splitHostPort(text: string, whole: string, form: string): { host: string; port: number } | string {
  let host: string;
  let portText: string;
  if (text.startsWith('[')) {
    const close = text.indexOf(']');
    if (close < 0 || text[close + 1] !== ':') return `must be ${form} (got "${whole}")`;
    host = text.slice(1, close);
    portText = text.slice(close + 2);
    if (!isIPv6(host)) return `"${host}" in brackets is not an IPv6 address (got "${whole}")`;
  } else {
    const colon = text.lastIndexOf(':');
    if (colon < 0) return `must be ${form} (got "${whole}")`;
    host = text.slice(0, colon);
    portText = text.slice(colon + 1);
    if (host.includes(':')) return `an IPv6 host must be in brackets, e.g. [::1]:8080 (got "${whole}")`;
    const hostError = checkHost(host);
    if (hostError !== null) return `${hostError} (got "${whole}")`;
  }
  const port = /^[0-9]{1,5}$/.test(portText) ? Number(portText) : NaN;
  if (port === 0) {
    return `port must be from 1 to 65535 (got 0: port 0 picks a random port at every start, and clients need a fixed one)`;
  }
  if (!(port >= 1 && port <= 65535)) return `port must be an integer from 1 to 65535 (got "${portText}")`;
  return { host, port };
}

function checkHost(host: string): string | null {
  if (host === '' || isIPv4(host)) return null;
  if (/^[0-9.]+$/.test(host)) return `host "${host}" is not a valid IPv4 address`;
  if (!HOST_NAME_RE.test(host))
    return `host "${host}" must be a host name, an IPv4 address or an IPv6 address in brackets`;
  return null;
}
