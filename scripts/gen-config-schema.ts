// Writes configs/aeterna.schema.json from the schema in src/config/schema.ts:
//   node dist/scripts/gen-config-schema.js [output]
// A test regenerates it in memory and compares, so the committed file cannot drift.

import fs from 'node:fs';
import path from 'node:path';
import { configJsonSchema } from '../src/config/json-schema';

/** The committed file's text: what this script writes and what the drift test compares. */
export function renderConfigJsonSchema(): string {
  return `${JSON.stringify(configJsonSchema(), null, 2)}\n`;
}

/** configs/aeterna.schema.json of this checkout (this file runs from dist/scripts/). */
export const SCHEMA_FILE = path.resolve(__dirname, '../../configs/aeterna.schema.json');

if (require.main === module) {
  const output = process.argv[2] ?? SCHEMA_FILE;
  fs.writeFileSync(output, renderConfigJsonSchema());
  process.stdout.write(`wrote ${output}\n`);
}
