// The schema of aeterna.yaml, defined once, as data. The loader validates with
// it, scripts/gen-config-schema.ts derives configs/aeterna.schema.json from it, and its types
// are inferred from it. Rules JSON Schema cannot express are the `check`s
// (checks.ts); each is also stated in the description of the key it governs.

import { checkConfig, checkEnv, checkListener, checkListeners, checkReadiness, checkService } from './checks';
import { RESERVED_ENV } from '../app-env';
import {
  account,
  boolean,
  directory,
  duration,
  fileMode,
  fsPath,
  hostPort,
  integer,
  list,
  listenAddress,
  object,
  oneOf,
  optional,
  required,
  size,
  socketPath,
  string,
  withDefault,
  type TypeOf,
} from './spec';
import { DEFAULT_CONTROL_SOCKET, DEFAULT_STATE_SOCKET, ROOT_RUNTIME_DIR } from './runtime-dir';

const RELATIVE = 'A relative path is taken relative to the directory of the config file.';
const NON_ROOT_DEFAULT =
  'The default is for root; as another user it is the same file name in $XDG_RUNTIME_DIR/aeterna, or in /tmp/aeterna-<uid> (created 0700).';

/** One argv word: execve cannot take an empty or NUL-containing one. */
const argvWord = string({ description: 'One argument, passed as is (no shell: no quoting, globbing or $VARS).' });

const listener = object({
  description:
    'A socket Aeterna creates and owns. It stays open across reloads, so no connection is refused while the app is replaced. ' +
    'Names and addresses must be unique among listeners.',
  fields: {
    name: required(
      string({
        description: 'Unique name of the listener, passed to the app in LISTEN_FDNAMES (sd_listen_fds_with_names).',
        form: 'a name of letters, digits, "_", "." or "-"',
        pattern: '^[A-Za-z0-9_.-]+$',
        maxLength: 255,
        example: 'http',
      }),
    ),
    address: required(
      listenAddress({
        description:
          'Where to listen: tcp://host:port, tcp://[v6]:port or unix:///path. host is a name, an IPv4 address or a ' +
          'bracketed IPv6 address (0.0.0.0 or [::] for all interfaces); port is 1..65535 (0 is refused: clients need a ' +
          'fixed port). A unix path may have at most 107 bytes (sun_path); unix://relative/path is taken relative to ' +
          'the directory of the config file.',
        example: 'tcp://0.0.0.0:8080',
      }),
    ),
    backlog: withDefault(
      integer({
        description: 'Length of the queue of not yet accepted connections (listen(2) backlog).',
        minimum: 1,
        maximum: 65535,
      }),
      1024,
    ),
    mode: withDefault(
      fileMode({
        description:
          'File mode of a unix socket, as a quoted octal string. Only for unix:// addresses: an error on a tcp listener.',
        example: '0660',
      }),
      '0660',
    ),
  },
  check: checkListener,
});

const restart = object({
  description: 'What to do when the app exits on its own.',
  fields: {
    policy: withDefault(
      oneOf({
        description:
          'always: restart on any exit; on-failure: restart unless it exited with status 0; never: Aeterna exits with the app.',
        values: ['always', 'on-failure', 'never'],
      }),
      'on-failure',
    ),
    max_restarts: withDefault(
      integer({
        description: 'Restarts allowed within `window`; one more and Aeterna gives up (E_CRASH_LOOP).',
        minimum: 0,
        maximum: 1000,
      }),
      5,
    ),
    window: withDefault(
      duration({ description: 'The sliding window max_restarts is counted in.', minimum: '1ms', maximum: '24h' }),
      '60s',
    ),
  },
});

