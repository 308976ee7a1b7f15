// A small, typed language for describing a config schema as data. A Spec is
// plain data that two walkers read: the validator (validate.ts), which turns
// YAML into typed values, and the JSON Schema generator (json-schema.ts). Each
// Spec<T> also carries, at type level only, the type T the validator produces,
// so code consuming the validated tree is checked against the schema itself.

import type { ListenAddress } from './types';
import { parseDuration } from './duration';

/** Lets a semantic check look at and report on the subtree it is attached to. */
export interface CheckContext {
  /** Whether `relativePath` (e.g. "command", "[1].name") was written in the file, as opposed to defaulted. */
  given(relativePath: string): boolean;
  /** "line:column" of `relativePath` in the file, for messages such as "already used at 4:9". */
  where(relativePath: string): string;
  /**
   * Reports an issue at `relativePath`: its value, or its key with at = 'key'. A path not
   * written in the file (a missing key) is reported at the nearest written ancestor.
   */
  report(relativePath: string, message: string, at?: 'key' | 'value'): void;
}

interface SpecBase<T> {
  /** Shown by editors (JSON Schema) and used in the docs of the example config. */
  readonly description: string;
  /** What error messages say is expected; derived from the kind when absent. */
  readonly form?: string;
  /** An example value in the file's own form; shown in JSON Schema and in type errors. */
  readonly example?: unknown;
  /**
   * A semantic check JSON Schema cannot express. It runs whenever the subtree has the right
   * shape, even if parts of it are invalid (those are undefined), so that every issue is
   * reported in one run. (Method syntax on purpose: keeps Spec<T> covariant in T.)
   */
  check?(value: Loose<T>, context: CheckContext): void;
  /** Type-level only: the validated value's type. Never set. */
  readonly __type?: T;
}

export type SpecKind =
  | { kind: 'string'; pattern?: string; maxLength?: number; allowEmpty?: boolean }
  | { kind: 'enum'; values: readonly string[] }
  | { kind: 'integer'; minimum: number; maximum: number }
  | { kind: 'boolean' }
  | { kind: 'duration'; minimumMs: number; maximumMs: number }
  | { kind: 'size'; minimumBytes: number; maximumBytes: number }
  | { kind: 'list'; items: Spec; minItems: number }
  | { kind: 'object'; fields: Readonly<Record<string, Field>> }
  /** tcp://host:port | tcp://[v6]:port | unix:///path; relative unix paths resolve against the config dir. */
  | { kind: 'listenAddress' }
  /** "[host]:port"; "" means disabled (null). */
  | { kind: 'hostPort' }
  /** A unix socket path; relative paths resolve against the config dir. */
  | { kind: 'socketPath' }
  /** A directory path; relative paths resolve against the config dir. */
  | { kind: 'directory' }
  /** A file or directory path; relative paths resolve against the config dir. */
  | { kind: 'path' }
  /** A user or group: a name, or a numeric id (digit strings become numbers). */
  | { kind: 'account' }
  /** An octal file mode string such as "0660". */
  | { kind: 'fileMode' };

export type Spec<T = unknown> = SpecKind & SpecBase<T>;

/**
 * A value as a check sees it: any part that failed validation is undefined. Values parsed
 * from one scalar (addresses, tagged by `kind`) are whole or undefined.
 */
export type Loose<T> = T extends readonly (infer U)[]
  ? (Loose<U> | undefined)[]
  : T extends { kind: string } | null
    ? T
    : T extends object
      ? { [K in keyof T]?: Loose<T[K]> | undefined }
      : T;

export type Field<T = unknown> =
  | { readonly presence: 'required'; readonly spec: Spec<T> }
  | { readonly presence: 'optional'; readonly spec: Spec<T> }
  /** `value` is in the file's own form ("30s", "16MiB") and goes through the same validation. */
  | { readonly presence: 'default'; readonly spec: Spec<T>; readonly value: unknown };

/** The validated type of a spec. */
export type TypeOf<S> = S extends Spec<infer T> ? T : never;

