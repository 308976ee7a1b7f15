// The images: the repo's Dockerfile and the examples' (python-counter, go-counter, java-hello) use nothing that
// only BuildKit reads (heredocs, RUN --mount, COPY --link/--parents, a syntax directive), so buildah and podman
// (Debian 12's 4.3) build them as docker does; they pass the Dockerfile linter; every file they copy exists in the
// build context; the examples' runtime stages have no Node (Aeterna is the one file `make standalone` builds) and run
// it as PID 1 with a valid config; every image says Apache-2.0. Where podman runs and a base image can be had (pulled,
// or made from Debian's packages by scripts/podman-test-base.sh), an image is built the way docs/operations.md says
// (a Python base, Aeterna copied in as one file) and a reload runs inside it; elsewhere that test is skipped with the
// reason.
import assert from 'node:assert/strict';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { validate as lintDockerfile } from 'dockerfile-utils';
import { parseConfig } from '../../src/config/load';
import { ROOT, dockerIgnored, freePort, tempDir } from '../helpers/aeterna';
import { standalone } from '../helpers/standalone';
import { getJson } from '../helpers/load';

interface Instruction {
  keyword: string;
  args: string;
  line: number;
}
interface Stage {
  from: string;
  name: string | null;
  instructions: Instruction[];
}

