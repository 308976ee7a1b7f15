// `make standalone`: Aeterna as one self-contained executable, build/standalone/aeterna, that runs in an image with
// no Node and no npm (a Python, Go or Java image). It is a Node single executable application: the Node binary
// that runs this script (stripped of its debug symbols), with the CLI bundled into one script (esbuild) and the
// addon (build/Release/aeterna.node) as an asset, which src/native/binding.ts writes to a private directory and
// loads at start. One file to COPY; it needs only glibc and libstdc++, which every Debian, Ubuntu or RHEL based
// image has. Built for this machine's platform (linux-x64 here; on an arm64 machine, linux-arm64).
//
//   node dist/scripts/standalone.js [--out DIR]      (after `make build`; default DIR: build/standalone)
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { build, type Plugin } from 'esbuild';
import { EMBEDDED_ADDON_ASSET } from '../src/native/binding';

const ROOT = path.resolve(__dirname, '..', '..');
/** The fuse Node looks for to know it carries a single executable application's blob. */
const SEA_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2';

function outDir(argv: string[]): string {
  const i = argv.indexOf('--out');
  return i >= 0 && argv[i + 1] ? path.resolve(argv[i + 1]) : path.join(ROOT, 'build', 'standalone');
}

/** The version is read from package.json next to the code; the executable has none, so it is built in. */
function versionBuiltIn(version: string): Plugin {
  return {
    name: 'aeterna-version',
    setup(b) {
      b.onLoad({ filter: /[\\/]dist[\\/]src[\\/]version\.js$/ }, () => ({
        contents: `exports.packageVersion = () => ${JSON.stringify(version)};`,
        loader: 'js',
      }));
    },
  };
}

function run(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'inherit', 'inherit'] });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited with ${r.status ?? r.signal}`);
}

async function main(): Promise<void> {
  const out = outDir(process.argv);
  const addon = path.join(ROOT, 'build', 'Release', 'aeterna.node');
  const cli = path.join(ROOT, 'dist', 'src', 'cli', 'main.js');
  for (const [file, how] of [
    [addon, 'npx node-gyp rebuild'],
    [cli, 'npx tsc -p tsconfig.json'],
  ]) {
    if (!fs.existsSync(file))
      throw new Error(`${path.relative(ROOT, file)} is missing: run \`${how}\` (or make build)`);
  }
  const { version } = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
  fs.mkdirSync(out, { recursive: true });
  const script = path.join(out, 'aeterna.js');
  const blob = path.join(out, 'aeterna.blob');
  const exe = path.join(out, 'aeterna');

  // 1. One CommonJS script: a single executable's main script can require only Node's built-in modules.
  const bundled = await build({
    stdin: { contents: `require('./dist/src/cli/main.js').main(process.argv);`, resolveDir: ROOT, loader: 'js' },
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    outfile: script,
    keepNames: true,
    legalComments: 'none',
    logLevel: 'warning',
    plugins: [versionBuiltIn(version)],
  });
  if (bundled.errors.length > 0) throw new Error('esbuild failed');

  // 2. The blob: the script, its V8 code cache (a faster start) and the addon as an asset.
  const config = path.join(out, 'sea-config.json');
  fs.writeFileSync(
    config,
    JSON.stringify({
      main: script,
      output: blob,
      disableExperimentalSEAWarning: true,
      useCodeCache: true,
      assets: { [EMBEDDED_ADDON_ASSET]: addon },
    }),
  );
  run(process.execPath, ['--experimental-sea-config', config]);

  // 3. A copy of this Node without its debug symbols (Debian's and NodeSource's keep them: 13 MB), the blob
  //    injected into it. Written beside the target and renamed over it: a running aeterna is never overwritten.
  const partial = `${exe}.partial`;
  fs.rmSync(partial, { force: true });
  if (spawnSync('strip', ['--version'], { stdio: 'ignore' }).status === 0)
    run('strip', ['-o', partial, process.execPath]);
  else fs.copyFileSync(process.execPath, partial);
  fs.chmodSync(partial, 0o755);
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { inject } = require('postject') as {
    inject: (file: string, name: string, data: Buffer, options: { sentinelFuse: string }) => Promise<void>;
  };
  // postject (LIEF) warns on every note section it cannot name; they are Node's own and stay as they are.
  const warn = console.warn;
  console.warn = () => undefined;
  try {
    await inject(partial, 'NODE_SEA_BLOB', fs.readFileSync(blob), { sentinelFuse: SEA_FUSE });
  } finally {
    console.warn = warn;
  }
  fs.renameSync(partial, exe);
  for (const f of [blob, config]) fs.rmSync(f, { force: true });

  // 4. It runs, and says its version.
  const r = spawnSync(exe, ['--version'], { encoding: 'utf8' });
  if (r.status !== 0 || r.stdout.trim() !== version) {
    throw new Error(`${exe} --version: exit ${r.status ?? r.signal}, "${r.stdout.trim()}" ${r.stderr}`);
  }
  const mb = (fs.statSync(exe).size / 1e6).toFixed(1);
  process.stdout.write(`${path.relative(process.cwd(), exe) || exe}: aeterna ${version}, ${mb} MB\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`standalone: ${(err as Error).message}\n`);
  process.exitCode = 1;
});