type FieldType<F> = F extends { presence: 'optional'; spec: Spec<infer T> }
  ? T | undefined
  : F extends { spec: Spec<infer T> }
    ? T
    : never;

export type ObjectType<F extends Readonly<Record<string, Field>>> = { -readonly [K in keyof F]: FieldType<F[K]> };

// ---- fields ---------------------------------------------------------------

export function required<T>(spec: Spec<T>): { presence: 'required'; spec: Spec<T> } {
  return { presence: 'required', spec };
}

export function optional<T>(spec: Spec<T>): { presence: 'optional'; spec: Spec<T> } {
  return { presence: 'optional', spec };
}

export function withDefault<T>(spec: Spec<T>, value: unknown): { presence: 'default'; spec: Spec<T>; value: unknown } {
  return { presence: 'default', spec, value };
}

// ---- specs ----------------------------------------------------------------

// NoInfer in builders: a check's parameter type must not narrow the inferred value type.
type Meta<T> = Omit<SpecBase<T>, '__type'>;

export function string(
  meta: Meta<string> & { pattern?: string; maxLength?: number; allowEmpty?: boolean },
): Spec<string> {
  return { kind: 'string', ...meta };
}

export function oneOf<const V extends string>(meta: Meta<V> & { values: readonly V[] }): Spec<V> {
  return { kind: 'enum', ...meta };
}

export function integer(meta: Meta<number> & { minimum: number; maximum: number }): Spec<number> {
  return { kind: 'integer', ...meta };
}

export function boolean(meta: Meta<boolean>): Spec<boolean> {
  return { kind: 'boolean', ...meta };
}

/** Bounds are written as durations ("0s", "24h") and kept in ms. */
export function duration(meta: Meta<number> & { minimum: string; maximum: string }): Spec<number> {
  const { minimum, maximum, ...rest } = meta;
  return { kind: 'duration', ...rest, minimumMs: durationConstant(minimum), maximumMs: durationConstant(maximum) };
}

export function size(meta: Meta<number> & { minimumBytes: number; maximumBytes: number }): Spec<number> {
  return { kind: 'size', ...meta };
}

export function list<T>(meta: Meta<NoInfer<T[]>> & { items: Spec<T>; minItems?: number }): Spec<T[]> {
  return { kind: 'list', minItems: 0, ...meta };
}

export function object<const F extends Readonly<Record<string, Field>>>(
  meta: Meta<NoInfer<ObjectType<F>>> & { fields: F },
): Spec<ObjectType<F>> {
  return { kind: 'object', ...meta };
}

export function listenAddress(meta: Meta<ListenAddress>): Spec<ListenAddress> {
  return { kind: 'listenAddress', ...meta };
}

export function hostPort(
  meta: Meta<{ host: string; port: number } | null>,
): Spec<{ host: string; port: number } | null> {
  return { kind: 'hostPort', ...meta };
}

export function socketPath(meta: Meta<string>): Spec<string> {
  return { kind: 'socketPath', ...meta };
}

export function directory(meta: Meta<string>): Spec<string> {
  return { kind: 'directory', ...meta };
}

export function fsPath(meta: Meta<string>): Spec<string> {
  return { kind: 'path', ...meta };
}

export function account(meta: Meta<string | number>): Spec<string | number> {
  return { kind: 'account', ...meta };
}

export function fileMode(meta: Meta<number>): Spec<number> {
  return { kind: 'fileMode', ...meta };
}

function durationConstant(text: string): number {
  const ms = parseDuration(text);
  if (ms === null) throw new Error(`schema bug: "${text}" is not a duration`);
  return ms;
}

// ---- forms shared by both walkers for kinds without a module of their own ----

/** POSIX-ish user/group names (useradd's default rule, plus a trailing "$" for machine accounts). */
export const ACCOUNT_NAME_PATTERN = '^[A-Za-z_][A-Za-z0-9_.-]{0,31}\\$?$';
/** (uid_t)-1 means "leave unchanged" to setresuid, so it is not a usable id. */
export const ACCOUNT_ID_MAX = 4294967294;
export const FILE_MODE_PATTERN = '^0?[0-7]{3}$';
