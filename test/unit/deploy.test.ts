// The deployment files: the Dockerfile (linted, and its essential properties checked: no Docker engine runs
// here), the Kubernetes manifests (validated against the Kubernetes OpenAPI schemas that kubernetes-models
// ships, strictly: unknown fields are errors, as with kubeconform -strict), the aeterna.yaml each of them
// carries (through the real config loader), their consistency with each other, and fleet-reload.sh against a
// fake kubectl. Asserts states and counts, never timings.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import ts from 'typescript';
import { parseAllDocuments } from 'yaml';
import { validate as lintDockerfile } from 'dockerfile-utils';
import { parseConfig } from '../../src/config/load';
import type { Config } from '../../src/config/types';
import { ROOT, dockerIgnored, tempDir } from '../helpers/aeterna';

const K8S = path.join(ROOT, 'deploy', 'kubernetes');
const FLEET_RELOAD = path.join(K8S, 'fleet-reload.sh');
const PACKAGE_VERSION = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string })
  .version;
const ENTRYPOINT = ['node', '/opt/aeterna/bin/aeterna.js', 'start', '-c', '/etc/aeterna/aeterna.yaml'];
/** terminationGracePeriodSeconds must exceed preStop + stop_timeout by at least this much. */
const GRACE_MARGIN_S = 5;

// ---- a small Dockerfile reader --------------------------------------------------------------------------------

interface Instruction {
  keyword: string;
  args: string;
  line: number;
  /** The body of a heredoc (COPY <<EOF dest ... EOF), when there is one. */
  heredoc?: string;
}

interface Stage {
  from: string;
  name: string | null;
  instructions: Instruction[];
}