/** The instructions of a Dockerfile by stage (continuation lines joined, comments dropped). */
function stages(text: string): Stage[] {
  const out: Stage[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const start = i;
    let line = lines[i].trim();
    if (line === '' || line.startsWith('#')) continue;
    while (line.endsWith('\\') && i + 1 < lines.length) line = line.slice(0, -1).trim() + ' ' + lines[++i].trim();
    const m = /^([A-Z]+)\s+(.*)$/.exec(line);
    assert.ok(m, `line ${start + 1}: "${line}"`);
    const instruction = { keyword: m[1], args: m[2], line: start + 1 };
    // A heredoc's body is not instructions: skip it (the test below refuses heredocs anyway).
    const heredoc = /<<-?\s*['"]?([A-Za-z_]+)['"]?/.exec(instruction.args);
    if (heredoc) while (i + 1 < lines.length && lines[++i].trim() !== heredoc[1]);
    if (instruction.keyword === 'ARG' && out.length === 0) continue; // a global ARG, for the FROM lines
    if (instruction.keyword === 'FROM') {
      const from = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(instruction.args);
      assert.ok(from, `line ${start + 1}: FROM ${instruction.args}`);
      out.push({ from: from[1], name: from[2] ?? null, instructions: [] });
    } else {
      assert.ok(out.length > 0, `line ${start + 1}: ${instruction.keyword} before FROM`);
      out[out.length - 1].instructions.push(instruction);
    }
  }
  return out;
}

const EXAMPLES = ['python-counter', 'go-counter', 'java-hello'];
const DOCKERFILES = ['Dockerfile', ...EXAMPLES.map((e) => `examples/${e}/Dockerfile`)];
const read = (p: string): string => fs.readFileSync(path.join(ROOT, p), 'utf8');

const isIgnored = dockerIgnored();

describe('Dockerfiles', () => {
  for (const file of DOCKERFILES) {
    describe(file, () => {
      const text = read(file);
      const all = stages(text);

      test('uses nothing only BuildKit reads: builds with buildah and podman too', () => {
        assert.doesNotMatch(text, /^#\s*syntax\s*=/m, 'a syntax directive (BuildKit fetches a frontend)');
        const used = all.flatMap((s) => s.instructions);
        assert.deepEqual(
          used.filter((i) => /<<-?\s*['"]?[A-Za-z_]+/.test(i.args)).map((i) => `${i.line}: heredoc`),
          [],
        );
        assert.deepEqual(
          used
            .filter((i) => /(^|\s)--(mount|link|parents|exclude|checksum|network|security)\b/.test(i.args))
            .map((i) => `${i.line}: ${i.keyword} ${i.args}`),
          [],
        );
      });

      test('passes the Dockerfile linter (dockerfile-utils) without a diagnostic', () => {
        assert.deepEqual(
          lintDockerfile(text).map(
            (d) => `${file}:${d.range.start.line + 1}: ${typeof d.message === 'string' ? d.message : d.message.value}`,
          ),
          [],
        );
      });

      test('copies only files of the build context (the repo root) that .dockerignore lets in', () => {
        let checked = 0;
        for (const stage of all) {
          for (const copy of stage.instructions.filter((i) => i.keyword === 'COPY' && !i.args.startsWith('--from'))) {
            const parts = copy.args.split(/\s+/);
            for (const source of parts.slice(0, -1)) {
              const p = source.replace(/\/$/, '');
              assert.ok(fs.existsSync(path.join(ROOT, p)), `${file}:${copy.line}: COPY ${source}: no such file`);
              assert.ok(!isIgnored(p), `${file}:${copy.line}: COPY ${source}: excluded by .dockerignore`);
              checked++;
            }
          }
        }
        assert.ok(checked > 0);
      });

      test('says its license: Apache-2.0, as LICENSE and package.json', () => {
        const labels = all[all.length - 1].instructions.filter((i) => i.keyword === 'LABEL').map((i) => i.args);
        assert.match(labels.join(' '), /org\.opencontainers\.image\.licenses="Apache-2\.0"/);
      });
    });
  }

  for (const example of EXAMPLES) {
    test(`examples/${example}: Aeterna is one copied file, PID 1, with a valid config; no Node in the image`, () => {
      const all = stages(read(`examples/${example}/Dockerfile`));
      const runtime = all[all.length - 1];
      assert.equal(runtime.name, null);
      assert.doesNotMatch(runtime.from, /^node:/);
      const runs = runtime.instructions.filter((i) => i.keyword === 'RUN').map((i) => i.args);
      assert.doesNotMatch(runs.join('\n'), /nodejs|\bnpm\b|apt-get install/);
      const copies = runtime.instructions.filter((i) => i.keyword === 'COPY').map((i) => i.args);
      assert.ok(
        copies.includes('--from=aeterna /src/build/standalone/aeterna /usr/local/bin/aeterna'),
        copies.join('\n'),
      );
      // The aeterna stage builds exactly what `make standalone` builds.
      const builder = all.find((s) => s.name === 'aeterna');
      assert.ok(builder);
      assert.match(builder.instructions.map((i) => i.args).join('\n'), /node dist\/scripts\/standalone\.js/);
      const entrypoint = runtime.instructions.filter((i) => i.keyword === 'ENTRYPOINT');
      assert.equal(entrypoint.length, 1);
      assert.deepEqual(JSON.parse(entrypoint[0].args), [
        '/usr/local/bin/aeterna',
        'start',
        '-c',
        '/etc/aeterna/aeterna.yaml',
      ]);
      const configCopy = copies.find((c) => c.endsWith(' /etc/aeterna/aeterna.yaml'));
      assert.ok(configCopy, 'the config is copied to /etc/aeterna/aeterna.yaml');
      const source = configCopy.split(/\s+/)[0];
      const config = parseConfig(read(source), source);
      assert.ok(config.service.listeners.length > 0);
      assert.equal(config.control.socketPath, '/run/aeterna/aeterna.sock');
      assert.match(runs.join('\n'), /mkdir -p \/run\/aeterna/);
      assert.match(runs.join('\n'), /aeterna validate/, 'the build checks the config with the real loader');
    });
  }
});

/** The base images a test image may start from: given, built locally (scripts/podman-test-base.sh), or pulled. */
const BASES = [
  process.env['AETERNA_TEST_BASE_IMAGE'],
  'localhost/aeterna-test/bookworm-python3:latest',
  'docker.io/library/python:3.12-slim-bookworm',
].filter((b): b is string => b !== undefined && b !== '');

/** How to run podman here: its arguments (runtime, limits), the base image; or why it cannot run a container. */
function podmanSetup(): { global: string[]; limits: string[]; base: string } | string {
  if (spawnSync('podman', ['--version']).error) return 'podman is not installed (Debian: apt-get install podman)';
  let base: string | null = null;
  for (const candidate of BASES) {
    if (spawnSync('podman', ['image', 'exists', candidate]).status === 0) {
      base = candidate;
      break;
    }
  }
  if (base === null) {
    const last = BASES[BASES.length - 1];
    const pull = spawnSync('podman', ['pull', '--quiet', last], { encoding: 'utf8', timeout: 300_000 });
    if (pull.status !== 0) {
      return (
        `no base image: none of ${BASES.join(', ')} is on this machine, and ${last} cannot be pulled ` +
        `(${pull.stderr.trim().split('\n').pop()}); scripts/podman-test-base.sh builds one from Debian's packages`
      );
    }
    base = last;
  }
  // crun refuses a host with cgroups in hybrid mode, and some hosts forbid raising the default rlimits: try the
  // plain setup first, then runc with the limits lowered.
  const tries: Array<{ global: string[]; limits: string[] }> = [
    { global: [], limits: [] },
    { global: ['--runtime', 'runc'], limits: ['--ulimit', 'nofile=4096:4096', '--ulimit', 'nproc=4096:4096'] },
  ];
  const errors: string[] = [];
  for (const t of tries) {
    const r = spawnSync('podman', [...t.global, 'run', '--rm', ...t.limits, base, 'true'], {
      encoding: 'utf8',
      timeout: 120_000,
    });
    if (r.status === 0) return { ...t, base };
    errors.push(r.stderr.trim().split('\n').pop() ?? `exit ${r.status}`);
  }
  return `podman cannot run a container here: ${errors.join('; ')}`;
}

/** The example app's JSON answer to GET /. */
const get = (port: number): Promise<{ count: number; generation: string }> =>
  getJson<{ count: number; generation: string }>(port);

describe('an image built by podman as docs/operations.md says', { timeout: 900_000 }, () => {
  test('a Python base without Node, Aeterna copied in as one file: PID 1, a reload promoted inside the container', async (t) => {
    const setup = podmanSetup();
    if (typeof setup === 'string') return t.skip(setup);
    const exe = standalone();
    const dir = tempDir('aeterna-image-');
    const tag = `localhost/aeterna-test/python-counter:${process.pid}`;
    const name = `aeterna-python-counter-${process.pid}`;
    const podman = (args: string[], timeout = 180_000): SpawnSyncReturns<string> =>
      spawnSync('podman', [...setup.global, ...args], { cwd: dir, encoding: 'utf8', timeout });
    try {
      // The build context: Aeterna's one file, the app and its SDK (as in the repo), the config of the example image.
      fs.copyFileSync(exe, path.join(dir, 'aeterna'));
      fs.cpSync(path.join(ROOT, 'examples', 'python-counter'), path.join(dir, 'app', 'examples', 'python-counter'), {
        recursive: true,
      });
      fs.mkdirSync(path.join(dir, 'app', 'clients', 'python'), { recursive: true });
      fs.copyFileSync(
        path.join(ROOT, 'clients', 'python', 'aeterna_client.py'),
        path.join(dir, 'app', 'clients', 'python', 'aeterna_client.py'),
      );
      const config = read('examples/python-counter/aeterna.image.yaml').replace(
        'cwd: "/app"',
        'cwd: "/app/examples/python-counter"',
      );
      fs.writeFileSync(path.join(dir, 'aeterna.yaml'), config);
      fs.writeFileSync(
        path.join(dir, 'Containerfile'),
        [
          `FROM ${setup.base}`,
          'COPY aeterna /usr/local/bin/aeterna',
          'COPY app/ /app/',
          'COPY aeterna.yaml /etc/aeterna/aeterna.yaml',
          'ENV AETERNA_CONFIG=/etc/aeterna/aeterna.yaml PYTHONUNBUFFERED=1',
          'RUN mkdir -p /run/aeterna && aeterna validate && ! command -v node',
          'STOPSIGNAL SIGTERM',
          'ENTRYPOINT ["/usr/local/bin/aeterna", "start", "-c", "/etc/aeterna/aeterna.yaml"]',
          '',
        ].join('\n'),
      );
      const build = podman(['build', ...setup.limits, '-t', tag, '.'], 600_000);
      assert.equal(build.status, 0, build.stdout + build.stderr);
      const port = await freePort();
      const run = podman(['run', '-d', ...setup.limits, '--name', name, '-p', `127.0.0.1:${port}:8080`, tag]);
      assert.equal(run.status, 0, run.stderr);
      const deadline = Date.now() + 120_000;
      let first: { count: number; generation: string } | null = null;
      while (first === null) {
        try {
          first = await get(port);
        } catch (err) {
          if (Date.now() > deadline) throw new Error(`${(err as Error).message}\n${podman(['logs', name]).stderr}`);
          await new Promise((r) => setTimeout(r, 250));
        }
      }
      assert.equal(first.generation, '1');
      const pid1 = podman(['exec', name, 'cat', '/proc/1/cmdline']);
      assert.equal(pid1.stdout.split('\0').slice(0, 2).join(' '), '/usr/local/bin/aeterna start');
      const reload = podman(['exec', name, 'aeterna', 'reload']);
      assert.equal(reload.status, 0, reload.stdout + reload.stderr);
      assert.match(reload.stdout, /promoted/);
      const second = await get(port);
      assert.equal(second.generation, '2');
      assert.equal(second.count, first.count + 1, 'the count was relayed to generation 2');
      const stop = podman(['stop', '-t', '30', name], 120_000);
      assert.equal(stop.status, 0, stop.stderr);
      const state = podman(['inspect', '--format', '{{.State.ExitCode}}', name]);
      assert.equal(state.stdout.trim(), '0', "Aeterna exited with the app's code 0");
    } finally {
      podman(['rm', '-f', name]);
      podman(['rmi', '-f', tag]);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
