// The images: the repo's Dockerfile and the examples' (python-counter, go-counter, java-hello) use nothing that
// only BuildKit reads (heredocs, RUN --mount, COPY --link/--parents, a syntax directive), so buildah and podman
// (Debian 12's 4.3) build them as docker does; they pass the Dockerfile linter; every file they copy exists in the
// build context; the examples' runtime stages have no Node (Aeterna is the one file `make standalone` builds) and run
// it as PID 1 with a valid config; every image says Apache-2.0. Where podman runs and the base images can be had, an
// example image is built and a reload runs inside it; elsewhere that test is skipped with the reason.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { describe, test } from 'node:test';
import { validate as lintDockerfile } from 'dockerfile-utils';
import { parseConfig } from '../../src/config/load';
import { ROOT, freePort } from '../helpers/aeterna';

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

const ignored = read('.dockerignore')
  .split('\n')
  .map((l) => l.trim())
  .filter((l) => l !== '' && !l.startsWith('#'));
const isIgnored = (p: string): boolean =>
  ignored.some((pattern) =>
    pattern.startsWith('*.') ? p.endsWith(pattern.slice(1)) : p === pattern || p.startsWith(pattern + '/'),
  );

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

/** Why no example image can be built and run here, or null. */
function podmanUnavailable(bases: string[]): string | null {
  const version = spawnSync('podman', ['--version'], { encoding: 'utf8' });
  if (version.error) return 'podman is not installed (Debian: apt-get install podman)';
  const info = spawnSync('podman', ['info'], { encoding: 'utf8', timeout: 60_000 });
  if (info.status !== 0) return `podman cannot run here: ${info.stderr.trim().split('\n').pop()}`;
  for (const base of bases) {
    if (spawnSync('podman', ['image', 'exists', base]).status === 0) continue;
    const pull = spawnSync('podman', ['pull', '--quiet', base], { encoding: 'utf8', timeout: 300_000 });
    if (pull.status !== 0) {
      return `the base image ${base} is not on this machine and cannot be pulled (${pull.stderr.trim().split('\n').pop()}): this machine reaches no container registry`;
    }
  }
  return null;
}

function get(port: number): Promise<{ count: number; generation: string }> {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: '/', agent: false }, (res) => {
        let body = '';
        res.setEncoding('utf8').on('data', (d: string) => (body += d));
        res.on('end', () => {
          try {
            resolve(JSON.parse(body) as { count: number; generation: string });
          } catch (err) {
            reject(err);
          }
        });
      })
      .on('error', reject);
  });
}

describe('examples/python-counter image, built by podman', { timeout: 1_800_000 }, () => {
  test('builds, runs Aeterna as PID 1 and promotes a reload inside the container', async (t) => {
    const why = podmanUnavailable([
      'docker.io/library/node:20-bookworm',
      'docker.io/library/python:3.12-slim-bookworm',
    ]);
    if (why !== null) return t.skip(why);
    const tag = `localhost/aeterna-python-counter-test:${process.pid}`;
    const name = `aeterna-python-counter-${process.pid}`;
    const podman = (args: string[], timeout = 120_000): ReturnType<typeof spawnSync> =>
      spawnSync('podman', args, { cwd: ROOT, encoding: 'utf8', timeout });
    try {
      const build = podman(['build', '-f', 'examples/python-counter/Dockerfile', '-t', tag, '.'], 1_500_000);
      assert.equal(build.status, 0, `${String(build.stdout)}${String(build.stderr)}`);
      const port = await freePort();
      const run = podman(['run', '-d', '--name', name, '-p', `127.0.0.1:${port}:8080`, tag]);
      assert.equal(run.status, 0, String(run.stderr));
      const deadline = Date.now() + 120_000;
      let first: { count: number; generation: string } | null = null;
      while (first === null) {
        try {
          first = await get(port);
        } catch (err) {
          if (Date.now() > deadline) throw err;
          await new Promise((r) => setTimeout(r, 250));
        }
      }
      assert.equal(first.generation, '1');
      const pid1 = podman(['exec', name, 'cat', '/proc/1/cmdline']);
      assert.match(String(pid1.stdout), /^\/usr\/local\/bin\/aeterna\0start\0/);
      const reload = podman(['exec', name, 'aeterna', 'reload']);
      assert.equal(reload.status, 0, `${String(reload.stdout)}${String(reload.stderr)}`);
      assert.match(String(reload.stdout), /promoted/);
      const second = await get(port);
      assert.equal(second.generation, '2');
      assert.equal(second.count, first.count + 1, 'the count was relayed');
      const stop = podman(['stop', '-t', '20', name], 60_000);
      assert.equal(stop.status, 0, String(stop.stderr));
    } finally {
      podman(['rm', '-f', name]);
      podman(['rmi', '-f', tag]);
    }
  });
});