const service = object({
  description: 'The app Aeterna runs, and the sockets it serves on.',
  fields: {
    name: required(
      string({
        description: 'Name of the service, used in logs and metrics.',
        form: 'a non-empty string without control characters',
        pattern: '^[^\\u0000-\\u001f\\u007f]+$',
        maxLength: 255,
        example: 'llm-inference-agent',
      }),
    ),
    command: required(
      list({
        description:
          "The app's argv, run without a shell. argv[0] is kept as written; " +
          'one without "/" is searched in PATH when the app is started.',
        items: argvWord,
        minItems: 1,
        form: 'a non-empty list of strings',
        example: ['/app/venv/bin/python', 'main.py'],
      }),
    ),
    env: withDefault(
      list({
        description:
          'KEY=VALUE entries added to the environment Aeterna passes to the app (its own environment). ' +
          `Each KEY at most once; ${RESERVED_ENV.join(', ')} are set by Aeterna and cannot be set here.`,
        items: string({
          description: 'One KEY=VALUE entry.',
          form: 'a KEY=VALUE string (KEY: letters, digits and "_", not starting with a digit)',
          pattern: '^[A-Za-z_][A-Za-z0-9_]*=',
          example: 'MODEL_PATH=/models/llama3',
        }),
        form: 'a list of KEY=VALUE strings',
        example: ['MODEL_PATH=/models/llama3'],
        check: checkEnv,
      }),
      [],
    ),
    cwd: optional(
      directory({
        description: `Working directory of the app; Aeterna's own when absent. ${RELATIVE}`,
        example: '/app',
      }),
    ),
    user: optional(
      account({
        description:
          'User the app runs as: a name or a numeric uid (a digit string counts as an id). ' +
          'Switching user needs Aeterna to run as root.',
        example: 'app',
      }),
    ),
    group: optional(
      account({
        description: 'Group the app runs as: a name or a numeric gid (a digit string counts as an id).',
        example: 'app',
      }),
    ),
    listeners: withDefault(
      list({
        description:
          'Sockets Aeterna owns, passed to the app as fds 3, 4, ... in this order (LISTEN_FDS). ' +
          'Names and addresses must be unique.',
        items: listener,
        form: 'a list of listeners (mappings with name and address)',
        check: checkListeners,
      }),
      [],
    ),
    stdin_listener: optional(
      string({
        description:
          "Name of a listener Aeterna also places at fd 0 (stdin), as systemd's StandardInput=socket does for inetd-style " +
          "programs: Java's System.inheritedChannel() then returns it as a ServerSocketChannel. It stays at its fd 3.. " +
          'position too, with LISTEN_FDS as usual. Must name one of service.listeners.',
        form: 'the name of a listener in service.listeners',
        pattern: '^[A-Za-z0-9_.-]+$',
        maxLength: 255,
        example: 'http',
      }),
    ),
    stop_timeout: withDefault(
      duration({
        description: 'How long the app has to exit after SIGTERM (when stopping or draining) before SIGKILL.',
        minimum: '0s',
        maximum: '24h',
      }),
      '30s',
    ),
    restart: withDefault(restart, {}),
    instances: withDefault(
      integer({
        description:
          'How many processes of the app each generation runs, all on the same listeners (fd 3..): the kernel spreads ' +
          'the accepted connections over them. Each gets AETERNA_INSTANCE (0..instances-1) in its environment, its own ' +
          'state relay connection, watchdog and cgroup; one that crashes is restarted alone (service.restart counts per ' +
          'instance). A fixed number (no "auto": size it to the CPU quota of the container yourself).',
        minimum: 1,
        maximum: 64,
      }),
      1,
    ),
    fdstore_max: withDefault(
      integer({
        description:
          "How many fds the app may park with Aeterna (sd_notify FDSTORE=1, as systemd's FileDescriptorStoreMax=); " +
          'every later generation gets them after the listeners, in LISTEN_FDS and LISTEN_FDNAMES. 0: no fd store.',
        minimum: 0,
        maximum: 4096,
      }),
      0,
    ),
    watchdog: optional(
      duration({
        description:
          "As systemd's WatchdogSec=: a ready generation must send WATCHDOG=1 within this interval (it gets WATCHDOG_USEC " +
          'and WATCHDOG_PID), or it gets SIGABRT (SIGKILL after stop_timeout) and counts as crashed. Absent: no watchdog.',
        minimum: '1ms',
        maximum: '24h',
      }),
    ),
    cgroups: withDefault(
      boolean({
        description:
          "Put each generation in a cgroup (v2) of its own, below Aeterna's cgroup, where the hierarchy is writable: " +
          'every process of a generation, daemonized ones included, is then ended with it. false, or where cgroups ' +
          'cannot be created: process group, session and AETERNA_GENERATION only (see docs/security.md). Read at start.',
      }),
      true,
    ),
  },
  check: checkService,
});

