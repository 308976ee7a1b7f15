// The chart, written by hand (no charting dependency): requests/s (2xx) and
// failures/s over time, one line per contender, with each contender's reload
// windows marked in its colour between the two panels. The failures panel is on
// a log scale, so a handful of failed requests is as visible as thousands.
import type { ContenderResult } from './sections/reloads';

export const COLORS: Record<string, string> = {
  'aeterna-immediate': '#1b9e77',
  'aeterna-canary': '#7570b3',
  naive: '#d95f02',
  pm2: '#e7298a',
};
const FALLBACK = ['#66a61e', '#e6ab02', '#a6761d', '#666666'];

export function colorOf(id: string, i: number): string {
  return COLORS[id] ?? FALLBACK[i % FALLBACK.length];
}

export function escapeXml(s: string): string {
  return s
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;')
    .replace(/'/g, '&apos;');
}

/** A step of 1, 2 or 5 times a power of ten giving about `count` ticks up to max. */
export function niceStep(max: number, count: number): number {
  if (!(max > 0)) return 1;
  const raw = max / count;
  const pow = 10 ** Math.floor(Math.log10(raw));
  const m = raw / pow;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * pow;
}

function siLabel(v: number): string {
  if (v >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (v >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  return String(+v.toFixed(2));
}

const f1 = (v: number): string => (Math.round(v * 10) / 10).toString();

export interface ChartOptions {
  title: string;
  subtitle?: string;
}

export function renderChart(contenders: ContenderResult[], options: ChartOptions): string {
  const runs = contenders.filter((c) => c.error === null && c.timeline.okPerS.length > 0);
  const W = 1000;
  const left = 120;
  const right = 20;
  const plotW = W - left - right;
  const laneH = 10;
  const topA = 104;
  const hA = 240;
  const lanesTop = topA + hA + 26;
  const lanesH = Math.max(1, runs.length) * laneH;
  const topB = lanesTop + lanesH + 24;
  const hB = 150;
  const H = topB + hB + 50;

  const maxS = Math.max(1, ...runs.map((c) => c.durationMs / 1000));
  const x = (s: number): number => left + (s / maxS) * plotW;
  const maxRps = Math.max(1, ...runs.flatMap((c) => c.timeline.okPerS));
  const stepA = niceStep(maxRps * 1.05, 5);
  const topRps = Math.ceil((maxRps * 1.05) / stepA) * stepA;
  const yA = (v: number): number => topA + hA - (v / topRps) * hA;
  const maxFail = Math.max(1, ...runs.flatMap((c) => c.timeline.failedPerS));
  const decades = Math.max(1, Math.ceil(Math.log10(maxFail + 1)));
  const yB = (v: number): number => topB + hB - (Math.log10(1 + v) / decades) * hB;

  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
  );
  out.push(`<title>${escapeXml(options.title)}</title>`);
  out.push(`<rect x="0" y="0" width="${W}" height="${H}" fill="#ffffff"/>`);
  out.push(`<text x="${left}" y="22" font-size="16" font-weight="bold">${escapeXml(options.title)}</text>`);
  if (options.subtitle) out.push(`<text x="${left}" y="40" fill="#555555">${escapeXml(options.subtitle)}</text>`);

  // Legend.
  let lx = left;
  let ly = 60;
  runs.forEach((c, i) => {
    const color = colorOf(c.id, i);
    const text = `${c.label}: ${c.failed.toLocaleString('en-US')} failed`;
    const w = 34 + text.length * 6.6;
    if (lx + w > W - right && lx > left) {
      lx = left;
      ly += 18;
    }
    out.push(`<line x1="${lx}" y1="${ly - 4}" x2="${lx + 18}" y2="${ly - 4}" stroke="${color}" stroke-width="3"/>`);
    out.push(`<text x="${lx + 24}" y="${ly}">${escapeXml(text)}</text>`);
    lx += w;
  });

  // Panel A: requests/s.
  out.push(`<text x="${left}" y="${topA - 8}" font-weight="bold">2xx responses per second</text>`);
  for (let v = 0; v <= topRps + 1e-9; v += stepA) {
    const y = f1(yA(v));
    out.push(`<line x1="${left}" y1="${y}" x2="${W - right}" y2="${y}" stroke="#e5e5e5"/>`);
    out.push(`<text x="${left - 6}" y="${f1(yA(v) + 4)}" text-anchor="end" fill="#555555">${siLabel(v)}</text>`);
  }
  // Panel B: failures/s, log scale.
  out.push(
    `<text x="${left}" y="${topB - 8}" font-weight="bold">failures per second (log scale): refused, reset, timeout, non-2xx</text>`,
  );
  for (let d = 0; d <= decades; d++) {
    const v = d === 0 ? 0 : 10 ** d;
    const y = f1(yB(v));
    out.push(`<line x1="${left}" y1="${y}" x2="${W - right}" y2="${y}" stroke="#e5e5e5"/>`);
    out.push(`<text x="${left - 6}" y="${f1(yB(v) + 4)}" text-anchor="end" fill="#555555">${siLabel(v)}</text>`);
  }
  // Time axis (both panels).
  const stepX = niceStep(maxS, 10);
  for (let s = 0; s <= maxS + 1e-9; s += stepX) {
    const xs = f1(x(s));
    out.push(`<line x1="${xs}" y1="${topA}" x2="${xs}" y2="${topA + hA}" stroke="#f0f0f0"/>`);
    out.push(`<line x1="${xs}" y1="${topB}" x2="${xs}" y2="${topB + hB}" stroke="#f0f0f0"/>`);
    out.push(`<text x="${xs}" y="${topB + hB + 16}" text-anchor="middle" fill="#555555">${siLabel(s)}</text>`);
  }
  out.push(
    `<text x="${left + plotW / 2}" y="${topB + hB + 36}" text-anchor="middle">seconds since the load started (each contender runs on its own, one after the other)</text>`,
  );
  out.push(`<rect x="${left}" y="${topA}" width="${plotW}" height="${hA}" fill="none" stroke="#999999"/>`);
  out.push(`<rect x="${left}" y="${topB}" width="${plotW}" height="${hB}" fill="none" stroke="#999999"/>`);

  // Reload windows, one lane per contender.
  out.push(
    `<text x="${left}" y="${lanesTop - 6}" fill="#555555">reloads (request to done), one lane per contender:</text>`,
  );
  runs.forEach((c, i) => {
    const color = colorOf(c.id, i);
    const y = lanesTop + i * laneH;
    out.push(
      `<text x="${left - 6}" y="${y + laneH - 1}" text-anchor="end" font-size="10" fill="${color}">${escapeXml(c.label)}</text>`,
    );
    for (const [a, b] of c.windows) {
      const xa = x(a / 1000);
      const w = Math.max(1.5, x(b / 1000) - xa);
      out.push(
        `<rect x="${f1(xa)}" y="${y + 1}" width="${f1(w)}" height="${laneH - 3}" fill="${color}" fill-opacity="0.8"/>`,
      );
    }
  });

  // The lines.
  runs.forEach((c, i) => {
    const color = colorOf(c.id, i);
    const b = c.timeline.bucketMs / 1000;
    const ptsA = c.timeline.okPerS.map((v, k) => `${f1(x((k + 0.5) * b))},${f1(yA(v))}`).join(' ');
    const ptsB = c.timeline.failedPerS.map((v, k) => `${f1(x((k + 0.5) * b))},${f1(yB(v))}`).join(' ');
    out.push(`<polyline fill="none" stroke="${color}" stroke-width="1.4" stroke-linejoin="round" points="${ptsA}"/>`);
    out.push(`<polyline fill="none" stroke="${color}" stroke-width="1.4" stroke-linejoin="round" points="${ptsB}"/>`);
  });
  if (runs.length === 0)
    out.push(
      `<text x="${left + plotW / 2}" y="${topA + hA / 2}" text-anchor="middle">no contender completed a run</text>`,
    );
  out.push('</svg>');
  return out.join('\n') + '\n';
}
