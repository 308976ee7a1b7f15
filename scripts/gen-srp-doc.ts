// Regenerates the "Which op when" table in docs/srp.md from the protocol table:
//   node dist/scripts/gen-srp-doc.js
import fs from 'node:fs';
import path from 'node:path';
import { SRP_TABLE_BEGIN, SRP_TABLE_END, srpTable } from '../src/srp/protocol';

const file = path.join(__dirname, '..', '..', 'docs', 'srp.md');
const doc = fs.readFileSync(file, 'utf8');
const begin = doc.indexOf(SRP_TABLE_BEGIN);
const end = doc.indexOf(SRP_TABLE_END);
if (begin < 0 || end < begin) throw new Error(`${file}: no "${SRP_TABLE_BEGIN}" ... "${SRP_TABLE_END}" markers`);
const updated = doc.slice(0, begin + SRP_TABLE_BEGIN.length) + '\n' + srpTable() + '\n' + doc.slice(end);
fs.writeFileSync(file, updated);
console.log(`${file}: table ${updated === doc ? 'unchanged' : 'updated'}`);
