#!/usr/bin/env node
// `npm pack` / `npm publish` guard (the prepack script): the tarball ships prebuilds/ as it is on disk, so a
// prebuilt addon older than the addon's sources would ship stale native code. No prebuilds at all is fine: the
// installer then builds from source (the install script). Fix a failure with `make prebuild` (or delete prebuilds/).
'use strict';
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');

function files(dir, keep) {
  let entries;
  try {
    entries = fs.readdirSync(dir, { withFileTypes: true });
  } catch {
    return [];
  }
  return entries.flatMap((e) => (e.isDirectory() ? files(path.join(dir, e.name), keep) : keep(e.name) ? [path.join(dir, e.name)] : []));
}

const prebuilds = files(path.join(root, 'prebuilds'), (name) => name.endsWith('.node'));
if (prebuilds.length === 0) {
  console.log('prepack: no prebuilt addon in prebuilds/; installs will build it from source (run `make prebuild` to ship one)');
  process.exit(0);
}
const sources = [path.join(root, 'binding.gyp'), ...files(path.join(root, 'native'), () => true)];
const newestSource = sources.reduce((best, f) => (fs.statSync(f).mtimeMs > best.mtimeMs ? { file: f, mtimeMs: fs.statSync(f).mtimeMs } : best), {
  file: '',
  mtimeMs: 0,
});
const stale = prebuilds.filter((f) => fs.statSync(f).mtimeMs < newestSource.mtimeMs);
if (stale.length > 0) {
  console.error(
    `prepack: stale prebuilt addon: ${stale.map((f) => path.relative(root, f)).join(', ')} is older than ` +
      `${path.relative(root, newestSource.file)}; run \`make prebuild\` (or delete prebuilds/) before packing`,
  );
  process.exit(1);
}
console.log(`prepack: shipping ${prebuilds.map((f) => path.relative(root, f)).join(', ')}`);