function readDockerfile(text: string): { args: Map<string, string>; stages: Stage[] } {
  const lines = text.split('\n');
  const args = new Map<string, string>();
  const stages: Stage[] = [];
  for (let i = 0; i < lines.length; i++) {
    const start = i;
    let line = lines[i];
    if (/^\s*(#|$)/.test(line)) continue;
    while (line.endsWith('\\') && i + 1 < lines.length) {
      i++;
      if (/^\s*#/.test(lines[i])) continue;
      line = line.slice(0, -1) + ' ' + lines[i].trim();
    }
    const m = /^\s*([A-Za-z]+)\s+(.*)$/.exec(line);
    assert.ok(m, `Dockerfile:${start + 1}: cannot read "${line}"`);
    const instruction: Instruction = { keyword: m[1].toUpperCase(), args: m[2].trim(), line: start + 1 };
    const heredoc = /<<-?'?"?([A-Z_]+)'?"?/.exec(instruction.args);
    if (heredoc) {
      const body: string[] = [];
      while (++i < lines.length && lines[i] !== heredoc[1]) body.push(lines[i]);
      instruction.heredoc = body.join('\n') + '\n';
    }
    if (instruction.keyword === 'ARG' && stages.length === 0) {
      const [name, value] = instruction.args.split('=');
      args.set(name, value ?? '');
    } else if (instruction.keyword === 'FROM') {
      const from = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(instruction.args);
      assert.ok(from, `Dockerfile:${start + 1}: FROM ${instruction.args}`);
      const image = from[1].replace(/\$\{(\w+)\}/g, (_, name: string) => args.get(name) ?? '');
      stages.push({ from: image, name: from[2] ?? null, instructions: [] });
    } else {
      assert.ok(stages.length > 0, `Dockerfile:${start + 1}: ${instruction.keyword} before FROM`);
      stages[stages.length - 1].instructions.push(instruction);
    }
  }
  return { args, stages };
}

const dockerfileText = fs.readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8');
const dockerfile = readDockerfile(dockerfileText);
const runtime = dockerfile.stages[dockerfile.stages.length - 1];
// The image's config is a file of the build context: no heredoc, which buildah 1.28 / podman 4.3 cannot read.
const imageConfigCopy = runtime.instructions.find(
  (i) => i.keyword === 'COPY' && !i.args.startsWith('--') && i.args.endsWith(` ${ENTRYPOINT[4]}`),
);

function find(stage: Stage, keyword: string): Instruction[] {
  return stage.instructions.filter((i) => i.keyword === keyword);
}

/** The tcp ports of a config's listeners and its metrics port. */
function portsOf(config: Config): { listeners: number[]; metrics: number | null } {
  return {
    listeners: config.service.listeners.flatMap((l) => (l.address.kind === 'tcp' ? [l.address.port] : [])),
    metrics: config.observability.metrics?.port ?? null,
  };
}

function imageConfig(): Config {
  assert.ok(imageConfigCopy, `the runtime stage copies ${ENTRYPOINT[4]} from the build context`);
  const source = imageConfigCopy.args.split(/\s+/)[0];
  return parseConfig(fs.readFileSync(path.join(ROOT, source), 'utf8'), source);
}

describe('Dockerfile', () => {
  test('passes the Dockerfile linter (dockerfile-utils) without a single diagnostic', () => {
    const diagnostics = lintDockerfile(dockerfileText).map(
      (d) => `Dockerfile:${d.range.start.line + 1}: ${typeof d.message === 'string' ? d.message : d.message.value}`,
    );
    assert.deepEqual(diagnostics, []);
  });

  test('passes hadolint, where it is installed', (t) => {
    const probe = spawnSync('hadolint', ['--version'], { encoding: 'utf8' });
    if (probe.error) {
      t.skip('hadolint is not installed (neither Debian nor npm ships it); the checks in this file stand in for it');
      return;
    }
    const r = spawnSync('hadolint', [path.join(ROOT, 'Dockerfile')], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stdout + r.stderr);
  });

  test('is multi-stage: a build stage with the toolchain, then a slim runtime stage', () => {
    assert.equal(dockerfile.stages.length, 2);
    const [build] = dockerfile.stages;
    assert.equal(build.name, 'build');
    assert.match(build.from, /^node:\d+-bookworm$/);
    assert.match(runtime.from, /^node:\d+-bookworm-slim$/);
    assert.equal(runtime.name, null);
    // The runtime stage takes the built tree from the build stage and installs no toolchain.
    assert.deepEqual(
      find(runtime, 'COPY')
        .filter((c) => c.args.startsWith('--from='))
        .map((c) => c.args),
      ['--from=build /opt/aeterna /opt/aeterna'],
    );
    const runtimeRuns = find(runtime, 'RUN')
      .map((r) => r.args)
      .join('\n');
    assert.doesNotMatch(runtimeRuns, /apt-get|python3|g\+\+|node-gyp/);
    // The build stage builds the prebuilt addon with the same script as `make prebuild`, and prunes devDependencies.
    const buildRuns = find(build, 'RUN')
      .map((r) => r.args)
      .join('\n');
    assert.match(buildRuns, /npm ci /);
    assert.match(buildRuns, /npm run build:prebuilds/);
    assert.match(buildRuns, /npm prune --omit=dev/);
  });

  test('every base image has an explicit tag, and none is `latest`', () => {
    for (const stage of dockerfile.stages) {
      const tag = /^[^:@]+:([^@]+)$/.exec(stage.from)?.[1];
      assert.ok(tag, `FROM ${stage.from} has no tag`);
      assert.notEqual(tag, 'latest');
      assert.ok(!tag.startsWith('-'), `FROM ${stage.from}: an ARG it uses has no default`);
    }
  });

  test('Aeterna is the ENTRYPOINT in exec form (so it is PID 1), and nothing overrides it', () => {
    const entrypoints = find(runtime, 'ENTRYPOINT');
    assert.equal(entrypoints.length, 1);
    assert.deepEqual(JSON.parse(entrypoints[0].args), ENTRYPOINT);
    assert.equal(find(runtime, 'CMD').length, 0);
    assert.equal(find(runtime, 'USER').length, 0, 'Aeterna runs as root; the app switches to service.user');
    assert.deepEqual(
      find(runtime, 'STOPSIGNAL').map((s) => s.args),
      ['SIGTERM'],
    );
  });

  test("the image's aeterna.yaml is valid, and the image provides what it names", () => {
    const config = imageConfig();
    assert.equal(config.service.name, 'llm-agent-demo');
    assert.equal(config.orchestration.stateHandoff.enabled, true);
    assert.equal(config.service.user, 'node');
    assert.equal(config.control.socketPath, '/run/aeterna/aeterna.sock');
    assert.equal(config.orchestration.stateHandoff.socketPath, '/run/aeterna/state.sock');
    const runs = find(runtime, 'RUN')
      .map((r) => r.args)
      .join('\n');
    assert.match(runs, /mkdir -p \/run\/aeterna /, 'the control socket directory exists');
    assert.match(
      runs,
      /ln -s \/opt\/aeterna\/bin\/aeterna\.js \/usr\/local\/bin\/aeterna/,
      '`docker exec <c> aeterna reload` finds aeterna',
    );
    assert.match(runs, /aeterna validate/, 'the build checks the config with the real loader too');
    // The app is the demo (the one `make demo` runs), copied where the config's cwd says.
    const [build] = dockerfile.stages;
    assert.deepEqual(
      find(build, 'WORKDIR').map((w) => w.args),
      ['/opt/aeterna'],
    );
    assert.ok(find(build, 'COPY').some((c) => c.args === 'examples/llm-agent/ examples/llm-agent/'));
    assert.equal(config.service.cwd, '/opt/aeterna/examples/llm-agent');
    assert.deepEqual(config.service.command, ['node', 'agent.js']);
    assert.ok(fs.existsSync(path.join(ROOT, 'examples', 'llm-agent', 'agent.js')));
    // EXPOSE names exactly the listener and metrics ports.
    const { listeners, metrics } = portsOf(config);
    const exposed = find(runtime, 'EXPOSE')
      .flatMap((e) => e.args.split(/\s+/))
      .map(Number);
    assert.deepEqual([...exposed].sort(), [...listeners, metrics].sort());
    // `docker stop` waits 10s by default: the app's stop_timeout must end before Docker's SIGKILL.
    assert.ok(config.service.stopTimeoutMs < 10_000, `stop_timeout ${config.service.stopTimeoutMs}ms`);
  });

  test('copies only files that exist and that .dockerignore lets into the build context', () => {
    const isIgnored = dockerIgnored();
    let checked = 0;
    for (const copy of find(dockerfile.stages[0], 'COPY')) {
      const parts = copy.args.split(/\s+/);
      for (const source of parts.slice(0, -1)) {
        const p = source.replace(/\/$/, '');
        assert.ok(fs.existsSync(path.join(ROOT, p)), `Dockerfile:${copy.line}: COPY ${source}: no such file`);
        assert.ok(!isIgnored(p), `Dockerfile:${copy.line}: COPY ${source}: excluded by .dockerignore`);
        checked++;
      }
    }
    assert.ok(checked >= 8, `${checked} sources checked`);
    for (const p of ['node_modules', 'build', 'dist', 'prebuilds', '.git'])
      assert.ok(isIgnored(p), `${p} is in .dockerignore`);
  });
});

// ---- Kubernetes ----------------------------------------------------------------------------------------------

interface Manifest {
  file: string;
  index: number;
  doc: Record<string, unknown> & {
    apiVersion: string;
    kind: string;
    metadata: { name: string; labels?: Record<string, string> };
  };
}

function loadManifests(dir = K8S): Manifest[] {
  const out: Manifest[] = [];
  for (const name of fs
    .readdirSync(dir)
    .filter((f) => /\.ya?ml$/.test(f))
    .sort()) {
    const docs = parseAllDocuments(fs.readFileSync(path.join(dir, name), 'utf8'));
    assert.ok(Array.isArray(docs), `${name}: not YAML`);
    docs.forEach((d, index) => {
      assert.deepEqual(
        d.errors.map((e) => e.message),
        [],
        `${name}: YAML errors`,
      );
      const doc = d.toJS() as Manifest['doc'] | null;
      if (doc !== null) out.push({ file: name, index, doc });
    });
  }
  return out;
}

/** kubernetes-models' module for an apiVersion + kind, e.g. apps/v1 Deployment -> kubernetes-models/apps/v1/Deployment. */
function modelModule(apiVersion: string, kind: string): string {
  return `kubernetes-models/${apiVersion}/${kind}`;
}

/** Validate against the Kubernetes OpenAPI schema (ajv-compiled validators in kubernetes-models). */
function schemaErrors(m: { doc: { apiVersion: string; kind: string } }): string[] {
  let Model: new (data: unknown) => { validate(): void };
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    Model = (require(modelModule(m.doc.apiVersion, m.doc.kind)) as Record<string, typeof Model>)[m.doc.kind];
  } catch {
    return [`no Kubernetes schema for apiVersion ${m.doc.apiVersion}, kind ${m.doc.kind}`];
  }
  try {
    new Model(m.doc).validate();
    return [];
  } catch (err) {
    return [(err as Error).message];
  }
}

/**
 * Strict check: each manifest, as an object literal typed with kubernetes-models' interface for its kind, must
 * type-check. TypeScript's excess property check rejects unknown fields at any depth (the OpenAPI schemas allow
 * them), and its types catch wrong types and missing required fields too.
 */
function strictErrors(manifests: Array<{ file: string; doc: { apiVersion: string; kind: string } }>): string[] {
  const fileName = path.join(ROOT, '__deploy_manifests_check__.ts');
  const lines: string[] = [];
  /** The first source line (0-based) of each manifest's literal. */
  const owners: Array<{ from: number; file: string }> = [];
  manifests.forEach((m, i) => {
    lines.push(
      `import type { I${m.doc.kind} as T${i} } from ${JSON.stringify(modelModule(m.doc.apiVersion, m.doc.kind))};`,
    );
  });
  manifests.forEach((m, i) => {
    owners.push({ from: lines.length, file: `${m.file} (${m.doc.kind})` });
    lines.push(...`export const m${i}: T${i} = ${JSON.stringify(m.doc, null, 2)};`.split('\n'));
  });
  const source = lines.join('\n');
  const options: ts.CompilerOptions = {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    types: [],
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.CommonJS,
    moduleResolution: ts.ModuleResolutionKind.Node10,
  };
  const host = ts.createCompilerHost(options);
  // eslint-disable-next-line @typescript-eslint/unbound-method -- each is called below with .call(host)
  const { getSourceFile, fileExists, readFile } = host;
  host.getSourceFile = (name, version, ...rest) =>
    name === fileName
      ? ts.createSourceFile(name, source, version, true)
      : getSourceFile.call(host, name, version, ...rest);
  host.fileExists = (name) => name === fileName || fileExists.call(host, name);
  host.readFile = (name) => (name === fileName ? source : readFile.call(host, name));
  const program = ts.createProgram([fileName], options, host);
  return ts.getPreEmitDiagnostics(program).map((d) => {
    const text = ts.flattenDiagnosticMessageText(d.messageText, '\n');
    if (d.file === undefined || d.start === undefined) return text;
    const line = d.file.getLineAndCharacterOfPosition(d.start).line;
    const owner = [...owners].reverse().find((o) => o.from <= line);
    return `${owner?.file ?? d.file.fileName}: ${text}`;
  });
}

function byKind<T = Record<string, unknown>>(manifests: Manifest[], kind: string): T & Manifest['doc'] {
  const found = manifests.filter((m) => m.doc.kind === kind);
  assert.equal(found.length, 1, `one ${kind}`);
  return found[0].doc as T & Manifest['doc'];
}

interface Container {
  name: string;
  image: string;
  command?: string[];
  ports: Array<{ name: string; containerPort: number }>;
  readinessProbe: { httpGet: { path: string; port: string | number } };
  livenessProbe: { httpGet: { path: string; port: string | number } };
  lifecycle?: { preStop?: { exec?: { command: string[] } } };
  volumeMounts: Array<{ name: string; mountPath: string; readOnly?: boolean }>;
  securityContext?: { readOnlyRootFilesystem?: boolean };
}
interface PodSpec {
  terminationGracePeriodSeconds: number;
  shareProcessNamespace?: boolean;
  containers: Container[];
  volumes: Array<{ name: string; configMap?: { name: string }; emptyDir?: object }>;
}
type DeploymentDoc = {
  spec: {
    replicas: number;
    selector: { matchLabels: Record<string, string> };
    template: { metadata: { labels: Record<string, string> }; spec: PodSpec };
  };
};
type ConfigMapDoc = { data: Record<string, string> };
type ServiceDoc = {
  spec: { selector: Record<string, string>; ports: Array<{ name: string; port: number; targetPort: string | number }> };
};

describe('Kubernetes manifests', () => {
  const manifests = loadManifests();

  test('the directory holds a ConfigMap, a Deployment and a Service', () => {
    assert.deepEqual(
      manifests.map((m) => `${m.file}: ${m.doc.apiVersion} ${m.doc.kind}`),
      ['configmap.yaml: v1 ConfigMap', 'deployment.yaml: apps/v1 Deployment', 'service.yaml: v1 Service'],
    );
  });

  test('every manifest is valid against the Kubernetes OpenAPI schema', () => {
    assert.deepEqual(
      manifests.flatMap((m) => schemaErrors(m).map((e) => `${m.file}: ${e}`)),
      [],
    );
  });

  test('every manifest type-checks strictly against the Kubernetes types (unknown fields are errors)', () => {
    assert.deepEqual(strictErrors(manifests), []);
  });

  test('the validators reject a broken manifest (they are not vacuous)', () => {
    const deployment = structuredClone(
      manifests.find((m) => m.doc.kind === 'Deployment')!.doc,
    ) as unknown as DeploymentDoc & Manifest['doc'];
    const container = deployment.spec.template.spec.containers[0] as unknown as Record<string, unknown>;
    container.readinesProbe = container.readinessProbe; // a typo: unknown field
    (deployment.spec as unknown as Record<string, unknown>).replicas = 'two'; // wrong type
    const broken = { file: 'broken.yaml', doc: deployment };
    assert.match(schemaErrors(broken).join('\n'), /replicas must be integer/);
    const strict = strictErrors([broken]).join('\n');
    assert.match(strict, /readinesProbe"?' does not exist in type 'IContainer'/);
    assert.match(strict, /Type 'string' is not assignable to type 'number'/);
    assert.deepEqual(schemaErrors({ doc: { apiVersion: 'v1', kind: 'NoSuchKind' } }), [
      'no Kubernetes schema for apiVersion v1, kind NoSuchKind',
    ]);
  });

  test("the ConfigMap's aeterna.yaml passes the real config loader and matches the image's", () => {
    const configMap = byKind<ConfigMapDoc>(manifests, 'ConfigMap');
    assert.deepEqual(Object.keys(configMap.data), ['aeterna.yaml']);
    const config = parseConfig(configMap.data['aeterna.yaml'], 'deploy/kubernetes/configmap.yaml');
    const image = imageConfig();
    // What the container, the probes and the CLI rely on is the same in both.
    for (const pick of [
      (c: Config) => c.service.command,
      (c: Config) => c.service.cwd,
      (c: Config) => c.service.user,
      (c: Config) => c.service.listeners.map((l) => l.address.raw),
      (c: Config) => c.control.socketPath,
      (c: Config) => c.orchestration.stateHandoff,
      (c: Config) => c.orchestration.readiness,
      (c: Config) => c.observability.metrics,
    ]) {
      assert.deepEqual(pick(config), pick(image));
    }
  });

  test('the Deployment runs Aeterna as PID 1 with the ConfigMap, probes on /readyz and /healthz, and a grace period that covers stop_timeout', () => {
    const deployment = byKind<DeploymentDoc>(manifests, 'Deployment');
    const configMap = byKind<ConfigMapDoc>(manifests, 'ConfigMap');
    const config = parseConfig(configMap.data['aeterna.yaml'], 'deploy/kubernetes/configmap.yaml');
    const pod = deployment.spec.template.spec;
    assert.equal(deployment.spec.replicas, 2);
    assert.deepEqual(deployment.spec.selector.matchLabels, { 'app.kubernetes.io/name': 'aeterna-demo' });
    for (const [k, v] of Object.entries(deployment.spec.selector.matchLabels))
      assert.equal(deployment.spec.template.metadata.labels[k], v);
    assert.notEqual(pod.shareProcessNamespace, true, 'Aeterna must be PID 1 of its container');
    assert.equal(pod.containers.length, 1);
    const [c] = pod.containers;

    // The image this repo builds, at this version; Aeterna as entrypoint, as in the Dockerfile.
    assert.equal(c.image, `aeterna-demo:${PACKAGE_VERSION}`);
    assert.deepEqual(c.command, ENTRYPOINT);

    // The ConfigMap is mounted where the entrypoint reads aeterna.yaml.
    const configVolume = pod.volumes.find((v) => v.configMap?.name === configMap.metadata.name);
    assert.ok(configVolume, 'a volume from the ConfigMap');
    const mount = c.volumeMounts.find((m) => m.name === configVolume.name);
    assert.equal(mount?.mountPath, path.dirname(ENTRYPOINT[4]));
    assert.ok(!('subPath' in (mount ?? {})), 'no subPath: it would never see ConfigMap updates');

    // Sockets live in a writable emptyDir: the root filesystem is read-only.
    assert.equal(c.securityContext?.readOnlyRootFilesystem, true);
    for (const socket of [config.control.socketPath, config.orchestration.stateHandoff.socketPath]) {
      const holder = c.volumeMounts.find((m) => path.dirname(socket) === m.mountPath);
      assert.ok(holder && pod.volumes.find((v) => v.name === holder.name)?.emptyDir, `${socket} is on an emptyDir`);
    }

    // Ports: one per tcp listener, and the metrics port; the probes ask Aeterna on the metrics port.
    const { listeners, metrics } = portsOf(config);
    assert.deepEqual(c.ports.map((p) => p.containerPort).sort(), [...listeners, metrics].sort());
    const portNumber = (port: string | number): number =>
      typeof port === 'number' ? port : c.ports.find((p) => p.name === port)!.containerPort;
    assert.equal(c.readinessProbe.httpGet.path, '/readyz');
    assert.equal(portNumber(c.readinessProbe.httpGet.port), metrics);
    assert.equal(c.livenessProbe.httpGet.path, '/healthz');
    assert.equal(portNumber(c.livenessProbe.httpGet.port), metrics);

    // terminationGracePeriodSeconds >= preStop sleep + stop_timeout + margin.
    const preStop = c.lifecycle?.preStop?.exec?.command ?? [];
    const preStopS = preStop[0] === 'sleep' ? Number(preStop[1]) : 0;
    const needed = preStopS + config.service.stopTimeoutMs / 1000 + GRACE_MARGIN_S;
    assert.ok(
      pod.terminationGracePeriodSeconds >= needed,
      `terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds} < ${needed}`,
    );
  });

  test('the Service selects the pods and targets their named ports', () => {
    const service = byKind<ServiceDoc>(manifests, 'Service');
    const deployment = byKind<DeploymentDoc>(manifests, 'Deployment');
    const labels = deployment.spec.template.metadata.labels;
    for (const [k, v] of Object.entries(service.spec.selector)) assert.equal(labels[k], v);
    const names = deployment.spec.template.spec.containers[0].ports.map((p) => p.name);
    for (const p of service.spec.ports) assert.ok(names.includes(String(p.targetPort)), `targetPort ${p.targetPort}`);
  });
});

describe('Kubernetes example: code synced by a sidecar, reloaded by orchestration.watch', () => {
  const manifests = loadManifests(path.join(K8S, 'code-sync'));

  test('its manifests are valid against the Kubernetes OpenAPI schema and types', () => {
    assert.deepEqual(
      manifests.map((m) => `${m.file}: ${m.doc.kind}`),
      ['deployment.yaml: ConfigMap', 'deployment.yaml: Deployment'],
    );
    assert.deepEqual(
      manifests.flatMap((m) => schemaErrors(m).map((e) => `${m.file}: ${e}`)),
      [],
    );
    assert.deepEqual(strictErrors(manifests), []);
  });

  test("its aeterna.yaml passes the config loader and watches the mounted code and the ConfigMap's file", () => {
    const configMap = byKind<ConfigMapDoc>(manifests, 'ConfigMap');
    const deployment = byKind<DeploymentDoc>(manifests, 'Deployment');
    const config = parseConfig(configMap.data['aeterna.yaml'], 'deploy/kubernetes/code-sync/deployment.yaml');
    const mounts = deployment.spec.template.spec.containers[0].volumeMounts.map((m) => m.mountPath);
    assert.ok(config.orchestration.watch, 'orchestration.watch is set');
    for (const watched of config.orchestration.watch.paths) {
      assert.ok(
        mounts.some((m) => watched.startsWith(`${m}/`)),
        `${watched} is on a volume of the aeterna container`,
      );
    }
  });
});

// ---- fleet-reload.sh -----------------------------------------------------------------------------------------

/** A fake kubectl on PATH: records each call, lists $FAKE_PODS, and exits from exec with $FAKE_EXIT_<pod>. */
function fakeKubectl(): { bin: string; log: string } {
  const dir = tempDir('aeterna-fleet-');
  const bin = path.join(dir, 'bin');
  fs.mkdirSync(bin);
  const log = path.join(dir, 'calls.log');
  fs.writeFileSync(
    path.join(bin, 'kubectl'),
    `#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_LOG"
case " $* " in
  *" get pods "*)
    [ -n "\${FAKE_GET_FAILS:-}" ] && { echo "error: the server is unreachable" >&2; exit 1; }
    printf '%s' "\${FAKE_PODS:-}"
    exit 0 ;;
  *" exec "*)
    pod=""; prev=""
    for a in "$@"; do [ "$prev" = exec ] && pod="$a"; prev="$a"; done
    var="FAKE_EXIT_$(printf '%s' "$pod" | tr -c 'A-Za-z0-9' '_')"
    eval "code=\\\${$var:-0}"
    [ "$code" -eq 0 ] && echo "reload-1 promoted in 1.00s: generation 2 is serving"
    [ "$code" -ne 0 ] && echo "aeterna: something went wrong (exit $code)" >&2
    exit "$code" ;;
esac
echo "fake kubectl: unexpected call: $*" >&2
exit 99
`,
    { mode: 0o755 },
  );
  return { bin, log };
}

interface FleetRun {
  code: number | null;
  stdout: string;
  stderr: string;
  calls: string[];
  execs: string[];
}

function fleetReload(args: string[], env: Record<string, string>): FleetRun {
  const fake = fakeKubectl();
  const r = spawnSync('sh', [FLEET_RELOAD, ...args], {
    encoding: 'utf8',
    env: { PATH: `${fake.bin}:${process.env.PATH ?? '/usr/bin:/bin'}`, FAKE_LOG: fake.log, ...env },
  });
  const calls = fs.existsSync(fake.log) ? fs.readFileSync(fake.log, 'utf8').split('\n').filter(Boolean) : [];
  fs.rmSync(path.dirname(fake.bin), { recursive: true, force: true });
  return {
    code: r.status,
    stdout: r.stdout,
    stderr: r.stderr,
    calls,
    execs: calls.filter((c) => / exec /.test(` ${c} `)),
  };
}

const THREE_PODS = 'web-c\nweb-a\nweb-b\n';

describe('fleet-reload.sh (against a fake kubectl)', () => {
  test('reloads every Running pod in turn, in name order, and exits 0 when all promoted', () => {
    const r = fleetReload([], { FAKE_PODS: THREE_PODS });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.calls.length, 4);
    assert.equal(
      r.calls[0],
      'get pods -l app.kubernetes.io/name=aeterna-demo --field-selector=status.phase=Running -o jsonpath={range .items[*]}{.metadata.name}{"\\n"}{end}',
    );
    assert.deepEqual(
      r.execs,
      ['web-a', 'web-b', 'web-c'].map((p) => `exec ${p} -c aeterna -- aeterna reload`),
    );
    assert.match(r.stdout, /\[1\/3\] web-a: aeterna reload/);
    assert.match(r.stdout, /all 3 pod\(s\) promoted/);
  });

  for (const [code, why] of [
    [1, /rolled back or failed/],
    [3, /no Aeterna daemon answers/],
    [4, /a reload is already in progress/],
    [7, /aeterna reload exited with code 7/],
  ] as const) {
    test(`stops at the first pod whose reload exits ${code}, leaves the rest untouched, and exits ${code}`, () => {
      const r = fleetReload([], { FAKE_PODS: THREE_PODS, FAKE_EXIT_web_b: String(code) });
      assert.equal(r.code, code);
      assert.deepEqual(
        r.execs.map((c) => c.split(' ')[1]),
        ['web-a', 'web-b'],
      );
      assert.match(r.stderr, new RegExp(`STOPPED at web-b \\[2/3\\], exit code ${code}`));
      assert.match(r.stderr, why);
      assert.match(r.stderr, /1 pod\(s\) reloaded before it; 1 pod\(s\) not touched/);
      assert.doesNotMatch(r.stdout, /all .* promoted/);
    });
  }

  test('a failure at the first pod touches no other pod', () => {
    const r = fleetReload([], { FAKE_PODS: THREE_PODS, FAKE_EXIT_web_a: '1' });
    assert.equal(r.code, 1);
    assert.equal(r.execs.length, 1);
    assert.match(r.stderr, /0 pod\(s\) reloaded before it; 2 pod\(s\) not touched/);
  });

  test('passes namespace, selector, container and context to every kubectl call', () => {
    const r = fleetReload(['-n', 'prod', '-l', 'app=web', '-c', 'main', '--context', 'eu-1'], { FAKE_PODS: 'p1\n' });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.calls.length, 2);
    assert.match(r.calls[0], /^--context eu-1 -n prod get pods -l app=web /);
    assert.equal(r.calls[1], '--context eu-1 -n prod exec p1 -c main -- aeterna reload');
  });

  test('no matching pod is an error (exit 2), and nothing is exec-ed', () => {
    const r = fleetReload(['-l', 'app=none'], { FAKE_PODS: '' });
    assert.equal(r.code, 2);
    assert.equal(r.execs.length, 0);
    assert.match(r.stderr, /no Running pod matches -l app=none/);
  });

  test('a failing kubectl get is an error (exit 1)', () => {
    const r = fleetReload([], { FAKE_GET_FAILS: '1' });
    assert.equal(r.code, 1);
    assert.equal(r.execs.length, 0);
    assert.match(r.stderr, /kubectl get pods -l app.kubernetes.io\/name=aeterna-demo failed/);
  });

  test('usage errors exit 2 and print the usage', () => {
    for (const args of [['--bogus'], ['-n']]) {
      const r = fleetReload(args, { FAKE_PODS: THREE_PODS });
      assert.equal(r.code, 2);
      assert.equal(r.calls.length, 0);
      assert.match(r.stderr, /fleet-reload\.sh \[-n NAMESPACE\] \[-l SELECTOR\]/);
    }
  });

  test('passes shellcheck, where it is installed', (t) => {
    const probe = spawnSync('shellcheck', ['--version'], { encoding: 'utf8' });
    if (probe.error) {
      t.skip('shellcheck is not installed (apt-get install shellcheck)');
      return;
    }
    const r = spawnSync('shellcheck', [FLEET_RELOAD], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stdout + r.stderr);
  });

  test('is executable', () => {
    assert.ok((fs.statSync(FLEET_RELOAD).mode & 0o111) !== 0);
  });
});