const readiness = object({
  description:
    'How Aeterna learns that a new generation is ready. Keys for another mode are errors, not ignored: ' +
    'command and interval only with mode exec (where command is required), ' +
    'delay only with mode delay (where it must be shorter than timeout).',
  fields: {
    mode: withDefault(
      oneOf({
        description:
          'notify: the app sends READY=1 on NOTIFY_SOCKET (sd_notify); delay: ready after `delay` if still running; ' +
          'exec: ready when `command` exits with status 0.',
        values: ['notify', 'delay', 'exec'],
      }),
      'notify',
    ),
    timeout: withDefault(
      duration({
        description: 'How long a new generation may take to become ready before the reload fails (E_READY_TIMEOUT).',
        minimum: '1ms',
        maximum: '24h',
      }),
      '30s',
    ),
    delay: withDefault(
      duration({
        description: 'mode delay only: how long the app must stay up to count as ready.',
        minimum: '0s',
        maximum: '24h',
      }),
      '1s',
    ),
    command: optional(
      list({
        description:
          'mode exec only (and required there): the probe argv, run without a shell until it exits with status 0.',
        items: argvWord,
        minItems: 1,
        form: 'a non-empty list of strings',
        example: ['curl', '-fsS', 'http://127.0.0.1:8080/health'],
      }),
    ),
    interval: withDefault(
      duration({
        description: 'mode exec only: pause between probe runs (at least 10ms, so a probe cannot spin).',
        minimum: '10ms',
        maximum: '1h',
      }),
      '1s',
    ),
  },
  check: checkReadiness,
});

const stateHandoff = object({
  description: "Relay of the old generation's in-memory state to the new one over a unix socket, during a reload.",
  fields: {
    enabled: withDefault(boolean({ description: 'Whether the state relay runs during reloads.' }), false),
    socket_path: withDefault(
      socketPath({
        description: `Unix socket of the state relay; must differ from control.socket_path and from listener paths. ${RELATIVE} ${NON_ROOT_DEFAULT}`,
      }),
      `${ROOT_RUNTIME_DIR}/${DEFAULT_STATE_SOCKET}`,
    ),
    timeout: withDefault(
      duration({ description: 'How long the whole state transfer may take.', minimum: '1ms', maximum: '24h' }),
      '10s',
    ),
    max_frame: withDefault(
      size({
        description:
          'Largest state frame accepted, checked before allocating: a number of bytes, or a number with unit B, KiB, MiB or GiB.',
        minimumBytes: 1024,
        maximumBytes: 1024 ** 3,
        example: '16MiB',
      }),
      '16MiB',
    ),
    on_dump_failure: withDefault(
      oneOf({
        description:
          'When the old generation cannot dump its state at a reload (hung past timeout, killed, or it refused): ' +
          'rollback: the reload rolls back, the old generation serves on; ' +
          'checkpoint: the new generation loads the latest checkpoint instead (source "checkpoint") and the reload ' +
          'goes on; with no checkpoint stored it rolls back.',
        values: ['rollback', 'checkpoint'],
      }),
      'rollback',
    ),
    checkpoint: withDefault(
      object({
        description:
          "Checkpoints: the app's SDK stores its latest state in Aeterna (relay.checkpoint()), and a generation started " +
          'with no live predecessor (a restart after a crash, kill -9, OOM or watchdog) loads it instead of an empty state.',
        fields: {
          enabled: withDefault(
            boolean({ description: 'Whether apps may store checkpoints (announced to them in welcome).' }),
            false,
          ),
          path: optional(
            fsPath({
              description: `File the latest checkpoint is also written to, durably, before it is acknowledged. ${RELATIVE} Absent: kept in memory only.`,
              example: '/var/lib/aeterna/checkpoint',
            }),
          ),
          max_size: withDefault(
            size({
              description:
                'Largest checkpoint accepted; a larger one is refused (code too_large) and the previous one kept.',
              minimumBytes: 1,
              maximumBytes: 64 * 1024 ** 3,
              example: '1GiB',
            }),
            '1GiB',
          ),
        },
      }),
      {},
    ),
  },
});

const watch = object({
  description:
    'Reload when a watched file or directory changes, exactly as SIGHUP does (trigger "watch"): content written, a ' +
    'rename over it, or a symlink re-pointed (the ..data swap of a Kubernetes ConfigMap volume). One reload per burst ' +
    'of changes; a change during a reload queues one more. A path that does not exist yet is logged and watched for: ' +
    'its appearance reloads. Absent: no watching. Read at start and after each promoted reload.',
  fields: {
    paths: required(
      list({
        description: `Files or directories to watch (a directory: any change of an entry in it, not below). ${RELATIVE}`,
        items: fsPath({ description: 'A file or directory to watch.', example: '/etc/aeterna/aeterna.yaml' }),
        minItems: 1,
        form: 'a non-empty list of paths',
        example: ['/etc/aeterna/aeterna.yaml', '/app/current'],
      }),
    ),
    debounce: withDefault(
      duration({
        description: 'Quiet time after the last change before the reload starts, so a burst of writes reloads once.',
        minimum: '10ms',
        maximum: '1h',
      }),
      '500ms',
    ),
  },
});

