// The validated, normalised form of aeterna.yaml. Everything downstream of the
// config loader works with this shape only: durations are milliseconds,
// addresses are parsed, defaults are filled in.

export type TcpAddress = { kind: 'tcp'; host: string; port: number; raw: string };
export type UnixAddress = { kind: 'unix'; path: string; raw: string };
export type ListenAddress = TcpAddress | UnixAddress;

export interface ListenerConfig {
  /** Unique, [A-Za-z0-9_.-]+; becomes the LISTEN_FDNAMES entry. */
  name: string;
  address: ListenAddress;
  backlog: number;
  /** File mode of a unix socket (e.g. 0o660); ignored for tcp. */
  mode: number;
}

export type RestartPolicy = 'always' | 'on-failure' | 'never';
export type Strategy = 'immediate' | 'canary';
export type ReadinessMode = 'notify' | 'delay' | 'exec';
export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'fatal' | 'silent';

export interface ServiceConfig {
  name: string;
  /** argv, no shell. Never empty. */
  command: string[];
  /** KEY=VALUE entries added to Aeterna's own environment. */
  env: string[];
  cwd?: string;
  /** User/group the app runs as (name or numeric id), dropped in the child before exec. */
  user?: string | number;
  group?: string | number;
  listeners: ListenerConfig[];
  /** Name of the listener also placed at the app's fd 0 (inetd style, Java's System.inheritedChannel()). */
  stdinListener?: string;
  stopTimeoutMs: number;
  /** One cgroup per generation where possible (read at start). */
  cgroups: boolean;
  restart: { policy: RestartPolicy; maxRestarts: number; windowMs: number };
  /** fds the app may park with Aeterna (FDSTORE=1); 0 = no fd store. */
  fdstoreMax: number;
  /** WatchdogSec=: the longest a ready generation may go without WATCHDOG=1; null = no watchdog. */
  watchdogMs: number | null;
  /** Processes per generation (1..64), each with AETERNA_INSTANCE; optional so that a config carried by an older Aeterna reads as 1. */
  instances?: number;
}

export interface ReadinessConfig {
  mode: ReadinessMode;
  timeoutMs: number;
  /** mode "delay": ready after this long if the process is still alive. */
  delayMs: number;
  /** mode "exec": probe argv, run until it exits 0. */
  command: string[];
  /** mode "exec": pause between probe runs. */
  intervalMs: number;
}

export interface StateHandoffConfig {
  enabled: boolean;
  socketPath: string;
  timeoutMs: number;
  /** Largest SRP frame accepted, checked before allocating. */
  maxFrameBytes: number;
  /** A reload whose old generation cannot dump: roll back, or go on with the latest checkpoint. */
  onDumpFailure: 'rollback' | 'checkpoint';
  checkpoint: CheckpointConfig;
}

/** The app's latest checkpoint, kept by Aeterna for a generation that starts with no live predecessor. */
export interface CheckpointConfig {
  enabled: boolean;
  /** Also written durably to this file (absolute), or null: memory only. */
  path: string | null;
  maxSizeBytes: number;
}

export interface WatchConfig {
  /** Absolute paths of the files and directories whose change triggers a reload. */
  paths: string[];
  /** Quiet time after the last change of a burst before the reload. */
  debounceMs: number;
}

export interface CanaryConfig {
  /** Percentage (1..99) of new TCP connections the new generation receives during the soak. */
  weight: number;
  /** How a connection is assigned: at random, or by a hash of the client address. */
  affinity: 'none' | 'client_ip';
}

export interface Config {
  /** Absolute path of the file this config was read from. */
  file: string;
  version: 'v1';
  service: ServiceConfig;
  orchestration: {
    strategy: Strategy;
    soakTimeMs: number;
    /** Generations alive at once at most (serving, new, and old ones still draining); 2 or more. */
    maxGenerations: number;
    /** New instances a rolling reload starts at a time; null: all at once. */
    maxSurge?: number | null;
    readiness: ReadinessConfig;
    stateHandoff: StateHandoffConfig;
    /** null when orchestration.watch is absent: no reloads on file change. */
    watch: WatchConfig | null;
    /** null when orchestration.canary is absent: one shared socket per listener, no split. */
    canary: CanaryConfig | null;
  };
  control: { socketPath: string };
  observability: {
    /** null when the endpoint is disabled ("" or absent). */
    metrics: { host: string; port: number } | null;
    logLevel: LogLevel;
    /** How the app's stdout and stderr reach Aeterna's (monitor/app-output.ts). */
    appOutput: AppOutputMode;
  };
}

/** observability.app_output: inherited as they are, each line prefixed, or each line a JSON record. */
export type AppOutputMode = 'raw' | 'prefixed' | 'json';
