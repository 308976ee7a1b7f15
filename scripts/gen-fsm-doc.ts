// Regenerates the state diagram in docs/fsm.md from the transition table:
//   node dist/scripts/gen-fsm-doc.js
import fs from 'node:fs';
import path from 'node:path';
import { mermaidDiagram } from '../src/orchestrator/fsm';

const file = path.join(__dirname, '..', '..', 'docs', 'fsm.md');
const doc = fs.readFileSync(file, 'utf8');
const updated = doc.replace(/```mermaid\n[\s\S]*?\n```/, '```mermaid\n' + mermaidDiagram() + '\n```');
fs.writeFileSync(file, updated);
console.log(`${file}: diagram ${updated === doc ? 'unchanged' : 'updated'}`);