const canary = object({
  description:
    'strategy canary: a weighted split of new TCP connections during the soak. Each generation gets its own socket ' +
    'of an SO_REUSEPORT group (same fd, same LISTEN_FDNAMES) and a classic BPF program picks the socket of each new ' +
    "connection; promote and rollback steer every new connection to the winner and wait for the loser's accept " +
    'queue to empty before stopping it. Needs Linux 4.5 or later (SO_ATTACH_REUSEPORT_CBPF): otherwise ' +
    'E_CANARY_UNSUPPORTED at start or reload. TCP listeners only: a unix listener is an error. Absent: both ' +
    'generations accept on one shared socket, the split is whatever their accept loops make of it.',
  fields: {
    weight: required(
      integer({
        description: 'Percentage of new TCP connections the new generation receives during the soak.',
        minimum: 1,
        maximum: 99,
      }),
    ),
    affinity: withDefault(
      oneOf({
        description:
          'none: each connection is split at random; client_ip: by a hash of the client address, so one client ' +
          'reaches one generation for the whole soak.',
        values: ['none', 'client_ip'],
      }),
      'none',
    ),
  },
});

const orchestration = object({
  description: 'How a reload replaces the running generation.',
  fields: {
    strategy: withDefault(
      oneOf({
        description:
          'immediate: switch to the new generation as soon as it is ready; ' +
          'canary: keep the old one until the new one survived soak_time.',
        values: ['immediate', 'canary'],
      }),
      'immediate',
    ),
    soak_time: withDefault(
      duration({
        description:
          'strategy canary: how long the ready new generation must keep running before the old one is drained. ' +
          'Ignored for immediate.',
        minimum: '0s',
        maximum: '24h',
      }),
      '60s',
    ),
    max_generations: withDefault(
      integer({
        description:
          "How many generations may be alive at once: the serving one, a reload's new one, and the old ones still " +
          'draining after their promotion (a reload ends at promotion, not when the old generation exits). When a ' +
          'reload would start one more, the oldest draining generations are killed (SIGKILL) first; never the serving one.',
        minimum: 2,
        maximum: 64,
      }),
      3,
    ),
    max_surge: optional(
      integer({
        description:
          'strategy immediate with service.instances > 1: how many new instances a reload starts at a time. Each old ' +
          'instance is stopped once its successor is ready (and has its state), and the next ones start once it has ' +
          'exited: 1 keeps the memory near that of one generation. Absent: all at once. A canary reload always starts ' +
          'the whole new set.',
        minimum: 1,
        maximum: 64,
      }),
    ),
    readiness: withDefault(readiness, {}),
    state_handoff: withDefault(stateHandoff, {}),
    watch: optional(watch),
    canary: optional(canary),
  },
});

const control = object({
  description: 'The control socket the aeterna CLI talks to.',
  fields: {
    socket_path: withDefault(
      socketPath({
        description: `Unix socket of the control API; must differ from the other socket paths. ${RELATIVE} ${NON_ROOT_DEFAULT}`,
      }),
      `${ROOT_RUNTIME_DIR}/${DEFAULT_CONTROL_SOCKET}`,
    ),
  },
});

const observability = object({
  description: 'Metrics and logs.',
  fields: {
    metrics_port: optional(
      hostPort({
        description:
          'Where to serve Prometheus metrics: [host]:port (host defaults to 0.0.0.0; IPv6 in brackets). ' +
          '"" or absent: no metrics endpoint.',
        example: ':9091',
      }),
    ),
    log_level: withDefault(
      oneOf({
        description: "Lowest level of Aeterna's own log lines.",
        values: ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'],
      }),
      'info',
    ),
    app_output: withDefault(
      oneOf({
        description:
          "How the app's stdout and stderr reach Aeterna's: raw (inherited, untouched), prefixed (each line " +
          "prefixed with its generation and pid) or json (each line a JSON record beside Aeterna's own log lines).",
        values: ['raw', 'prefixed', 'json'],
      }),
      'raw',
    ),
  },
});

export const configSchema = object({
  description: 'Aeterna configuration (aeterna.yaml). Unknown keys are errors.',
  fields: {
    version: required(oneOf({ description: 'Version of this file format.', values: ['v1'] })),
    service: required(service),
    orchestration: withDefault(orchestration, {}),
    control: withDefault(control, {}),
    observability: withDefault(observability, {}),
  },
  check: checkConfig,
});

/** Only control.socket_path: what the client commands need to reach the daemon (the rest of the file is not read). */
export const controlSocketSchema = object({
  description: 'The control socket of aeterna.yaml.',
  fields: { control: withDefault(control, {}) },
});

/** The validated file, keys as written (snake_case); load.ts maps it to Config. */
export type ValidatedConfig = TypeOf<typeof configSchema>;
